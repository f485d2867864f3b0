"""Fused sign-conditioned SGD with momentum: one launch updates every (aligned) parameter of one dtype.

The table (`SGDTable`, built by `make_table`, the only place that knows its layout; both in
kernels/fused_sgd_table.py, re-exported here): the parameters, gradients and momentum buffers stay the
caller's own tensors (any dense layout, channels-last included, as long as a parameter, its gradient and its
buffer share strides). Each program of a launch updates one chunk of at most BLOCK elements of one tensor,
described by one packed record, a row of the int64 `records[C, RECORD]`:

    PARAM, GRAD, BUF   addresses of the chunk's first element in the parameter, gradient, momentum buffer
    NUMEL              elements in this chunk (<= BLOCK)
    GROUP              param group: row of `hyper[G, 2]` = (signed lr, weight decay)
    RESTART            1: the momentum buffer restarts at d_p in this step (torch.optim.SGD's first step);
                       the kernel clears it once the step is applied (kept when a scaled step is skipped)
    SLOT, START        the chunk's tensor (index into SGDTable.params) and first element (host-side only)

Every field the program needs sits in its own record, so the loads are independent (no chain of
metadata loads); only `hyper[GROUP]` hangs off one of them. `scalars[3]` = (momentum, dampening,
inverse loss scale), `found_inf[1]`. Everything the step reads lives in device tensors, so hyper-
parameters change without recompiling and a launch can be captured in a CUDA graph and replayed.

"Restart pending" has one live representation: the RESTART field (per chunk; all chunks of a tensor
always agree). `SGDTable.pending()` reads it per tensor, `request_restart()` sets it, the kernel clears it
(each program its own record's, so no program races another's read; inside a program every warp reads it
and one thread clears it after a barrier, so no warp races that write either).

Alignment: records are sorted into segments (dtype, aligned), one launch each. A chunk is aligned when its
three addresses are 16-byte aligned and NUMEL is a multiple of the vector width (16 bytes: 4 fp32, 8 bf16 /
fp16); the aligned variant tells the compiler so (`tl.multiple_of` on the pointers and on NUMEL) and its
loads and stores are 128-bit. Chunk starts are multiples of BLOCK elements, so a tensor with aligned bases
has every chunk aligned except, at most, its last (a length that is not a multiple of the vector width);
views at odd offsets go to the unaligned variant whole. A model's parameters are usually one aligned launch
(ResNet-50's 161 tensors are), plus a small unaligned one when some tensor is odd.

Loss scaling: `_nonfinite_kernel` reads the scaled gradients and sets `found_inf` (one read-only pass; a
single launch cannot skip globally, since no program knows the others' gradients); the update then
unscales and, when `found_inf` is set, still loads but stores nothing (params, buffers, restart flags
unchanged). With torch.amp.GradScaler, the scaler's own check fills `found_inf` and only the update runs.

`step(table, ...)` is the Triton launcher; `native_step(table, ...)` launches the native CUDA C++ twin
(kernels/cuda/fused_sgd.cu, built by CMakeLists.txt, registered as torch.ops.seal_fast.*) over the same table
with the same semantics. `compile_specs()` lists every configuration `step` can launch.

What PyTorch sees: the kernels write parameters and buffers through the records' addresses, which nothing in
PyTorch tracks. So, eagerly, both launchers bump the version counters of everything a step writes (one call,
~20 us for ResNet-50's 2 x 161 tensors on a 2-core CPU; autograd then refuses a backward through a weight the
step changed, as with torch.optim.SGD), and under torch.compile / export they are traced as one operator,
torch.ops.seal_fast_sgd.step, that declares the parameters, buffers, records and found_inf mutated and the
gradients read, so reads of a parameter after the step are ordered after it. Functionalization may hand that
operator copies of what it mutates (the aot_eager backend does; inductor passes the tensors themselves):
it then updates the copies through a table of their own. The eager launches stay capturable in a CUDA graph
(a replay bumps no counter, as for any captured in-place op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_sgd_table import (BLOCK, BUF, GRAD, GROUP, NUMEL, PARAM, RECORD, RESTART, SLOT, VECTOR_BYTES, SGDTable,
                              Segment, _DTYPE_CODE, make_table)

NUM_WARPS = 4
_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# the same constants inside the kernels (a @triton.jit function reads only constexpr globals)
_R = tl.constexpr(RECORD)
_PARAM, _GRAD, _BUF, _NUMEL = tl.constexpr(PARAM), tl.constexpr(GRAD), tl.constexpr(BUF), tl.constexpr(NUMEL)
_GROUP, _RESTART = tl.constexpr(GROUP), tl.constexpr(RESTART)


# -- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _pointer(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """An int64 address as a pointer to the parameter dtype; in the aligned variant, 16-byte aligned.
    The hint goes on the pointer itself: on the integer it does not survive the cast."""
    if DTYPE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32), bitcast=True)
    elif DTYPE == 1:
        ptr = addr.to(tl.pointer_type(tl.bfloat16), bitcast=True)
    else:
        ptr = addr.to(tl.pointer_type(tl.float16), bitcast=True)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _numel(rec, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements in the chunk, int32. Aligned: a multiple of the vector width, so the mask `lanes < n` is
    constant over each vector (the hint must sit on the op that makes n, not on a function argument)."""
    n = tl.load(rec + _NUMEL).to(tl.int32)
    if ALIGNED:
        if DTYPE == 0:
            n = tl.multiple_of(n, 4)
        else:
            n = tl.multiple_of(n, 8)
    return n


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """float32 -> the parameter dtype, rounding to nearest even. bf16 is rounded by hand (add 0x7FFF plus
    the lowest kept bit, keep the high half: PyTorch's own rounding) because the Triton interpreter's
    fp32 -> bf16 cast truncates; compiled Triton runs the same integer code, so both give the same bits.
    NaN is not rounded (the sum carries 0x7FFFFFFF, the GPU's canonical NaN, into the sign bit: -0.0, and
    0x7F800001 into +inf): every NaN becomes 0x7FFF, the NaN of CUDA's cvt.rn.bf16.f32, so of the native
    kernel and of torch on CUDA (torch on CPU gives 0xFFFF or 0x7FC0 by code path: NaNs all the same)."""
    if DTYPE == 0:
        return x
    elif DTYPE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(x != x, 0x7FFF, half)
        return half.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.float16)


