"""Fused sign-conditioned SGD with momentum: one launch updates every (aligned) parameter of one dtype.

The table (`SGDTable`, built by `make_table`, the only place that knows its layout): the parameters,
gradients and momentum buffers stay the caller's own tensors (any dense layout, channels-last included,
as long as a parameter, its gradient and its buffer share strides). Each program of a launch updates one
chunk of at most BLOCK elements of one tensor, described by one packed record, a row of the int64
`records[C, RECORD]`:

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

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

BLOCK = 2048            # elements per program (chunk)
NUM_WARPS = 4
VECTOR_BYTES = 16       # 128-bit global accesses in the aligned variant
RECORD = 8              # int64 fields per chunk record
PARAM, GRAD, BUF, NUMEL, GROUP, RESTART, SLOT, START = range(RECORD)

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# the same constants inside the kernels (a @triton.jit function reads only constexpr globals)
_R = tl.constexpr(RECORD)
_PARAM, _GRAD, _BUF, _NUMEL = tl.constexpr(PARAM), tl.constexpr(GRAD), tl.constexpr(BUF), tl.constexpr(NUMEL)
_GROUP, _RESTART = tl.constexpr(GROUP), tl.constexpr(RESTART)


def dense(t: torch.Tensor) -> bool:
    """Its numel() elements fill one gap-free block of memory (any order of dimensions: channels-last too)."""
    expect = 1
    for stride, n in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expect:
            return False
        expect *= n
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element order in memory: equal strides on every dimension longer than 1."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 128-bit access."""
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size()


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


# -- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """records[lo:hi]: chunks of one dtype, all aligned or all not; one launch."""
    dtype: torch.dtype
    aligned: bool
    lo: int
    hi: int


@dataclass(eq=False)
class SGDTable:
    """What one fused step reads: built by `make_table`, walked by `step`.

    Holds the parameters and momentum buffers (strongly; they are the caller's state anyway) but not the
    gradients: the caller decides when a gradient changed (SignedSGD watches them with weak references)."""
    params: list[torch.Tensor]        # slot -> parameter
    bufs: list[torch.Tensor]          # slot -> momentum buffer (the parameter itself without momentum)
    groups: list[int]                 # slot -> param group
    first_row: list[int]              # slot -> row of its first chunk in `records`
    records: torch.Tensor             # int64 [C, RECORD] (fields above), on the parameters' device
    segments: list[Segment]
    hyper: torch.Tensor               # float32 [G, 2]: (signed lr, weight decay)
    scalars: torch.Tensor             # float32 [3]: (momentum, dampening, inverse loss scale)
    found_inf: torch.Tensor           # float32 [1]: nonzero = the last scaled step was skipped
    momentum: bool                    # buffers exist (the momentum variant of the kernel)
    block: int = BLOCK
    addresses: tuple = ()             # data_ptr() of every parameter, gradient, then (momentum) buffer, when built
    synced: tuple | None = field(default=None)  # host copy of what hyper / scalars[:2] hold
    views: list = field(default_factory=list, repr=False)  # records[lo:hi] of each segment, made once
    written: list = field(default_factory=list, repr=False)  # every tensor a step may write (version counters)
    layout: list = field(default_factory=list, repr=False)  # per segment: dtype code, aligned, lo, hi (flat)

    def __post_init__(self):
        self.views = [self.records[s.lo:s.hi] for s in self.segments]
        bufs = self.bufs if self.momentum else []
        self.written = [*self.params, *bufs, self.records, self.found_inf]
        self.layout = [v for s in self.segments for v in (_DTYPE_CODE[s.dtype], int(s.aligned), s.lo, s.hi)]

    @property
    def device(self) -> torch.device:
        return self.records.device

    def pending(self) -> list[bool]:
        """Per slot: does its momentum buffer restart at d_p on the next applied step? (reads the device)"""
        if not self.params:
            return []
        rows = torch.tensor(self.first_row, dtype=torch.int64, device=self.device)
        return [bool(f) for f in self.records[rows, RESTART].tolist()]

    def restart_flags(self) -> torch.Tensor:
        """Per slot, the RESTART field as a device int64 tensor (no host read)."""
        rows = torch.tensor(self.first_row, dtype=torch.int64, device=self.device)
        return self.records[rows, RESTART]

    def request_restart(self) -> None:
        """Every buffer restarts at d_p on the next applied step (in place: safe between graph replays)."""
        self.records[:, RESTART].fill_(1)

    def clear_restart(self) -> None:
        """What the kernel does to RESTART after an applied step (for backends other than the kernel)."""
        self.records[:, RESTART].zero_()

    def set_hyperparameters(self, lrs: list[float], wds: list[float], momentum: float, dampening: float) -> bool:
        """Copy changed values into the device tensors (host-to-device, no sync); returns whether they changed."""
        values = (tuple(zip(map(float, lrs), map(float, wds))), float(momentum), float(dampening))
        if values == self.synced:
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused_sgd: lr, weight_decay, momentum or dampening changed during CUDA graph capture; "
                               "set them (SignedSGD.sync_hyperparameters()) before capturing or replaying")
        self.hyper.copy_(torch.tensor(values[0], dtype=torch.float32).reshape(-1, 2), non_blocking=True)
        self.scalars[:2].copy_(torch.tensor(values[1:], dtype=torch.float32), non_blocking=True)
        self.synced = values
        return True


