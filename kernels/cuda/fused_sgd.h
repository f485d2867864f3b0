// The plain-C++ face of fused_sgd.cu (no torch headers on either side, so nvcc compiles only the kernels).
// ops.cpp checks the tensors, picks the stream and calls these; the table layout is kernels/fused_sgd.py's.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace seal_fast {

// One row of `records` (int64): must equal RECORD / PARAM ... START in kernels/fused_sgd.py
// (tests/test_cuda_backend.py reads both files and compares them).
constexpr int RECORD = 8;
constexpr int PARAM = 0, GRAD = 1, BUF = 2, NUMEL = 3, GROUP = 4, RESTART = 5, SLOT = 6, START = 7;
constexpr int VECTOR_BYTES = 16;  // the aligned variant's accesses (uint4)

// dtype codes: must equal _DTYPE_CODE in kernels/fused_sgd.py
enum DType : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One SGD step over `chunks` records (records[chunks][RECORD] on the device), as the Triton kernel:
// hyper[G][2] = (signed lr, weight decay), scalars[3] = (momentum, dampening, inverse loss scale),
// found_inf[1]. Returns the launch error (cudaSuccess when it was queued).
cudaError_t launch_fused_sgd_update(int64_t* records, int64_t chunks, const float* hyper, const float* scalars,
                                    const float* found_inf, DType dtype, bool momentum, bool nesterov, bool scaled,
                                    bool aligned, cudaStream_t stream);

// Sets found_inf[0] = 1 if any gradient x scalars[2] is NaN or infinite (never lowers it).
cudaError_t launch_fused_sgd_nonfinite(const int64_t* records, int64_t chunks, const float* scalars, float* found_inf,
                                       DType dtype, bool aligned, cudaStream_t stream);

}  // namespace seal_fast
