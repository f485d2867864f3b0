"""Fused k-nearest neighbours: distance + top-k in one pass, never building the Q x N distance matrix.

Pre-pass (`_norms_kernel`): once per call, every query's and support row's squared norm |r|^2 from the inputs'
own values, accumulated in fp64 and rounded once to fp32 (cosine: the reciprocal norm 1 / max(|r|, 1e-8)),
Q + N floats. A duplicate pair then gets d^2 = 2 (|q|^2 - q.x) from one rounding: the dot's own error only.

Stage 1 (`_knn_kernel`): program (i, s) takes BLOCK_Q queries and the s-th slice of the support. Per BLOCK_N
support tile the D-loop does only the dot products, on tensor cores (tl.dot, fp32 accumulation); the epilogue
makes the squared L2 distance |q|^2 + |x|^2 - 2 q.x (or the cosine distance 1 - q.x / (|q| |x|)) from the
pre-computed norms, and turns it into an int32 key: the float's bits (distances are made >= +0, NaN -> inf, so
the bits order like the values; 0x7FFFFFFF, above every real key, marks a dropped candidate: past the slice,
excluded). Selection: each row keeps its k best so far as int64 list entries (key << 32 | support index) and
its threshold, the key of its current k-th best. A tile element can enter only if its key is below the
threshold: the support is walked in increasing index, so on an equal key the list's entry (lower index) wins.
The row minimum of the tile is the filter: a tile where no row has a candidate costs one reduction. Otherwise
each round moves every row's smallest candidate (the lowest column among equal keys) into its list in place
of the list's largest entry (the largest key, then the largest index) and takes the next minimum, while any
row still has a candidate below its (falling) threshold. The list (int64, in the accumulator's layout) is in
registers; rows past Q and slots past k hold negative entries that are never the largest, so the threshold
is the k-th best and such rows never take a candidate.
Stage 2 (the launcher): torch.topk over the slices' lists, [Q, slices * k], exact on the int64 keys.

k > 64: the list of one pass holds 64 entries (registers); further passes find the next ranks above a lower
bound (the previous pass's last key and index, compared as a pair, so ties across passes are exact). Each pass
recomputes the distances: k = 100 costs two passes, k = 256 four.

Configurations (`candidates`, `pick_config`): a table per GPU architecture (sm_90: wgmma tiles; sm_80 and
every other GPU: mma.sync tiles), input dtype and dot precision, list slots (k) and row alignment, each entry a
short list whose first configuration is the default. On a GPU the first call of each key (architecture, dtype,
precision, list slots, alignment, class of D: the power of two >= D) times the list with triton.autotune and
keeps the winner for the process (`_WINNERS`); never under the interpreter (one small fixed tile: fast and
deterministic), never while a CUDA graph is captured (the known winner or the default),
SEAL_FAST_KNN_AUTOTUNE=0: always the default. All candidates of a key issue the same MMAs in the same order
along D, so the winner changes the speed, not the result. Every configuration compiles for its architecture
without spills under a 240-register cap (compile_specs, tests/test_kernel_static.py).

Addressing: row and column indices are int32 (queries, support rows and features at most MAX_ROWS =
2^31 - 4096, so index + tile stays below 2^31); every product of an index and a stride is int64, so any strides
work (e.g. column-major views, feats.T, whose offsets pass 2^31 elements). The slices are the grid's y
dimension: at most 65,535.

Extra memory: the keys, Q x slices x k x 8 bytes, and the norms, (Q + N) x 4 bytes; never O(Q x N).
Ties: equal distances are ordered by the lower support index (the exact rule of the reference).
fp32 inputs use TF32 tensor cores only where torch.mm would (torch.backends.cuda.matmul.fp32_precision = "tf32",
or the legacy allow_tf32).
Interpreter: Triton 3.8's interpreted tl.dot returns garbage for bfloat16 operands, so under
TRITON_INTERPRET=1 bf16 tiles are upcast (exactly) to fp32 before the dot; compiled code is unaffected.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_K = 256
K_PER_PASS = 64        # list entries one pass keeps in registers; larger k runs ceil(k / 64) passes
_SENTINEL = 2**63 - 1  # larger than every real key: real keys have a clear sign bit and bits < 0x7FC00001 << 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORMS_GPU = (8, 256, 4)  # the norm pre-pass on a GPU: BLOCK_R, BLOCK_D, num_warps
MAX_ROWS = 2**31 - 4096  # queries, support rows, features: int32 indices, with a tile of headroom below 2^31
MAX_SPLITS = 65535       # slices of the support: the CUDA grid's y dimension


@triton.jit
def _norms_kernel(x_ptr, out_ptr, R, D, stride_r, stride_d, COSINE: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """out[r] = sum_d x[r, d]^2, accumulated in fp64 and rounded once to fp32 (COSINE: 1 / max(sqrt(that), 1e-8))."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # < R + BLOCK_R <= MAX_ROWS + 16: no int32 overflow
    rmask = rr < R
    rd = tl.arange(0, BLOCK_D)
    # 64-bit offsets: a column-major x (stride_d = R) passes 2^31 elements at R * BLOCK_D >= 2^31
    ptrs = x_ptr + rr[:, None].to(tl.int64) * stride_r + rd[None, :].to(tl.int64) * stride_d
    step = tl.cast(stride_d, tl.int64) * BLOCK_D
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(ptrs, mask=rmask[:, None] & (rd[None, :] < D - d0), other=0.0).to(tl.float64)
        acc += tl.sum(x * x, axis=1)
        ptrs += step
    if COSINE:
        acc = 1.0 / tl.maximum(tl.sqrt(acc), 1e-8)
    tl.store(out_ptr + rr, acc.to(tl.float32), mask=rmask)


