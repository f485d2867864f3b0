// The PyTorch operators of the native backend: torch.ops.seal_fast.fused_sgd_update / fused_sgd_nonfinite.
// Registered with TORCH_LIBRARY so CUDA graph capture and torch.compile see real operators (with Meta no-ops
// for tracing). They take
// kernels/fused_sgd.py's table (SGDTable.records / hyper / scalars / found_inf) and launch on the current
// stream; the launcher is kernels.fused_sgd.native_step. The parameters, gradients and buffers are reached
// through the records' addresses, so the schema names only the tensors the launch itself is handed.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fused_sgd.h"

namespace seal_fast {
namespace {

void check_table(const at::Tensor& records, const at::Tensor& scalars, const at::Tensor& found_inf) {
  TORCH_CHECK(records.is_cuda() && records.scalar_type() == at::kLong && records.dim() == 2 &&
                  records.size(1) == RECORD && records.is_contiguous(),
              "seal_fast.fused_sgd: records must be a contiguous CUDA int64 tensor [chunks, ", RECORD, "]");
  TORCH_CHECK(scalars.is_cuda() && scalars.scalar_type() == at::kFloat && scalars.numel() >= 3 &&
                  scalars.is_contiguous() && scalars.device() == records.device(),
              "seal_fast.fused_sgd: scalars must be a contiguous float32 [3] on the records' device");
  TORCH_CHECK(found_inf.is_cuda() && found_inf.scalar_type() == at::kFloat && found_inf.numel() >= 1 &&
                  found_inf.device() == records.device(),
              "seal_fast.fused_sgd: found_inf must be a float32 [1] on the records' device");
}

DType to_dtype(int64_t code) {
  TORCH_CHECK(code == kFloat32 || code == kBFloat16 || code == kFloat16,
              "seal_fast.fused_sgd: dtype code ", code, " is not 0 (float32), 1 (bfloat16) or 2 (float16)");
  return static_cast<DType>(code);
}

void fused_sgd_update(at::Tensor records, const at::Tensor& hyper, const at::Tensor& scalars,
                      const at::Tensor& found_inf, int64_t dtype, bool momentum, bool nesterov, bool scaled,
                      bool aligned) {
  check_table(records, scalars, found_inf);
  TORCH_CHECK(hyper.is_cuda() && hyper.scalar_type() == at::kFloat && hyper.dim() == 2 && hyper.size(1) == 2 &&
                  hyper.is_contiguous() && hyper.device() == records.device(),
              "seal_fast.fused_sgd: hyper must be a contiguous float32 [groups, 2] on the records' device");
  const DType code = to_dtype(dtype);
  const c10::cuda::CUDAGuard guard(records.device());
  const cudaError_t err = launch_fused_sgd_update(
      records.data_ptr<int64_t>(), records.size(0), hyper.data_ptr<float>(), scalars.data_ptr<float>(),
      found_inf.data_ptr<float>(), code, momentum, nesterov && momentum, scaled, aligned,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "seal_fast.fused_sgd_update: launch failed: ", cudaGetErrorString(err));
}

void fused_sgd_nonfinite(const at::Tensor& records, const at::Tensor& scalars, at::Tensor found_inf, int64_t dtype,
                         bool aligned) {
  check_table(records, scalars, found_inf);
  const DType code = to_dtype(dtype);
  const c10::cuda::CUDAGuard guard(records.device());
  const cudaError_t err = launch_fused_sgd_nonfinite(records.data_ptr<int64_t>(), records.size(0),
                                                     scalars.data_ptr<float>(), found_inf.data_ptr<float>(), code,
                                                     aligned, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "seal_fast.fused_sgd_nonfinite: launch failed: ", cudaGetErrorString(err));
}

// Meta (fake-tensor) kernels: the operators return nothing and their only visible effect is on the tensors the
// schema marks mutable, so tracing (torch.compile, torch.export) needs just shape-free no-ops.
void fused_sgd_update_meta(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, bool,
                           bool, bool) {}
void fused_sgd_nonfinite_meta(const at::Tensor&, const at::Tensor&, at::Tensor, int64_t, bool) {}

}  // namespace

// The schemas: kernels/fused_sgd.py (NATIVE_SCHEMAS) states the same strings; tests/test_cuda_backend.py compares.
TORCH_LIBRARY(seal_fast, m) {
  m.def("fused_sgd_update(Tensor(a!) records, Tensor hyper, Tensor scalars, Tensor found_inf, int dtype, "
        "bool momentum, bool nesterov, bool scaled, bool aligned) -> ()");
  m.def("fused_sgd_nonfinite(Tensor records, Tensor scalars, Tensor(a!) found_inf, int dtype, bool aligned) -> ()");
}

TORCH_LIBRARY_IMPL(seal_fast, CUDA, m) {
  m.impl("fused_sgd_update", &fused_sgd_update);
  m.impl("fused_sgd_nonfinite", &fused_sgd_nonfinite);
}

TORCH_LIBRARY_IMPL(seal_fast, Meta, m) {
  m.impl("fused_sgd_update", &fused_sgd_update_meta);
  m.impl("fused_sgd_nonfinite", &fused_sgd_nonfinite_meta);
}

}  // namespace seal_fast
