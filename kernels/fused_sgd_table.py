"""The fused SGD step's table (kernels/fused_sgd.py launches over it): `make_table` packs the chunks of the
parameters into the int64 `records[C, RECORD]` (the fields PARAM ... START below; fused_sgd.py's docstring says
what each holds and how RESTART is kept) and sorts them into segments (dtype, aligned), one launch each;
`SGDTable` holds them with the device tensors of hyper-parameters, scalars and found_inf. No kernel here:
only the layout the kernels (Triton, kernels/fused_sgd.py; native, kernels/cuda/fused_sgd.h) read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK = 2048            # elements per program (chunk)
VECTOR_BYTES = 16       # 128-bit global accesses in the aligned variant
RECORD = 8              # int64 fields per chunk record
PARAM, GRAD, BUF, NUMEL, GROUP, RESTART, SLOT, START = range(RECORD)

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
