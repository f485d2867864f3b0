"""The Triton kernels of the fused KNN (kernels/knn.py launches them, kernels/knn_configs.py picks their tiles)
and compile_specs(): every configuration the launcher can run, for the static report (bench/kernel_report.py).

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

Addressing: row and column indices are int32 (queries, support rows and features at most kernels.knn.MAX_ROWS =
2^31 - 4096, so index + tile stays below 2^31); every product of an index and a stride is int64, so any strides
work (e.g. column-major views, feats.T, whose offsets pass 2^31 elements). The slices are the grid's y
dimension: at most 65,535.
Interpreter: Triton 3.8's interpreted tl.dot returns garbage for bfloat16 operands, so under
TRITON_INTERPRET=1 bf16 tiles are upcast (exactly) to fp32 before the dot (UPCAST); compiled code is unaffected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .knn_configs import ARCHS, K_PER_PASS, MAXNREG, Config, candidates

_NORMS_GPU = (8, 256, 4)  # the norm pre-pass on a GPU: BLOCK_R, BLOCK_D, num_warps


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


@triton.jit
def _tile_dot(qp, xp, rd, D, q_step, x_step, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The D-loop of one tile: q.x for BLOCK_Q queries x BLOCK_N support rows, fp32 [BLOCK_Q, BLOCK_N] (qp: the
    queries' [Q, D] tile pointers, xp: the support's [D, N] ones, each advanced BLOCK_D features a step)."""
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
    return acc


@triton.jit
def _distance_keys(acc, qn, xn, COSINE: tl.constexpr):
    """The distances of a tile from its dots and the norms (qn, xn: |r|^2, or 1 / |r| for cosine), as int32 keys
    that order like the values: the float's bits, made >= +0."""
    if COSINE:
        dist = 1.0 - acc * (qn[:, None] * xn[None, :])
    else:
        # one rounding after the exact doubling (an FMA on the GPU): a duplicate pair (|q|^2 = |x|^2) gets
        # exactly 2 (|q|^2 - q.x), the dot's own rounding, with no extra cancellation
        dist = (qn[:, None] + xn[None, :]) - 2.0 * acc
    # NaN -> inf; then bits < 0 (negative rounding, -0.0) -> +0.0: the int32 bits order like the values
    dist = tl.where(dist != dist, float("inf"), dist)
    return tl.maximum(dist.to(tl.int32, bitcast=True), 0)


@triton.jit
def _take_candidates(key, best, worst, thr, cols, n0, BLOCK_N: tl.constexpr):
    """The selection of one tile (keys of dropped candidates 0x7FFFFFFF): while any row has a key below its
    threshold, move each such row's smallest (the lowest column on ties) into its list in place of the list's
    largest entry. Returns the list, its largest entry per row and the new thresholds."""
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
    return best, worst, thr


@triton.jit(do_not_specialize=["tune_arch", "tune_d", "tune_aligned"])
def _knn_kernel(q_ptr, x_ptr, qn_ptr, xn_ptr, lb_ptr, excl_ptr, out_ptr, Q, N, D, K, per_split,
                stride_qm, stride_qd, stride_xn, stride_xd, tune_arch, tune_d, tune_aligned,
                KP: tl.constexpr, COSINE: tl.constexpr, EXCLUDE: tl.constexpr, LOWER: tl.constexpr,
                SELECT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # tune_arch, tune_d, tune_aligned: unused here, the autotuner's key (the GPU's architecture, the class of D,
    # 16-byte aligned rows). Row and column indices stay int32 (< MAX_ROWS + a tile: no overflow); every offset
    # that multiplies an index by a stride is int64. The helpers (_tile_dot, _distance_keys, _take_candidates)
    # are inlined: the same PTX instructions and SASS as the body written out in one function.
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
        acc = _tile_dot(qp, xp, rd, D, q_step, x_step, PRECISION, UPCAST, EVEN_D, BLOCK_Q, BLOCK_N, BLOCK_D)
        key = _distance_keys(acc, qn, tl.load(xn_ptr + rn_ld), COSINE)
        drop = rn[None, :] >= n_hi
        if EXCLUDE:
            drop = drop | (rn[None, :] == skip[:, None])
        if LOWER:
            drop = drop | (key < lb_key[:, None]) | ((key == lb_key[:, None]) & (rn[None, :] <= lb_idx[:, None]))
        key = tl.where(drop, 2147483647, key)
        if SELECT:
            best, worst, thr = _take_candidates(key, best, worst, thr, cols, n0, BLOCK_N)
        else:  # benchmark: distances only, the selection reduced to each row's minimum key
            rowmin = tl.minimum(rowmin, tl.min(key, axis=1))
    # out is [Q, slices, K]: each query's lists side by side, so the caller's view [Q, slices * K] is free
    row = (rq.to(tl.int64) * tl.num_programs(1) + pid_s) * K
    if SELECT:
        tl.store(out_ptr + row[:, None] + slot[None, :], best, mask=live)
    else:
        tl.store(out_ptr + row, rowmin.to(tl.int64) << 32, mask=qmask)



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