@triton.jit
def _nonfinite_kernel(records, scalars, found_inf, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr):
    rec = records + tl.program_id(0) * _R
    g_ptr = _pointer(tl.load(rec + _GRAD), DTYPE, ALIGNED)
    mask = tl.arange(0, BLOCK) < _numel(rec, DTYPE, ALIGNED)
    g = tl.load(g_ptr + tl.arange(0, BLOCK), mask=mask, other=0.0).to(tl.float32) * tl.load(scalars + 2)
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.float32), axis=0)
    if bad > 0:
        tl.atomic_max(found_inf, bad)


@triton.jit
def _fused_sgd_kernel(records, hyper, scalars, found_inf, DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                      NESTEROV: tl.constexpr, SCALED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    rec = records + tl.program_id(0) * _R
    # independent loads: every address comes from the record; only lr / wd hang off GROUP
    lanes = tl.arange(0, BLOCK)
    p_ptr = _pointer(tl.load(rec + _PARAM), DTYPE, ALIGNED) + lanes
    g_ptr = _pointer(tl.load(rec + _GRAD), DTYPE, ALIGNED) + lanes
    n = _numel(rec, DTYPE, ALIGNED)
    group = tl.load(rec + _GROUP)
    mask = lanes < n
    p = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(g_ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOMENTUM:
        b_ptr = _pointer(tl.load(rec + _BUF), DTYPE, ALIGNED) + lanes
        restart = tl.load(rec + _RESTART)
        b = tl.load(b_ptr, mask=mask, other=0.0).to(tl.float32)   # loaded whatever RESTART says
    lr = tl.load(hyper + 2 * group)
    wd = tl.load(hyper + 2 * group + 1)
    if SCALED:
        d = d * tl.load(scalars + 2)
        apply = tl.load(found_inf) == 0          # a skipped step loads as usual and stores nothing
        mask = lanes < tl.where(apply, n, 0)     # (keeps n's multiple-of-vector hint)
    d = tl.where(wd != 0.0, d + wd * p, d)       # as torch: no weight decay term at wd 0 (0 * inf is NaN)
    if HAS_MOMENTUM:
        momentum = tl.load(scalars)
        dampening = tl.load(scalars + 1)
        buf = tl.where(restart != 0, d, momentum * b + (1.0 - dampening) * d)
        tl.store(b_ptr, _narrow(buf, DTYPE), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(p_ptr, _narrow(p - lr * d, DTYPE), mask=mask)
    if HAS_MOMENTUM:
        # Every warp read RESTART above and one thread clears it: without the barrier a late warp could read the
        # cleared flag (and apply momentum to a restarted buffer). A skipped step writes the flag back as read.
        tl.debug_barrier()
        if SCALED:
            tl.store(rec + _RESTART, tl.where(apply, 0, restart))
        else:
            tl.store(rec + _RESTART, 0)


# -- the launcher -----------------------------------------------------------------------------------


def _update_config(dtype: torch.dtype, momentum: bool, nesterov: bool, scaled: bool, aligned: bool,
                   block: int = BLOCK) -> dict:
    return dict(DTYPE=_DTYPE_CODE[dtype], HAS_MOMENTUM=bool(momentum), NESTEROV=bool(nesterov and momentum),
                SCALED=bool(scaled), ALIGNED=bool(aligned), BLOCK=block)


def _nonfinite_config(dtype: torch.dtype, aligned: bool, block: int = BLOCK) -> dict:
    return dict(DTYPE=_DTYPE_CODE[dtype], ALIGNED=bool(aligned), BLOCK=block)


def nonfinite_check(table: SGDTable) -> None:
    """Raise table.found_inf to 1 if any gradient x scalars[2] (the inverse loss scale) is NaN or infinite
    (it never lowers it: zero it first). step(table, check=True) runs it before the update."""
    _nonfinite_triton(table.views, table.segments, table.scalars, table.found_inf, table.block)
    torch.autograd.graph.increment_version(table.found_inf)


def step(table: SGDTable, *, nesterov: bool = False, scaled: bool = False, check: bool = False,
         grads: list[torch.Tensor] | None = None) -> None:
    """One SGD step over every chunk of the table: one launch per segment (usually one).

    Needs table.hyper / scalars set (SGDTable.set_hyperparameters). scaled: gradients are multiplied by
    scalars[2] and, if found_inf is nonzero, nothing is stored (parameters, buffers and RESTART flags keep
    their values). check: first run the non-finite pass over every segment (it only raises found_inf: the
    caller zeroes it), then the scaled update.

    What PyTorch sees: eagerly, the launches, then the version counters of everything written are bumped
    (as an in-place op would); under torch.compile / export, one operator, torch.ops.seal_fast_sgd.step,
    that names every tensor it reads and writes (`grads`: the gradients the table was made from; default
    each parameter's .grad)."""
    if torch.compiler.is_compiling():
        _traced_step(table, grads, nesterov, scaled, check, native=False)
        return
    _update_triton(table.views, table.segments, table.hyper, table.scalars, table.found_inf, table.momentum,
                   nesterov, scaled, check, table.block)
    torch._C._increment_version(table.written)


def _nonfinite_triton(views, segments, scalars, found_inf, block) -> None:
    for s, rec in zip(segments, views):
        _nonfinite_kernel[(s.hi - s.lo,)](rec, scalars, found_inf, num_warps=NUM_WARPS,
                                          **_nonfinite_config(s.dtype, s.aligned, block))


def _update_triton(views, segments, hyper, scalars, found_inf, momentum, nesterov, scaled, check, block) -> None:
    if check:
        _nonfinite_triton(views, segments, scalars, found_inf, block)
        scaled = True
    for s, rec in zip(segments, views):
        _fused_sgd_kernel[(s.hi - s.lo,)](rec, hyper, scalars, found_inf, num_warps=NUM_WARPS,
                                          **_update_config(s.dtype, momentum, nesterov, scaled, s.aligned, block))


# The operators kernels/cuda/ops.cpp registers (tests/test_cuda_backend.py holds the C++ source and the built
# library to these strings, and fused_sgd.h's record layout and dtype codes to RECORD ... START, _DTYPE_CODE).
# The update names what it writes: `records` (RESTART) and, through the records' addresses, the parameters and
# momentum buffers of the segment's chunks (its ADInplaceOrView kernel bumps their version counters).
NATIVE_SCHEMAS = {
    "fused_sgd_update": "fused_sgd_update(Tensor(a!) records, Tensor(b!)[] params, Tensor(c!)[] bufs, Tensor hyper, "
                        "Tensor scalars, Tensor found_inf, int dtype, bool momentum, bool nesterov, bool scaled, "
                        "bool aligned) -> ()",
    "fused_sgd_nonfinite": "fused_sgd_nonfinite(Tensor records, Tensor scalars, Tensor(a!) found_inf, int dtype, "
                           "bool aligned) -> ()",
}


def native_step(table: SGDTable, *, nesterov: bool = False, scaled: bool = False, check: bool = False,
                grads: list[torch.Tensor] | None = None) -> None:
    """`step` with the native CUDA kernels (kernels/cuda/; needs `make cuda`): same table, same semantics,
    one launch per segment. Raises kernels.cuda.NativeUnavailable (one line) when the library is missing."""
    if torch.compiler.is_compiling():
        _traced_step(table, grads, nesterov, scaled, check, native=True)
        return
    # the operator is handed no lists here (converting 2 x 161 tensors per call costs twice the bump below)
    _update_native(table.views, table.segments, [], [], table.hyper, table.scalars, table.found_inf, table.momentum,
                   nesterov, scaled, check)
    torch._C._increment_version(table.written)


def _update_native(views, segments, params, bufs, hyper, scalars, found_inf, momentum, nesterov, scaled,
                   check) -> None:
    from . import cuda

    cuda.load()
    ops = torch.ops.seal_fast
    if check:
        for s, rec in zip(segments, views):
            ops.fused_sgd_nonfinite(rec, scalars, found_inf, _DTYPE_CODE[s.dtype], s.aligned)
        scaled = True
    for s, rec in zip(segments, views):
        ops.fused_sgd_update(rec, params, bufs, hyper, scalars, found_inf, _DTYPE_CODE[s.dtype], momentum,
                             bool(nesterov and momentum), bool(scaled), s.aligned)


# -- the step as one operator, for torch.compile / export -----------------------------------------------
#
# Traced code cannot see writes made through the records' addresses, so `step` / `native_step` hand a tracer
# this operator instead: every tensor it reads and writes is an argument, and the mutated ones are declared.
# Functionalization may hand it copies of what it mutates (torch.compile's aot_eager backend does; inductor
# normally passes the tensors themselves): then the records, whose addresses are the originals', would write
# the wrong memory, so the operator builds a table for the tensors it was given (their RESTART flags taken
# from, and put back into, the `records` it was given) and updates those.


_CODE_DTYPE = {c: dt for dt, c in _DTYPE_CODE.items()}


@torch.library.custom_op("seal_fast_sgd::step", mutates_args=("params", "bufs", "records", "found_inf"))
def _step_op(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], records: torch.Tensor,
             hyper: torch.Tensor, scalars: torch.Tensor, found_inf: torch.Tensor, layout: list[int],
             addresses: list[int], groups: list[int], momentum: bool, nesterov: bool, scaled: bool, check: bool,
             native: bool, block: int) -> None:
    segments = [Segment(_CODE_DTYPE[layout[i]], bool(layout[i + 1]), layout[i + 2], layout[i + 3])
                for i in range(0, len(layout), 4)]
    table = None
    if [t.data_ptr() for t in (*params, *grads, *bufs)] == list(addresses):  # the tensors the records point into
        views = [records[s.lo:s.hi] for s in segments]
    else:  # copies: a table of their own, with the pending restarts of `records`
        pending = torch.zeros(len(params), dtype=torch.int64, device=records.device)
        pending.scatter_reduce_(0, records[:, SLOT], records[:, RESTART], "amax")
        table = make_table(params, grads, bufs if momentum else None, groups, hyper.shape[0], restart=pending,
                           block=block)
        views, segments = table.views, table.segments
    if native:
        _update_native(views, segments, params, bufs, hyper, scalars, found_inf, momentum, nesterov, scaled, check)
    else:
        _update_triton(views, segments, hyper, scalars, found_inf, momentum, nesterov, scaled, check, block)
    if table is not None and momentum:  # what the step did to the restarts, back into `records`
        records[:, RESTART] = table.restart_flags()[records[:, SLOT]]


@_step_op.register_fake
def _(params, grads, bufs, records, hyper, scalars, found_inf, layout, addresses, groups, momentum, nesterov, scaled,
      check, native, block) -> None:
    return None


def _traced_step(table: SGDTable, grads, nesterov: bool, scaled: bool, check: bool, native: bool) -> None:
    if grads is None:
        grads = [p.grad for p in table.params]
    if any(g is None for g in grads):
        raise RuntimeError("fused_sgd: a parameter of the table has no .grad; pass the table's gradients (grads=)")
    torch.ops.seal_fast_sgd.step(table.params, grads, table.bufs if table.momentum else [], table.records, table.hyper,
                                 table.scalars, table.found_inf, table.layout, list(table.addresses), table.groups,
                                 table.momentum, nesterov, scaled, check, native, table.block)


# -- what the static report compiles ----------------------------------------------------------------


# Pointer arguments a launch always passes 16-byte aligned (Triton specialises on it): fresh allocations, and
# records[lo:hi] starts at a multiple of RECORD * 8 = 64 bytes.
_ALIGNED_ARGS = ("records", "hyper", "scalars", "found_inf")


def compile_specs():
    """Every configuration `step` and `nonfinite_check` can launch, for kernels.compile_spec."""
    from .compile_spec import KernelSpec

    specs = []
    update_sig = dict(records="*i64", hyper="*fp32", scalars="*fp32", found_inf="*fp32", DTYPE="constexpr",
                      HAS_MOMENTUM="constexpr", NESTEROV="constexpr", SCALED="constexpr", ALIGNED="constexpr",
                      BLOCK="constexpr")
    check_sig = dict(records="*i64", scalars="*fp32", found_inf="*fp32", DTYPE="constexpr", ALIGNED="constexpr",
                     BLOCK="constexpr")
    for dtype, name in _DTYPE_NAME.items():
        for aligned in (True, False):
            kind = "aligned" if aligned else "unaligned"
            for momentum, nesterov in ((False, False), (True, False), (True, True)):
                for scaled in (False, True):
                    mode = "nesterov" if nesterov else "momentum" if momentum else "plain"
                    label = f"fused_sgd update {name} {mode}{' scaled' if scaled else ''} {kind}"
                    specs.append(KernelSpec(label, _fused_sgd_kernel, update_sig,
                                            _update_config(dtype, momentum, nesterov, scaled, aligned),
                                            num_warps=NUM_WARPS, divisible=_ALIGNED_ARGS,
                                            facts=dict(kernel="update", dtype=name, aligned=aligned, momentum=momentum,
                                                       nesterov=nesterov, scaled=scaled, block=BLOCK,
                                                       vector_bytes=VECTOR_BYTES if aligned else None)))
            specs.append(KernelSpec(f"fused_sgd nonfinite {name} {kind}", _nonfinite_kernel, check_sig,
                                    _nonfinite_config(dtype, aligned), num_warps=NUM_WARPS,
                                    divisible=("records", "scalars", "found_inf"),
                                    facts=dict(kernel="nonfinite", dtype=name, aligned=aligned, block=BLOCK,
                                               vector_bytes=VECTOR_BYTES if aligned else None)))
    return specs