@triton.jit(do_not_specialize=["tune_arch", "tune_d", "tune_aligned"])
def _knn_kernel(q_ptr, x_ptr, qn_ptr, xn_ptr, lb_ptr, excl_ptr, out_ptr, Q, N, D, K, per_split,
                stride_qm, stride_qd, stride_xn, stride_xd, tune_arch, tune_d, tune_aligned,
                KP: tl.constexpr, COSINE: tl.constexpr, EXCLUDE: tl.constexpr, LOWER: tl.constexpr,
                SELECT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # tune_arch, tune_d, tune_aligned: unused here, the autotuner's key (the GPU's architecture, the class of D,
    # 16-byte aligned rows). Row and column indices stay int32 (< MAX_ROWS + a tile: no overflow); every offset
    # that multiplies an index by a stride is int64.
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = rq < Q
    rq_ld = tl.minimum(rq, Q - 1)            # rows past Q load row Q - 1 (never stored): no load masks
    rd = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    slot = tl.arange(0, KP)
    qn = tl.load(qn_ptr + rq_ld)             # |q|^2 (cosine: 1 / |q|)
    # The running list: slots < K start as distinct sentinels (so "the slot holding the row's largest entry" is
    # unique); slots >= K, and every slot of a row past Q, hold negative values that are never the largest, so
    # the threshold is the K-th best (rows past Q: -1, below every key: they never take a candidate).
    live = qmask[:, None] & (slot[None, :] < K)
    best = tl.where(live, 9223372036854775807 - slot[None, :].to(tl.int64), -1 - slot[None, :].to(tl.int64))
    worst = tl.max(best, axis=1)
    thr = (worst >> 32).to(tl.int32)
    if EXCLUDE:
        skip = tl.load(excl_ptr + rq_ld)
    if LOWER:  # later pass: only (key, index) pairs above the previous pass's last one
        lb = tl.load(lb_ptr + rq_ld)
        lb_key = (lb >> 32).to(tl.int32)
        lb_idx = (lb & 0xFFFFFFFF).to(tl.int32)
    rowmin = tl.full((BLOCK_Q,), 2147483647, dtype=tl.int32)
    n_lo = pid_s * per_split                  # < N: the launcher makes no empty slice
    n_hi = n_lo + tl.minimum(N - n_lo, per_split)  # not min(N, n_lo + per_split): that sum can pass 2^31
    q_step = tl.cast(stride_qd, tl.int64) * BLOCK_D
    x_step = tl.cast(stride_xd, tl.int64) * BLOCK_D
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + cols
        rn_ld = tl.minimum(rn, N - 1)
        qp = q_ptr + rq_ld[:, None].to(tl.int64) * stride_qm + rd[None, :].to(tl.int64) * stride_qd
        xp = x_ptr + rn_ld[None, :].to(tl.int64) * stride_xn + rd[:, None].to(tl.int64) * stride_xd  # [D, N] tile
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                q = tl.load(qp)
                xt = tl.load(xp)
            else:
                q = tl.load(qp, mask=rd[None, :] < D - d0, other=0.0)
                xt = tl.load(xp, mask=rd[:, None] < D - d0, other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong; exact upcast values give the same products
                acc = tl.dot(q.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(q, xt, acc, input_precision=PRECISION)
            qp += q_step
            xp += x_step
        xn = tl.load(xn_ptr + rn_ld)
        if COSINE:
            dist = 1.0 - acc * (qn[:, None] * xn[None, :])
        else:
            # one rounding after the exact doubling (an FMA on the GPU): a duplicate pair (|q|^2 = |x|^2) gets
            # exactly 2 (|q|^2 - q.x), the dot's own rounding, with no extra cancellation
            dist = (qn[:, None] + xn[None, :]) - 2.0 * acc
        # NaN -> inf; then bits < 0 (negative rounding, -0.0) -> +0.0: the int32 bits order like the values
        dist = tl.where(dist != dist, float("inf"), dist)
        key = tl.maximum(dist.to(tl.int32, bitcast=True), 0)
        drop = rn[None, :] >= n_hi
        if EXCLUDE:
            drop = drop | (rn[None, :] == skip[:, None])
        if LOWER:
            drop = drop | (key < lb_key[:, None]) | ((key == lb_key[:, None]) & (rn[None, :] <= lb_idx[:, None]))
        key = tl.where(drop, 2147483647, key)
        if SELECT:
            low = tl.min(key, axis=1)  # the filter: most tiles of a long slice stop here for most rows
            while tl.max((low < thr).to(tl.int32), axis=0) > 0:
                take = low < thr
                col = tl.min(tl.where(key == low[:, None], cols[None, :], BLOCK_N), axis=1)  # lowest on ties
                entry = (low.to(tl.int64) << 32) | (n0 + col).to(tl.int64)
                best = tl.where(take[:, None] & (best == worst[:, None]), entry[:, None], best)
                key = tl.where(cols[None, :] == col[:, None], 2147483647, key)
                worst = tl.max(best, axis=1)
                thr = (worst >> 32).to(tl.int32)
                low = tl.min(key, axis=1)
        else:  # benchmark: distances only, the selection reduced to each row's minimum key
            rowmin = tl.minimum(rowmin, tl.min(key, axis=1))
    # out is [Q, slices, K]: each query's lists side by side, so the caller's view [Q, slices * K] is free
    row = (rq.to(tl.int64) * tl.num_programs(1) + pid_s) * K
    if SELECT:
        tl.store(out_ptr + row[:, None] + slot[None, :], best, mask=live)
    else:
        tl.store(out_ptr + row, rowmin.to(tl.int64) << 32, mask=qmask)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Config:
    """One launch configuration of `_knn_kernel`: tile, warps, pipeline stages."""
    block_q: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def triton(self) -> triton.Config:
        """The same as a triton.Config (one object per Config, so the autotuner's choice maps back)."""
        if self not in _TRITON_CONFIGS:
            _TRITON_CONFIGS[self] = triton.Config({"BLOCK_Q": self.block_q, "BLOCK_N": self.block_n,
                                                   "BLOCK_D": self.block_d}, num_warps=self.num_warps,
                                                  num_stages=self.num_stages, maxnreg=MAXNREG)
        return _TRITON_CONFIGS[self]

    @staticmethod
    def of(c: triton.Config) -> "Config":
        return Config(c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)


_TRITON_CONFIGS: dict[Config, triton.Config] = {}


_INTERPRETER = Config(16, 32, 32, 4, 1)  # under TRITON_INTERPRET=1: small tiles, where each op is numpy
# Every launch of `_knn_kernel` caps the registers (PTX .maxnreg) at 240: two 4-warp blocks per SM, 15 below the
# hardware's 255. Without a cap, ptxas may trade registers for occupancy: for a 128-thread block it sometimes
# stops at 168 or 128 registers (3 or 4 blocks per SM) and spills (e.g. sm_80 bf16 64x64x32 k = 10: 168
# registers, 36 bytes of spill stores; capped, 206 and none), and which configurations it does that to changes
# with the code and the compiler. Every shipped configuration compiles under the cap without spills (sm_90 and
# sm_80, Triton 3.6 / ptxas 12.8 and Triton 3.8 / ptxas 12.9); a compiler that needs more shows it as spills
# in tests/test_kernel_static.py, and the cap can rise to 255 before any configuration must change.
MAXNREG = 240


def arch_of(device) -> int | None:
    """The configuration table a device uses: 90 (Hopper: wgmma) for compute capability 9.x, 80 (mma.sync tiles,
    valid on every later GPU too) for every other CUDA device; None for the interpreter (CPU)."""
    if _interpreted() or torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


def list_slots(k: int) -> int:
    """KP: the power of two >= the list length of one pass (k, at most K_PER_PASS), at least 16."""
    return max(16, triton.next_power_of_2(min(k, K_PER_PASS)))


def d_class(d: int) -> int:
    """The feature-dimension class the autotuner keys on: the power of two >= D, within [16, 32768]."""
    return min(max(16, triton.next_power_of_2(d)), 32768)


def candidates(arch: int | None, dtype: torch.dtype, precision: str | None, kp: int,
               aligned: bool = True) -> tuple[Config, ...]:
    """The configurations the launcher may run for (architecture, input dtype, dot precision, list slots KP,
    16-byte aligned rows); the first is the default (no tuning), the others what the GPU autotuner also times.
    Every one compiles for its architecture without register spills (compile_specs; tests/test_kernel_static.py).

    Registers bound them: the accumulator (BLOCK_Q x BLOCK_N fp32) and the list (BLOCK_Q x KP int64) live in
    registers, and two blocks must share an SM (MAXNREG = 240 registers at 4 warps) so that one block's selection
    overlaps the other's MMAs. sm_90: BLOCK_Q = 64 with 4 warps is one warpgroup, wgmma (M = 64) for every k, and
    every row of a tile inside one warp, so the selection's row reductions are warp shuffles. The candidates of a
    key differ in tiles, stages and D steps only: each output element gets the same products accumulated in the
    same order along D, so the distances, and the result, do not depend on which one wins (on a GPU:
    test_cuda_every_candidate_agrees_and_the_winner_is_cached). Unaligned rows (not 16-byte: no 128-bit
    cp.async) are loaded element-wise through registers: short BLOCK_D steps. fp32 "ieee": the CUDA-core FMA
    dot, operands in registers."""
    if arch is None:
        return (_INTERPRETER,)
    return _TABLE[(arch, _kind(dtype, precision), kp, aligned)]


def _kind(dtype: torch.dtype, precision: str | None) -> str:
    return {torch.bfloat16: "16", torch.float16: "16"}.get(dtype, "ieee" if precision == "ieee" else "tf32")


def _build_table() -> dict:
    """(arch, kind, KP, aligned) -> candidates, the default first. kind: "16" (bf16 / fp16), "tf32", "ieee" (fp32
    on CUDA cores). Chosen on the compiled code (bench/kernel_report.py, both archs, Triton 3.6 and 3.8): no
    spills under the MAXNREG cap. sm_90's defaults for aligned rows are the configurations that ran on the H200
    (2026-12); its unaligned ones replace the old 254-255-register tiles (no headroom); the other candidates, and
    all of sm_80, are the autotuner's to judge (not yet timed on a GPU)."""
    C = Config
    t = {}
    for kp in (16, 32, 64):
        wide = kp <= 32  # KP = 64: the list takes the accumulator's registers
        # sm_90: wgmma, BLOCK_Q = 64 (one warpgroup) everywhere
        t[(90, "16", kp, True)] = ((C(64, 128, 64, 4, 3), C(64, 64, 64, 4, 3), C(64, 128, 64, 4, 4)) if wide else
                                   (C(64, 64, 64, 4, 3), C(64, 64, 64, 4, 4), C(64, 64, 128, 4, 3)))
        t[(90, "16", kp, False)] = ((C(64, 64, 16, 4, 2), C(64, 32, 32, 4, 2)) if wide else
                                    (C(64, 32, 16, 4, 2), C(64, 32, 32, 4, 2)))
        t[(90, "tf32", kp, True)] = ((C(64, 128, 32, 4, 3), C(64, 64, 32, 4, 3), C(64, 128, 32, 4, 4)) if wide else
                                     (C(64, 64, 32, 4, 3), C(64, 64, 32, 4, 4), C(64, 64, 64, 4, 3)))
        t[(90, "tf32", kp, False)] = ((C(64, 64, 16, 4, 2), C(64, 32, 16, 4, 2)) if wide else
                                      (C(64, 32, 16, 4, 2),))
        t[(90, "ieee", kp, True)] = (C(32, 64, 16, 4, 2), C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        t[(90, "ieee", kp, False)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        # sm_80: mma.sync; the accumulator layout costs more registers than wgmma's, so smaller tiles
        t[(80, "16", kp, True)] = ((C(64, 64, 32, 4, 3), C(32, 64, 64, 4, 3), C(64, 32, 64, 4, 3)) if wide else
                                   (C(32, 64, 64, 4, 3), C(64, 32, 64, 4, 3), C(32, 64, 32, 4, 3)))
        t[(80, "16", kp, False)] = ((C(32, 32, 32, 4, 2), C(64, 32, 16, 4, 2)) if wide else
                                    (C(32, 32, 32, 4, 2), C(32, 64, 16, 4, 2)))
        t[(80, "tf32", kp, True)] = (C(32, 64, 32, 4, 3), C(64, 32, 32, 4, 3))
        t[(80, "tf32", kp, False)] = (C(32, 32, 16, 4, 2), C(32, 64, 16, 4, 2) if wide else C(64, 32, 16, 4, 2))
        t[(80, "ieee", kp, True)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        t[(80, "ieee", kp, False)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
    return t


ARCHS = (90, 80)  # the architectures the tables are made (and compiled, by compile_specs) for
_TABLE = _build_table()


def pick_config(arch: int | None, dtype: torch.dtype, precision: str | None, k: int, d: int,
                aligned: bool = True) -> Config:
    """The configuration a call runs with for (architecture, dtype, precision, k, D, alignment): the autotuner's
    winner for that key once one is known, else the table's default (`candidates(...)[0]`)."""
    kp = list_slots(k)
    return _WINNERS.get(_tune_key(arch, dtype, precision, kp, d, aligned)) or candidates(arch, dtype, precision, kp,
                                                                                           aligned)[0]


def _tune_key(arch, dtype, precision, kp, d, aligned) -> tuple:
    return arch, dtype, precision, kp, d_class(d), aligned


_WINNERS: dict[tuple, Config] = {}  # the autotuner's winners, by _tune_key (the launcher's own record of them)
# SEAL_FAST_KNN_AUTOTUNE=0: always the table's defaults (no timing on the first call of each key)
AUTOTUNE = os.environ.get("SEAL_FAST_KNN_AUTOTUNE", "1") != "0"


def _bench(fn, quantiles):
    """The autotuner's timer (triton.testing.do_bench, what it uses by default); a test may replace it."""
    from triton.testing import do_bench

    return do_bench(fn, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """The autotuner's list for this call: the candidates of its (architecture, dtype, precision, KP, alignment)."""
    arch = named_args["tune_arch"] or None
    group = candidates(arch, named_args["q_ptr"].dtype, kwargs["PRECISION"], kwargs["KP"],
                       bool(named_args["tune_aligned"]))
    return [c.triton() for c in group]


def _all_candidates() -> list:
    return [c.triton() for c in dict.fromkeys(c for group in _TABLE.values() for c in group)]


# EVEN_D follows BLOCK_D, which the autotuner chooses
_knn_launch = triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})(_knn_kernel)
_knn_tuned = triton.autotune(
    configs=_all_candidates(),
    # the dtypes of the tensor arguments join the key by themselves; constexprs outside the key (COSINE, EXCLUDE,
    # LOWER, SELECT) reuse the winner of their key
    key=["tune_arch", "tune_d", "tune_aligned", "KP", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=lambda fn, quantiles: _bench(fn, quantiles))(_knn_launch)


def _tuning(device: torch.device) -> bool:
    """Time the candidates on this call (for a key without a winner yet)? Only on a GPU, never under the
    interpreter (deterministic, fast tests) and never while a CUDA graph is being captured (timing runs would be
    captured; the graph gets the known winner or the default instead)."""
    return AUTOTUNE and device.type == "cuda" and not _interpreted() and not torch.cuda.is_current_stream_capturing()


def _precision(dtype: torch.dtype) -> str | None:
    """16-bit inputs: tensor cores (Triton's default); fp32: exact unless torch allows TF32, like torch.mm."""
    if dtype == torch.float32:
        return "tf32" if _tf32_allowed() else "ieee"
    return None


def _tf32_allowed() -> bool:
    """Whether torch.mm may use TF32 for fp32: torch.backends.cuda.matmul.fp32_precision (torch >= 2.9; it also
    reflects the global torch.backends.fp32_precision and the legacy flag), else the legacy allow_tf32. Reading
    allow_tf32 raises once TF32 has been enabled through the new API ("mix of the legacy and new APIs")."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _check(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str, exclude, pad: bool,
           splits=None) -> None:
    if metric not in ("l2", "cosine"):
        raise ValueError(f"knn_topk: metric {metric!r}: choose 'l2' or 'cosine'")
    if queries.dim() != 2 or support.dim() != 2:
        raise ValueError(f"knn_topk: queries and support must be 2-D [rows, features], got {tuple(queries.shape)} "
                         f"and {tuple(support.shape)}")
    (q, d), (n, d2) = queries.shape, support.shape
    if q == 0 or n == 0 or d == 0:
        raise ValueError(f"knn_topk: empty input (queries {tuple(queries.shape)}, support {tuple(support.shape)})")
    if d != d2:
        raise ValueError(f"knn_topk: queries have {d} features but the support has {d2}")
    if queries.dtype != support.dtype or queries.dtype not in _DTYPES:
        raise TypeError(f"knn_topk: queries ({queries.dtype}) and support ({support.dtype}) must share one dtype of "
                        "float32, bfloat16, float16")
    if queries.device != support.device:
        raise ValueError(f"knn_topk: queries on {queries.device}, support on {support.device}; put both on one device")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"knn_topk: k = {k}; it must be between 1 and {MAX_K}")
    if k > n and not pad:
        raise ValueError(f"knn_topk: k = {k} neighbours asked for, but the support has only {n} points")
    for what, count in (("support points", n), ("queries", q), ("features", d)):
        if count > MAX_ROWS:
            raise ValueError(f"knn_topk: {count} {what}; at most {MAX_ROWS} (2^31 - 4096: int32 indices with a "
                             "tile of headroom) are supported: split the call")
    if exclude is not None and (exclude.shape != (q,) or exclude.dtype != torch.int64):
        raise ValueError(f"knn_topk: exclude must be an int64 tensor of shape [{q}] (one support index per query, "
                         f"-1 for none), got {exclude.dtype} {tuple(exclude.shape)}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, numbers.Integral)
                               or not 1 <= splits <= MAX_SPLITS):
        raise ValueError(f"knn_topk: splits = {splits!r}; it must be an integer between 1 and {MAX_SPLITS} (the "
                         "CUDA grid's y limit)")


def decode(keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (distance float32, index int64); missing neighbours (sentinels) -> (inf, -1)."""
    missing = keys >= _SENTINEL - MAX_K
    dist = (keys >> 32).to(torch.int32).view(torch.float32)
    if metric == "l2":
        dist = dist.sqrt()
    idx = keys & 0xFFFFFFFF
    return dist.masked_fill(missing, float("inf")), idx.masked_fill(missing, -1)


def _norms(x: torch.Tensor, cosine: bool) -> torch.Tensor:
    """fp32 [rows]: |x_r|^2, or 1 / max(|x_r|, 1e-8) for cosine (the pre-pass, one small launch)."""
    r, d = x.shape
    out = torch.empty(r, dtype=torch.float32, device=x.device)
    block_r, block_d, warps = (16, 32, 4) if x.device.type != "cuda" else _NORMS_GPU
    _norms_kernel[(triton.cdiv(r, block_r),)](x, out, r, d, x.stride(0), x.stride(1), COSINE=cosine,
                                              BLOCK_R=block_r, BLOCK_D=block_d,
                                              **({} if _interpreted() else {"num_warps": warps}))
    return out


def _aligned(x: torch.Tensor) -> bool:
    """Rows the kernel can copy 16 bytes at a time: unit stride along D, 16-aligned row stride and base (what
    Triton's launch specialisation sees: an integer divisible by 16, a 16-byte aligned pointer)."""
    return x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0


def default_splits(q_blocks: int, n: int, k: int, block_n: int, sms: int) -> int:
    """Slices of the support per query block: enough programs to fill the GPU (4 per SM; 1 without a GPU), but
    the lists they return (Q x slices x k int64 keys, the only buffer that grows with the slices) stay within
    1/40 of a Q x N fp32 distance matrix: slices <= N / (80 k). On an H200 (132 SMs) Q = 1,000, N = 20,000,
    k = 30 once took 33 slices, 7.9 MB of keys (and as much again for a reordering copy, since removed)."""
    fill = triton.cdiv(4 * sms, q_blocks) if sms else 1
    return max(1, min(triton.cdiv(n, block_n), fill, n // (80 * k), MAX_SPLITS))


def _device(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs' one (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stage1(queries, support, qn, xn, k, cosine, exclude, lower, splits, select=True):
    """One pass of the fused kernel: [Q, slices * k] int64 keys (each slice's list unsorted)."""
    (q, d), n = queries.shape, support.shape[0]
    precision = _precision(queries.dtype)
    kp = list_slots(k)
    arch = arch_of(queries.device)
    aligned = _aligned(queries) and _aligned(support)
    group = candidates(arch, queries.dtype, precision, kp, aligned)
    # the slices are whole tiles of every candidate, so they (and the keys buffer) do not depend on the winner
    grain = max(c.block_n for c in group)
    if splits is None:
        sms = torch.cuda.get_device_properties(queries.device).multi_processor_count \
            if queries.device.type == "cuda" else 0
        splits = default_splits(triton.cdiv(q, group[0].block_q), n, k, grain, sms)
    per_split = triton.cdiv(triton.cdiv(n, splits), grain) * grain
    splits = triton.cdiv(n, per_split)  # every slice starts below N
    width = k if select else 1
    keys = torch.empty(q, splits, width, dtype=torch.int64, device=queries.device)
    any_ptr = keys  # any pointer; not read without EXCLUDE / LOWER
    args = (queries, support, qn, xn, lower if lower is not None else any_ptr,
            exclude if exclude is not None else any_ptr, keys, q, n, d, width, per_split,
            queries.stride(0), queries.stride(1), support.stride(0), support.stride(1), arch or 0, d_class(d),
            int(aligned))
    consts = dict(KP=kp, COSINE=cosine, EXCLUDE=exclude is not None, LOWER=lower is not None, SELECT=select,
                  PRECISION=precision, UPCAST=_interpreted() and queries.dtype == torch.bfloat16)
    key = _tune_key(arch, queries.dtype, precision, kp, d, aligned)
    if len(group) > 1 and _tuning(queries.device):
        _knn_tuned[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]), splits)](*args, **consts)
        _WINNERS[key] = Config.of(_knn_tuned.best_config)
    else:
        cfg = _WINNERS.get(key) or group[0]
        _knn_launch[(triton.cdiv(q, cfg.block_q), splits)](
            *args, **consts, BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            **({} if _interpreted() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                          "maxnreg": MAXNREG}))
    return keys.view(q, splits * width)


def _topk_torch(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str = "l2",
                exclude: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """knn_topk in PyTorch ops (backend "torch", the CPU default): fp32 distances by the matrix-product
    expansion, `chunk` queries at a time (chunk x N memory), a stable sort for the tie rule."""
    q_all, n = queries.shape[0], support.shape[0]
    x = support.float()
    xn = (x * x).sum(1)
    dists, idxs = [], []
    for lo in range(0, q_all, chunk):
        q = queries[lo:lo + chunk].float()
        qn = (q * q).sum(1)
        dot = q @ x.T
        if metric == "cosine":
            d = 1 - dot / (qn.sqrt().clamp_min(1e-8)[:, None] * xn.sqrt().clamp_min(1e-8)[None, :])
        else:
            d = qn[:, None] - 2 * dot + xn[None, :]
        d = d.clamp_min(0).nan_to_num(nan=float("inf"))
        if exclude is not None:
            e = exclude[lo:lo + chunk].to(d.device)
            hit = (e >= 0) & (e < n)
            rows, cols = hit.nonzero().squeeze(1), e[hit]
            d[rows, cols] = float("inf")
            invalid = torch.zeros_like(d, dtype=torch.bool)
            invalid[rows, cols] = True
        d, order = torch.sort(d, dim=1, stable=True)
        d, order = d[:, :k], order[:, :k]
        if exclude is not None:
            order = torch.where(invalid.gather(1, order), -1, order)
        if metric == "l2":
            d = d.sqrt()
        if d.shape[1] < k:  # fewer support points than k
            pad = k - d.shape[1]
            d = torch.cat([d, d.new_full((d.shape[0], pad), float("inf"))], 1)
            order = torch.cat([order, order.new_full((order.shape[0], pad), -1)], 1)
        dists.append(d.masked_fill(order < 0, float("inf")))
        idxs.append(order)
    return torch.cat(dists), torch.cat(idxs)


def knn_topk(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str = "l2",
             exclude: torch.Tensor | None = None, pad: bool = False, splits: int | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest support rows of every query: (dist float32 [Q, k], index int64 [Q, k]), nearest first;
    equal distances are ordered by the lower index.

    queries [Q, D], support [N, D]: float32, bfloat16 or float16 (one dtype), any strides; fp32 accumulation.
    metric "l2": Euclidean distance (like torch.cdist); "cosine": 1 - cosine similarity.
    exclude: int64 [Q], a support index each query may not return (-1: none), e.g. torch.arange(Q) when the
      queries are the first Q support points (probing training points without counting themselves).
    pad: allow k > N (or fewer than k candidates after exclusion): missing neighbours come back as (inf, -1).
    splits: slices of the support per query block, 1 to 65,535 (default: enough programs to fill the GPU).
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else PyTorch ops), "triton", "torch".
    On a GPU the first call of each shape class times a few kernel configurations (see the module docstring;
    SEAL_FAST_KNN_AUTOTUNE=0 turns that off); the results do not depend on which one wins."""
    _check(queries, support, k, metric, exclude, pad, splits)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"knn_topk: backend {backend!r}: choose auto, triton or torch")
    if backend == "torch" or (backend == "auto" and queries.device.type != "cuda" and not _interpreted()):
        return _topk_torch(queries, support, k, metric, exclude)
    cosine = metric == "cosine"
    if exclude is not None:  # the kernel reads exclude[i] at offset i: on the queries' device, contiguous
        exclude = exclude.to(queries.device).contiguous()
    with _device(queries.device):
        qn, xn = _norms(queries, cosine), _norms(support, cosine)
        found, lower = [], None
        for lo in range(0, k, K_PER_PASS):  # one pass for k <= K_PER_PASS
            part = min(K_PER_PASS, k - lo)
            keys = _stage1(queries, support, qn, xn, part, cosine, exclude, lower, splits)
            keys = torch.topk(keys, part, dim=1, largest=False, sorted=True).values  # the lists come unsorted
            found.append(keys)
            lower = keys[:, -1].contiguous()  # the next pass takes only pairs (key, index) above this one
        return decode(found[0] if len(found) == 1 else torch.cat(found, 1), metric)


def merge_topk(best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor],
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running k nearest over a support streamed in chunks: merge `best` (dist, index [Q, k], the chunks
    so far) with `new` (the next chunk's knn_topk, its indices already global and all above best's). Keeps
    knn_topk's order: nearest first, equal distances by the lower index (best's come first, and the sort is
    stable). Start from (inf, -1): `empty_topk`."""
    d_all, i_all = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    d_all, order = torch.sort(d_all, dim=1, stable=True)
    return d_all[:, :k], i_all.gather(1, order[:, :k])


def empty_topk(rows: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What merge_topk starts from: no neighbours yet, (inf, -1) everywhere."""
    return (torch.full((rows, k), float("inf"), device=device),
            torch.full((rows, k), -1, dtype=torch.int64, device=device))


def knn_distance_pass(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str = "l2") -> torch.Tensor:
    """Benchmark probe (bench/bench_knn.py): the kernel knn_topk launches for this k, with the same tiles,
    D-loop and distance epilogue, but the selection replaced by each row's running minimum: float32 [Q], the
    nearest distance of each query (= knn_topk(...)[0][:, 0]). Its time is knn_topk's without the top-k."""
    _check(queries, support, k, metric, None, False)
    cosine = metric == "cosine"
    with _device(queries.device):
        qn, xn = _norms(queries, cosine), _norms(support, cosine)
        keys = _stage1(queries, support, qn, xn, min(k, K_PER_PASS), cosine, None, None, None, select=False)
        return decode(keys.min(dim=1).values, metric)[0]


_SPEC_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SPEC_K = {16: 10, 32: 30, 64: 64}  # a k of each list-slot bucket


def knn_spec(arch: int, name: str, precision: str | None, kp: int, aligned: bool, cfg: Config, flavour: str):
    """One `_knn_kernel` configuration as a KernelSpec for `arch` (sm_90 / sm_80). flavour "plain": l2, D a
    multiple of BLOCK_D when the rows are aligned; "full": every option on (cosine, exclude, a later pass of
    k > 64 when KP = 64, a ragged last D step): the most live values; "distances": the benchmark's
    distances-only variant. Aligned: unit stride along D (the launch specialises a stride of 1 to a constant),
    16-aligned pointers, row strides and D, as [*, 2048] tensors; unaligned: nothing divisible by 16, e.g. rows
    of D = 2065 ("plain"), or a column-major view with runtime strides along D ("full")."""
    from .compile_spec import KernelSpec

    full, select = flavour == "full", flavour != "distances"
    lower = full and kp == K_PER_PASS
    even_d = aligned and not full
    k = _SPEC_K[kp]
    sig = {"q_ptr": f"*{name}", "x_ptr": f"*{name}", "qn_ptr": "*fp32", "xn_ptr": "*fp32", "lb_ptr": "*i64",
           "excl_ptr": "*i64", "out_ptr": "*i64", "Q": "i32", "N": "i32", "D": "i32", "K": "i32", "per_split": "i32",
           "stride_qm": "i32", "stride_qd": "i32", "stride_xn": "i32", "stride_xd": "i32", "tune_arch": "i32",
           "tune_d": "i32", "tune_aligned": "i32"}
    const = {"KP": kp, "COSINE": full, "EXCLUDE": full, "LOWER": lower, "SELECT": select, "PRECISION": precision,
             "UPCAST": False, "EVEN_D": even_d, "BLOCK_Q": cfg.block_q, "BLOCK_N": cfg.block_n,
             "BLOCK_D": cfg.block_d}
    if aligned or not full:  # unaligned "full": a column-major view, runtime strides along D
        const.update(stride_qd=1, stride_xd=1)
    sig.update({n: "constexpr" for n in const})
    divisible = ("qn_ptr", "xn_ptr", "lb_ptr", "excl_ptr", "out_ptr", "per_split")
    divisible += ("q_ptr", "x_ptr", "stride_qm", "stride_xn", "D") if aligned else ()
    tag = f"{name}-{precision}" if precision else name
    label = (f"knn sm_{arch} {tag} kp{kp} {cfg.block_q}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} "
             f"s{cfg.num_stages} {flavour}" + ("" if aligned else " unaligned"))
    return KernelSpec(label, _knn_kernel, sig, const, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                      divisible=divisible, arch=arch, maxnreg=MAXNREG,
                      facts={"kernel": "knn", "arch": arch, "dtype": name, "precision": precision or name, "k": k,
                             "kp": kp, "metric": "cosine" if full else "l2", "exclude": full, "later_pass": lower,
                             "select": select, "even_d": even_d, "aligned": aligned, "flavour": flavour,
                             "default": cfg == candidates(arch, _SPEC_DTYPES[name], precision, kp, aligned)[0],
                             "tensor_cores": precision != "ieee",
                             "tile": [cfg.block_q, cfg.block_n, cfg.block_d],
                             "config": [cfg.block_q, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages]})


def compile_specs() -> list:
    """Every configuration the launcher can run on a GPU, from the same tables (candidates, list_slots,
    _precision), each for its own architecture (sm_90 and sm_80; bench/kernel_report.py compiles them): per
    architecture, input dtype and dot precision, list-slot bucket (k = 10, 30, 64: KP 16 / 32 / 64) and row
    alignment, every autotune candidate in its "plain" and its "full" flavour (knn_spec), the benchmark's
    distances-only variant of the default for k = 30, and the norm pre-pass (for any architecture)."""
    from .compile_spec import KernelSpec

    specs = []
    kinds = [("fp32", "ieee"), ("fp32", "tf32"), ("bf16", None), ("fp16", None)]
    for arch in ARCHS:
        for name, precision in kinds:
            for kp in (16, 32, 64):
                for aligned in (True, False):
                    group = candidates(arch, _SPEC_DTYPES[name], precision, kp, aligned)
                    for cfg in group:
                        specs += [knn_spec(arch, name, precision, kp, aligned, cfg, f) for f in ("plain", "full")]
                    if kp == 32 and aligned:
                        specs.append(knn_spec(arch, name, precision, kp, aligned, group[0], "distances"))
    for name in ("fp32", "bf16", "fp16"):
        for cosine in (False, True):
            block_r, block_d, warps = _NORMS_GPU
            specs.append(KernelSpec(
                f"norms {name}" + (" cosine" if cosine else ""), _norms_kernel,
                {"x_ptr": f"*{name}", "out_ptr": "*fp32", "R": "i32", "D": "i32", "stride_r": "i32",
                 "stride_d": "constexpr", "COSINE": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                {"stride_d": 1, "COSINE": cosine, "BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps=warps,
                divisible=("x_ptr", "out_ptr", "stride_r", "D"),
                facts={"kernel": "norms", "dtype": name, "metric": "cosine" if cosine else "l2",
                       "tensor_cores": False}))
    return specs


def vote(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over each row of labels [Q, k] (nearest neighbour first; -1 = missing, ignored).
    Ties: the class of the nearest neighbour among the tied classes."""
    valid = neighbour_labels >= 0
    labels = neighbour_labels.clamp(min=0)
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(1, labels, valid.to(torch.int32))
    top = counts.max(dim=1).values
    tied = (counts.gather(1, labels) == top[:, None]) & valid
    first = tied.to(torch.int8).argmax(dim=1)  # the first (nearest) neighbour whose class is a top class
    return labels.gather(1, first[:, None]).squeeze(1)


def knn_predict(queries: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, k: int,
                num_classes: int, metric: str = "l2", exclude: torch.Tensor | None = None) -> torch.Tensor:
    """KNN classification: the majority class of each query's k nearest support points (int64 [Q]).
    Ties between classes go to the class of the nearest neighbour among the tied ones."""
    if support_labels.shape != (support.shape[0],):
        raise ValueError(f"knn_predict: {support.shape[0]} support points but {tuple(support_labels.shape)} labels")
    _, idx = knn_topk(queries, support, k, metric, exclude, pad=exclude is not None)
    labels = support_labels.to(idx.device)[idx.clamp(min=0)]
    return vote(labels.masked_fill(idx < 0, -1), num_classes)
