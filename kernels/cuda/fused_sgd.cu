// Fused sign-conditioned SGD with momentum, multi-tensor style: one launch updates every chunk of a segment
// of kernels/fused_sgd.py's table (one record = one chunk of at most BLOCK elements of one tensor; a block of
// THREADS threads per record). The native twin of kernels/fused_sgd.py:_fused_sgd_kernel, same semantics:
//   d = g [* inv_scale];  d += wd * p (wd != 0);  buf = RESTART ? d : momentum * buf + (1 - dampening) * d;
//   d = nesterov ? d + momentum * buf : buf;  p -= lr * d;  RESTART := 0
// Math in fp32; bf16 / fp16 stored rounded to nearest even. Scaled: when found_inf is set nothing is stored
// (parameters, buffers and RESTART keep their values). Aligned records (three 16-byte aligned addresses, NUMEL a
// multiple of 16 bytes) use 128-bit loads and stores; the others a scalar loop. The tensors' addresses come from
// int64 records, so the compiler cannot tell they are global memory: the accesses say so (__ldg / __ldca /
// __stwb are ld.global / st.global; plain dereferences would be generic ld / st).
//
// The arithmetic is spelled with explicit roundings in torch.optim.SGD's order on CUDA (foreach/for-loop
// implementation: `buf.mul_(momentum).add_(d, alpha=1 - dampening)` is a rounded product then a fused
// multiply-add; `x.add(y, alpha=a)` is fma(a, y, x)), so fp32 results can match it bit for bit.

