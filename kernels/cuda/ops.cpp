// The PyTorch operators of the native backend: torch.ops.seal_fast.fused_sgd_update / fused_sgd_nonfinite.
// Registered with TORCH_LIBRARY so CUDA graph capture and torch.compile see real operators (with Meta no-ops
// for tracing). They take
// kernels/fused_sgd.py's table (SGDTable.records / hyper / scalars / found_inf) and launch on the current
// stream; the launcher is kernels.fused_sgd.native_step. The kernel reaches the parameters, gradients and
// buffers through the records' addresses; the update's schema still names what it writes besides the records
// (`params`, `bufs`: Tensor(b!)[] / Tensor(c!)[], the tensors the records point into, never read by the kernel)
// so that a tracer orders later reads after it, and its ADInplaceOrView kernel bumps the version counters of
// everything it names, as a built-in in-place op does (autograd then sees a saved parameter change). Eagerly
// native_step passes empty lists and bumps the counters itself (converting 2 x 161 tensors on every call costs
// twice that); under torch.compile its operator seal_fast_sgd::step passes them.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
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

void fused_sgd_update(at::Tensor records, at::TensorList, at::TensorList, const at::Tensor& hyper,
                      const at::Tensor& scalars, const at::Tensor& found_inf, int64_t dtype, bool momentum,
                      bool nesterov, bool scaled, bool aligned) {
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
void fused_sgd_update_meta(at::Tensor, at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t, bool, bool, bool, bool) {}
void fused_sgd_nonfinite_meta(const at::Tensor&, const at::Tensor&, at::Tensor, int64_t, bool) {}

// ADInplaceOrView: run the kernel (below this key), then bump the version counter of every tensor the schema
// marks written. (Under inference mode this key is skipped; inference tensors have no counter.)
void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void fused_sgd_update_inplace(c10::DispatchKeySet keys, at::Tensor records, at::TensorList params,
                              at::TensorList bufs, const at::Tensor& hyper, const at::Tensor& scalars,
                              const at::Tensor& found_inf, int64_t dtype, bool momentum, bool nesterov, bool scaled,
                              bool aligned) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seal_fast::fused_sgd_update", "")
                             .typed<decltype(fused_sgd_update)>();
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, records, params, bufs, hyper, scalars, found_inf, dtype,
                  momentum, nesterov, scaled, aligned);
  }
  bump(records);
  for (const auto& t : params) bump(t);
  for (const auto& t : bufs) bump(t);
}

void fused_sgd_nonfinite_inplace(c10::DispatchKeySet keys, const at::Tensor& records, const at::Tensor& scalars,
                                 at::Tensor found_inf, int64_t dtype, bool aligned) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seal_fast::fused_sgd_nonfinite", "")
                             .typed<decltype(fused_sgd_nonfinite)>();
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, records, scalars, found_inf, dtype, aligned);
  }
  bump(found_inf);
}

}  // namespace

// The schemas: kernels/fused_sgd.py (NATIVE_SCHEMAS) states the same strings; tests/test_cuda_backend.py compares.
TORCH_LIBRARY(seal_fast, m) {
  m.def("fused_sgd_update(Tensor(a!) records, Tensor(b!)[] params, Tensor(c!)[] bufs, Tensor hyper, "
        "Tensor scalars, Tensor found_inf, int dtype, bool momentum, bool nesterov, bool scaled, bool aligned) -> ()");
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

TORCH_LIBRARY_IMPL(seal_fast, ADInplaceOrView, m) {
  m.impl("fused_sgd_update", TORCH_FN(fused_sgd_update_inplace));
  m.impl("fused_sgd_nonfinite", TORCH_FN(fused_sgd_nonfinite_inplace));
}

}  // namespace seal_fast
