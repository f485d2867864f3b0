"""Fused sign-conditioned SGD with momentum: one launch updates every parameter of one dtype.

Layout: a table of tensors and a table of chunks, not flat buffers. The parameters, gradients and
momentum buffers stay the model's own tensors (any dense layout, channels-last included, as long as
a parameter, its gradient and its buffer share strides); the launcher passes their addresses in an
int64 table `ptrs[T, 3]` (param, grad, buf). Each program updates one chunk of BLOCK elements of one
tensor: `chunks[C, 2]` = (tensor index, first element). Per tensor, `meta[T, 3]` = (numel, group,
slot), and `fresh[slot]` = 1 restarts that tensor's momentum buffer at d_p (torch.optim.SGD's first
step after a reset; the caller clears it after the step). Per group, `hyper[G, 2]` = (signed lr, weight decay). `scalars[3]` = (momentum, dampening,
inverse loss scale). Everything the step reads lives in device tensors, so hyper-parameters change
without recompiling and the launch can be captured in a CUDA graph and replayed.

Loss scaling: `_nonfinite_kernel` reads the scaled gradients and sets `found_inf` (one read-only
pass; a single launch cannot skip globally, since no program knows the others' gradients); the update
then unscales, and skips everything when `found_inf` is set, in the same pass as the update. With
torch.amp.GradScaler, the scaler's own check fills `found_inf` and only the update runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _ptr(addr, DTYPE: tl.constexpr):
    if DTYPE == 0:
        return addr.to(tl.pointer_type(tl.float32), bitcast=True)
    elif DTYPE == 1:
        return addr.to(tl.pointer_type(tl.bfloat16), bitcast=True)
    else:
        return addr.to(tl.pointer_type(tl.float16), bitcast=True)


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """float32 -> the parameter dtype, rounding to nearest even. bf16 is rounded by hand (add 0x7FFF plus
    the lowest kept bit, keep the high half: PyTorch's own rounding) because the Triton interpreter's
    fp32 -> bf16 cast truncates; compiled Triton would round the same way."""
    if DTYPE == 0:
        return x
    elif DTYPE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.float16)


@triton.jit
def _nonfinite_kernel(ptrs, meta, chunks, scalars, found_inf, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunks + 2 * c)
    start = tl.load(chunks + 2 * c + 1)
    numel = tl.load(meta + 3 * t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(_ptr(tl.load(ptrs + 3 * t + 1), DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = g * tl.load(scalars + 2)
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.float32), axis=0)
    if bad > 0:
        tl.atomic_max(found_inf, bad)


@triton.jit
def _fused_sgd_kernel(ptrs, meta, chunks, hyper, scalars, fresh, found_inf, DTYPE: tl.constexpr,
                      HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, SCALED: tl.constexpr,
                      BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunks + 2 * c)
    start = tl.load(chunks + 2 * c + 1)
    numel = tl.load(meta + 3 * t)
    group = tl.load(meta + 3 * t + 1)
    lr = tl.load(hyper + 2 * group)
    wd = tl.load(hyper + 2 * group + 1)
    if SCALED:  # skip the whole step when any gradient was non-finite: every access masked off
        numel = numel * (tl.load(found_inf) == 0).to(tl.int64)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p_ptr = _ptr(tl.load(ptrs + 3 * t), DTYPE) + offs
    p = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(_ptr(tl.load(ptrs + 3 * t + 1), DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        d = d * tl.load(scalars + 2)
    d = d + wd * p
    if HAS_MOMENTUM:
        momentum = tl.load(scalars)
        dampening = tl.load(scalars + 1)
        b_ptr = _ptr(tl.load(ptrs + 3 * t + 2), DTYPE) + offs
        if tl.load(fresh + tl.load(meta + 3 * t + 2)) != 0:
            buf = d
        else:
            buf = momentum * tl.load(b_ptr, mask=mask, other=0.0).to(tl.float32) + (1.0 - dampening) * d
        tl.store(b_ptr, _narrow(buf, DTYPE), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_ptr, _narrow(p - lr * d, DTYPE), mask=mask)


def build_chunks(numels: list[int], block: int = BLOCK, device=None) -> torch.Tensor:
    """(tensor index, first element) of every BLOCK-sized chunk of every tensor: int64 [C, 2]."""
    rows = [(t, s) for t, n in enumerate(numels) for s in range(0, n, block)]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 2)


def _check(dtype: torch.dtype, **tables) -> int:
    if dtype not in _DTYPE_CODE:
        raise TypeError(f"fused_sgd: parameters of dtype {dtype} are not supported (float32, bfloat16, float16)")
    want = {"ptrs": torch.int64, "meta": torch.int64, "chunks": torch.int64, "hyper": torch.float32,
            "scalars": torch.float32, "fresh": torch.int64, "found_inf": torch.float32}
    for name, t in tables.items():
        if t.dtype != want[name] or not t.is_contiguous():
            raise TypeError(f"fused_sgd: {name} must be a contiguous {want[name]} tensor, got {t.dtype}")
    return _DTYPE_CODE[dtype]


def nonfinite_check(ptrs: torch.Tensor, meta: torch.Tensor, chunks: torch.Tensor, scalars: torch.Tensor,
                    found_inf: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> None:
    """Set found_inf[0] to 1 if any gradient x scalars[2] (the inverse loss scale) is NaN or infinite.
    Run it for every dtype's table before any update, then fused_sgd(..., scaled=True)."""
    code = _check(dtype, ptrs=ptrs, meta=meta, chunks=chunks, scalars=scalars, found_inf=found_inf)
    if chunks.shape[0]:
        _nonfinite_kernel[(chunks.shape[0],)](ptrs, meta, chunks, scalars, found_inf, DTYPE=code, BLOCK=block)


def fused_sgd(ptrs: torch.Tensor, meta: torch.Tensor, chunks: torch.Tensor, hyper: torch.Tensor,
              scalars: torch.Tensor, fresh: torch.Tensor, found_inf: torch.Tensor, dtype: torch.dtype,
              momentum: bool, nesterov: bool, scaled: bool, block: int = BLOCK) -> None:
    """One SGD step over one dtype's table. ptrs int64 [T,3]; meta int64 [T,3]; chunks int64 [C,2] (from
    build_chunks with the same block); hyper float32 [G,2]; scalars float32 [3]; fresh int64 [slots];
    found_inf float32 [1]. scaled: multiply gradients by scalars[2] and skip everything if found_inf."""
    code = _check(dtype, ptrs=ptrs, meta=meta, chunks=chunks, hyper=hyper, scalars=scalars, fresh=fresh,
                  found_inf=found_inf)
    if chunks.shape[0]:
        _fused_sgd_kernel[(chunks.shape[0],)](ptrs, meta, chunks, hyper, scalars, fresh, found_inf, DTYPE=code,
                                              HAS_MOMENTUM=momentum, NESTEROV=nesterov, SCALED=scaled, BLOCK=block)