#include "fused_sgd.h"

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace seal_fast {
namespace {

constexpr int THREADS = 256;

template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float wide(float x) { return x; }
  static __device__ __forceinline__ float narrow(float x) { return x; }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float wide(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float wide(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half narrow(float x) { return __float2half_rn(x); }
};

struct Hyper {
  float lr, wd, momentum, keep, inv_scale;  // keep = 1 - dampening
  bool restart;
};

// one element: returns the new parameter, updates the buffer value in place
template <bool MOMENTUM, bool NESTEROV, bool SCALED>
__device__ __forceinline__ float update(float p, float g, float& b, const Hyper& h) {
  float d = SCALED ? __fmul_rn(g, h.inv_scale) : g;
  if (h.wd != 0.0f) d = __fmaf_rn(h.wd, p, d);
  if (MOMENTUM) {
    b = h.restart ? d : __fmaf_rn(h.keep, d, __fmul_rn(h.momentum, b));
    d = NESTEROV ? __fmaf_rn(h.momentum, b, d) : b;
  }
  return __fmaf_rn(-h.lr, d, p);
}

template <typename T, bool MOMENTUM, bool NESTEROV, bool SCALED, bool ALIGNED>
__global__ void __launch_bounds__(THREADS) fused_sgd_kernel(int64_t* __restrict__ records,
                                                            const float* __restrict__ hyper,
                                                            const float* __restrict__ scalars,
                                                            const float* __restrict__ found_inf) {
  int64_t* rec = records + static_cast<int64_t>(blockIdx.x) * RECORD;
  if (SCALED && *found_inf != 0.0f) return;  // skipped step: nothing stored, RESTART kept (uniform branch)
  T* p = reinterpret_cast<T*>(rec[PARAM]);
  const T* g = reinterpret_cast<const T*>(rec[GRAD]);
  T* buf = reinterpret_cast<T*>(rec[BUF]);
  const int n = static_cast<int>(rec[NUMEL]);
  const int64_t group = rec[GROUP];
  Hyper h;
  h.lr = hyper[2 * group];
  h.wd = hyper[2 * group + 1];
  h.momentum = scalars[0];
  h.keep = 1.0f - scalars[1];
  h.inv_scale = SCALED ? scalars[2] : 1.0f;
  h.restart = MOMENTUM && rec[RESTART] != 0;

  if (ALIGNED) {
    constexpr int E = VECTOR_BYTES / sizeof(T);  // elements per 128-bit access
    union Vec { uint4 raw; T e[E]; };
    const int vectors = n / E;                    // n is a multiple of E in an aligned record
#pragma unroll 2
    for (int v = threadIdx.x; v < vectors; v += THREADS) {
      Vec pv, gv, bv;
      pv.raw = __ldca(reinterpret_cast<const uint4*>(p) + v);
      gv.raw = __ldg(reinterpret_cast<const uint4*>(g) + v);
      if (MOMENTUM) bv.raw = __ldca(reinterpret_cast<const uint4*>(buf) + v);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        float b = MOMENTUM ? Num<T>::wide(bv.e[e]) : 0.0f;
        const float np = update<MOMENTUM, NESTEROV, SCALED>(Num<T>::wide(pv.e[e]), Num<T>::wide(gv.e[e]), b, h);
        pv.e[e] = Num<T>::narrow(np);
        if (MOMENTUM) bv.e[e] = Num<T>::narrow(b);
      }
      if (MOMENTUM) __stwb(reinterpret_cast<uint4*>(buf) + v, bv.raw);
      __stwb(reinterpret_cast<uint4*>(p) + v, pv.raw);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += THREADS) {
      float b = MOMENTUM ? Num<T>::wide(__ldca(buf + i)) : 0.0f;
      const float np = update<MOMENTUM, NESTEROV, SCALED>(Num<T>::wide(__ldca(p + i)), Num<T>::wide(__ldg(g + i)),
                                                          b, h);
      if (MOMENTUM) __stwb(buf + i, Num<T>::narrow(b));
      __stwb(p + i, Num<T>::narrow(np));
    }
  }
  if (MOMENTUM) {
    __syncthreads();  // every thread has read RESTART
    if (threadIdx.x == 0) rec[RESTART] = 0;
  }
}

template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(THREADS) nonfinite_kernel(const int64_t* __restrict__ records,
                                                            const float* __restrict__ scalars,
                                                            float* __restrict__ found_inf) {
  const int64_t* rec = records + static_cast<int64_t>(blockIdx.x) * RECORD;
  const T* g = reinterpret_cast<const T*>(rec[GRAD]);
  const int n = static_cast<int>(rec[NUMEL]);
  const float inv_scale = scalars[2];
  int bad = 0;
  if (ALIGNED) {
    constexpr int E = VECTOR_BYTES / sizeof(T);
    union Vec { uint4 raw; T e[E]; };
    for (int v = threadIdx.x; v < n / E; v += THREADS) {
      Vec gv;
      gv.raw = __ldg(reinterpret_cast<const uint4*>(g) + v);
#pragma unroll
      for (int e = 0; e < E; ++e) bad |= !isfinite(__fmul_rn(Num<T>::wide(gv.e[e]), inv_scale));
    }
  } else {
    for (int i = threadIdx.x; i < n; i += THREADS) bad |= !isfinite(__fmul_rn(Num<T>::wide(__ldg(g + i)), inv_scale));
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;  // only ever raised: no race on the value
}

template <typename T, bool MOMENTUM, bool NESTEROV, bool SCALED>
cudaError_t launch_update(int64_t* records, int64_t chunks, const float* hyper, const float* scalars,
                          const float* found_inf, bool aligned, cudaStream_t stream) {
  if (aligned)
    fused_sgd_kernel<T, MOMENTUM, NESTEROV, SCALED, true><<<chunks, THREADS, 0, stream>>>(records, hyper, scalars,
                                                                                          found_inf);
  else
    fused_sgd_kernel<T, MOMENTUM, NESTEROV, SCALED, false><<<chunks, THREADS, 0, stream>>>(records, hyper, scalars,
                                                                                           found_inf);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_update(int64_t* records, int64_t chunks, const float* hyper, const float* scalars,
                          const float* found_inf, bool momentum, bool nesterov, bool scaled, bool aligned,
                          cudaStream_t stream) {
  const auto go = [&](auto m, auto n, auto s) {
    return launch_update<T, decltype(m)::value, decltype(n)::value, decltype(s)::value>(
        records, chunks, hyper, scalars, found_inf, aligned, stream);
  };
  using F = std::false_type;
  using Tr = std::true_type;
  if (!momentum) return scaled ? go(F{}, F{}, Tr{}) : go(F{}, F{}, F{});
  if (nesterov) return scaled ? go(Tr{}, Tr{}, Tr{}) : go(Tr{}, Tr{}, F{});
  return scaled ? go(Tr{}, F{}, Tr{}) : go(Tr{}, F{}, F{});
}

template <typename T>
cudaError_t launch_check(const int64_t* records, int64_t chunks, const float* scalars, float* found_inf, bool aligned,
                         cudaStream_t stream) {
  if (aligned)
    nonfinite_kernel<T, true><<<chunks, THREADS, 0, stream>>>(records, scalars, found_inf);
  else
    nonfinite_kernel<T, false><<<chunks, THREADS, 0, stream>>>(records, scalars, found_inf);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_sgd_update(int64_t* records, int64_t chunks, const float* hyper, const float* scalars,
                                    const float* found_inf, DType dtype, bool momentum, bool nesterov, bool scaled,
                                    bool aligned, cudaStream_t stream) {
  if (chunks == 0) return cudaSuccess;
  if (chunks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case kFloat32:
      return launch_update<float>(records, chunks, hyper, scalars, found_inf, momentum, nesterov, scaled, aligned,
                                  stream);
    case kBFloat16:
      return launch_update<__nv_bfloat16>(records, chunks, hyper, scalars, found_inf, momentum, nesterov, scaled,
                                          aligned, stream);
    case kFloat16:
      return launch_update<__half>(records, chunks, hyper, scalars, found_inf, momentum, nesterov, scaled, aligned,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_fused_sgd_nonfinite(const int64_t* records, int64_t chunks, const float* scalars, float* found_inf,
                                       DType dtype, bool aligned, cudaStream_t stream) {
  if (chunks == 0) return cudaSuccess;
  if (chunks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case kFloat32: return launch_check<float>(records, chunks, scalars, found_inf, aligned, stream);
    case kBFloat16: return launch_check<__nv_bfloat16>(records, chunks, scalars, found_inf, aligned, stream);
    case kFloat16: return launch_check<__half>(records, chunks, scalars, found_inf, aligned, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seal_fast