def _overlap(written: list[torch.Tensor], read: list[torch.Tensor]) -> bool:
    """Does a tensor of `written` share a byte with another tensor of `written` or with one of `read`? (dense
    tensors: each is the span [data_ptr, data_ptr + numel * element_size))"""
    spans = sorted([(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), True) for t in written if t.numel()]
                   + [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), False) for t in read if t.numel()])
    end_written = end_any = -1  # the furthest end so far of the written spans / of all spans
    for lo, hi, w in spans:
        if lo < end_written or (w and lo < end_any):
            return True
        end_any = max(end_any, hi)
        if w:
            end_written = max(end_written, hi)
    return False


def make_table(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor] | None,
               groups: list[int], num_groups: int, restart=None, block: int = BLOCK) -> SGDTable:
    """The table for one step over `params` (slot order). grads[i] and bufs[i] must have params[i]'s shape,
    dtype, device and strides, and every parameter must be dense (non-overlapping); bufs None: no momentum.
    No two parameters or buffers may share memory, nor a gradient with one of them: every chunk is updated
    by its own program, all at once, so shared memory would be a race (torch.optim.SGD would update twice).
    restart: per slot, 1 = the buffer restarts at d_p (a list of bools or a device tensor; default all 1).
    Hyper-parameters start unset (`set_hyperparameters`); scalars[2] (inverse loss scale) is 1."""
    if not params:
        raise ValueError("fused_sgd: make_table needs at least one parameter")
    if block < VECTOR_BYTES or block & (block - 1):
        raise ValueError(f"fused_sgd: block {block} must be a power of two >= {VECTOR_BYTES}")
    device = params[0].device
    momentum = bufs is not None
    bufs = list(bufs) if momentum else list(params)
    for i, (p, g, b) in enumerate(zip(params, grads, bufs, strict=True)):
        if p.dtype not in _DTYPE_CODE:
            raise TypeError(f"fused_sgd: parameters of dtype {p.dtype} are not supported (float32, bfloat16, float16)")
        if p.device != device:
            raise ValueError("fused_sgd: all parameters of one table must be on one device")
        if not dense(p):
            raise ValueError(f"fused_sgd: parameter {i} (shape {tuple(p.shape)}) is not dense")
        for name, t in (("gradient", g), ("momentum buffer", b)):
            if t.shape != p.shape or t.dtype != p.dtype or t.device != device or not same_layout(t, p):
                raise ValueError(f"fused_sgd: the {name} of parameter {i} does not match it in shape, dtype, "
                                 f"device and strides")
    if len(groups) != len(params) or min(groups) < 0 or max(groups) >= num_groups:
        raise ValueError("fused_sgd: one group index per parameter, each in [0, num_groups)")
    if _overlap(list(params) + (bufs if momentum else []), list(grads)):
        raise ValueError("fused_sgd: parameters, gradients or momentum buffers share memory (views of one "
                         "tensor?); the fused step updates them concurrently: give each its own storage")

    # per slot, then per chunk (vectorized on the host: ResNet-50 has ~12k chunks)
    n = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    esize = torch.tensor([p.element_size() for p in params], dtype=torch.int64)
    vec = VECTOR_BYTES // esize
    code = torch.tensor([_DTYPE_CODE[p.dtype] for p in params], dtype=torch.int64)
    base = torch.tensor([[p.data_ptr(), g.data_ptr(), b.data_ptr()] for p, g, b in zip(params, grads, bufs)],
                        dtype=torch.int64)
    per = ((n + block - 1) // block).clamp_min(1)                # chunks per slot (an empty tensor: one, NUMEL 0)
    slot = torch.repeat_interleave(torch.arange(len(params)), per)
    first = torch.cumsum(per, 0) - per
    start = (torch.arange(slot.numel()) - first[slot]) * block
    numel = torch.minimum(n[slot] - start, torch.tensor(block))
    addr = base[slot] + (start * esize[slot])[:, None]
    aligned = ((addr % VECTOR_BYTES) == 0).all(1) & (numel % vec[slot] == 0)
    flags = torch.ones(len(params), dtype=torch.int64) if restart is None else torch.as_tensor(restart)
    if flags.shape != (len(params),):
        raise ValueError("fused_sgd: restart must hold one flag per parameter")
    rec = torch.zeros(slot.numel(), RECORD, dtype=torch.int64)
    rec[:, PARAM:BUF + 1] = addr
    rec[:, NUMEL], rec[:, GROUP], rec[:, SLOT], rec[:, START] = numel, torch.tensor(groups)[slot], slot, start
    # segments: by dtype, aligned first; stable, so a tensor's chunks stay in order
    key = code[slot] * 2 + (~aligned).to(torch.int64)
    order = torch.sort(key, stable=True).indices
    rec, key = rec[order], key[order]
    segments, lo = [], 0
    names = {c: dt for dt, c in _DTYPE_CODE.items()}
    for k, count in zip(*torch.unique_consecutive(key, return_counts=True)):
        k, count = int(k), int(count)
        segments.append(Segment(names[k // 2], k % 2 == 0, lo, lo + count))
        lo += count
    rows = torch.arange(rec.shape[0])
    first_row = torch.full((len(params),), rec.shape[0]).scatter_reduce_(0, rec[:, SLOT], rows, "amin").tolist()
    addresses = tuple(t.data_ptr() for t in (*params, *grads, *(bufs if momentum else ())))
    rec = rec.to(device)
    rec[:, RESTART] = flags.to(device=device, dtype=torch.int64)[rec[:, SLOT]]  # no host read of device flags
    return SGDTable(params=list(params), bufs=bufs, groups=list(groups), first_row=first_row, records=rec,
                    segments=segments, hyper=torch.zeros(num_groups, 2, dtype=torch.float32, device=device),
                    scalars=torch.ones(3, dtype=torch.float32, device=device),
                    found_inf=torch.zeros(1, dtype=torch.float32, device=device), momentum=momentum, block=block,
                    addresses=addresses)


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
