"""Fused k-nearest neighbours: distance + top-k in one pass, never building the Q x N distance matrix.

Stage 1 (`_knn_kernel`): program (i, s) takes BLOCK_Q queries and the s-th slice of the support. Per
BLOCK_N support tile it computes the squared L2 distance |q|^2 - 2 q.x + |x|^2 (or the cosine distance
1 - q.x / (|q| |x|)), the dot products on tensor cores (tl.dot, fp32 accumulation, looping over D in
BLOCK_D steps, the norms accumulated from the same loads), and merges the tile into the program's
running top-k. Each candidate is one int64 key: the distance's float bits (distances are >= 0, so the
bits order like the values) in the high 32 bits and the support index in the low 32, so one integer
min orders by distance, then by index. The merge repeatedly moves each row's smallest tile key into
its list in place of the list's largest, while any row still improves (at most k rounds per tile; few
after the first tiles). Stage 2 (the launcher): torch.topk over the slices' lists, [Q, slices * k].

Extra memory: the keys, Q x slices x next_pow2(k) x 8 bytes (a few MB at Q = 10,000), never O(Q x N).
Ties: equal distances are ordered by the lower support index (the exact rule of the reference).
fp32 inputs use TF32 tensor cores only if torch.backends.cuda.matmul.allow_tf32 is set, like torch.mm.
Interpreter: Triton 3.8's interpreted tl.dot returns garbage for bfloat16 operands, so under
TRITON_INTERPRET=1 bf16 tiles are upcast (exactly) to fp32 before the dot; compiled code is unaffected.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_K = 256
_SENTINEL = 2**63 - 1  # larger than every real key: real keys have a clear sign bit and bits < 0x7FC00001 << 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _knn_kernel(q_ptr, x_ptr, excl_ptr, out_ptr, Q, N, D, per_split, stride_qm, stride_qd, stride_xn, stride_xd,
                KP: tl.constexpr, COSINE: tl.constexpr, EXCLUDE: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = rq < Q
    # the running list: distinct sentinels, so "the position holding the row's largest key" is unique
    best = tl.zeros((BLOCK_Q, KP), dtype=tl.int64) + (9223372036854775807 - tl.arange(0, KP)[None, :].to(tl.int64))
    if EXCLUDE:
        skip = tl.load(excl_ptr + rq, mask=qmask, other=-1)
    n_lo = pid_s * per_split
    n_hi = tl.minimum(N, n_lo + per_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < n_hi
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        qn = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        xn = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            dmask = rd < D
            q = tl.load(q_ptr + rq[:, None] * stride_qm + rd[None, :] * stride_qd,
                        mask=qmask[:, None] & dmask[None, :], other=0.0)
            xt = tl.load(x_ptr + rn[None, :] * stride_xn + rd[:, None] * stride_xd,  # [BLOCK_D, BLOCK_N]
                         mask=dmask[:, None] & nmask[None, :], other=0.0)
            qf = q.to(tl.float32)
            xf = xt.to(tl.float32)
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong; exact upcast values give the same products
                acc = tl.dot(qf, xf, acc, input_precision="ieee")
            else:
                acc = tl.dot(q, xt, acc, input_precision=PRECISION)
            qn += tl.sum(qf * qf, axis=1)
            xn += tl.sum(xf * xf, axis=0)
        if COSINE:
            den = tl.maximum(tl.sqrt(qn), 1e-8)[:, None] * tl.maximum(tl.sqrt(xn), 1e-8)[None, :]
            dist = 1.0 - acc / den
        else:
            dist = qn[:, None] - 2.0 * acc + xn[None, :]
        # >= 0 (rounding can go below), +0.0 rather than -0.0, NaN last: the bits then order like the values
        dist = tl.where(dist != dist, float("inf"), tl.where(dist > 0.0, dist, 0.0))
        key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | rn[None, :].to(tl.int64)
        drop = (nmask == 0)[None, :] | (qmask == 0)[:, None]
        if EXCLUDE:
            drop = drop | (rn[None, :] == skip[:, None])
        key = tl.where(drop, 9223372036854775807, key)
        worst = tl.max(best, axis=1)
        low = tl.min(key, axis=1)
        while tl.max((low < worst).to(tl.int32), axis=0) > 0:
            take = low < worst
            best = tl.where(take[:, None] & (best == worst[:, None]), low[:, None], best)
            key = tl.where(key == low[:, None], 9223372036854775807, key)
            worst = tl.max(best, axis=1)
            low = tl.min(key, axis=1)
    out = out_ptr + pid_s * Q * KP + rq[:, None] * KP + tl.arange(0, KP)[None, :]
    tl.store(out, best, mask=qmask[:, None])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _blocks(kp: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, BLOCK_D, num_warps). Small tiles under the interpreter, where each op is numpy."""
    if device.type != "cuda":
        return 16, 32, 32, 4
    block_q = 64 if kp <= 64 else (32 if kp <= 128 else 16)
    return block_q, 128, 64, 8


def _check(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str, exclude, pad: bool) -> None:
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
    if n >= 2**31:
        raise ValueError(f"knn_topk: the support has {n} points; at most 2^31 - 1 are supported")
    if exclude is not None and (exclude.shape != (q,) or exclude.dtype != torch.int64):
        raise ValueError(f"knn_topk: exclude must be an int64 tensor of shape [{q}] (one support index per query, "
                         f"-1 for none), got {exclude.dtype} {tuple(exclude.shape)}")


def decode(keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (distance float32, index int64); missing neighbours (sentinels) -> (inf, -1)."""
    missing = keys >= _SENTINEL - MAX_K
    dist = (keys >> 32).to(torch.int32).view(torch.float32)
    if metric == "l2":
        dist = dist.sqrt()
    idx = keys & 0xFFFFFFFF
    return dist.masked_fill(missing, float("inf")), idx.masked_fill(missing, -1)


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
    splits: slices of the support per query block (default: enough programs to fill the GPU).
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the PyTorch reference), "triton", "torch"."""
    _check(queries, support, k, metric, exclude, pad)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"knn_topk: backend {backend!r}: choose auto, triton or torch")
    if backend == "torch" or (backend == "auto" and queries.device.type != "cuda" and not _interpreted()):
        from .reference import knn_topk_ref

        return knn_topk_ref(queries, support, k, metric, exclude, compute_dtype=torch.float32)
    (q, d), n = queries.shape, support.shape[0]
    kp = max(16, triton.next_power_of_2(k))
    block_q, block_n, block_d, warps = _blocks(kp, queries.device)
    q_blocks = triton.cdiv(q, block_q)
    if splits is None:
        target = 4 * torch.cuda.get_device_properties(queries.device).multi_processor_count \
            if queries.device.type == "cuda" else 1
        splits = max(1, min(triton.cdiv(n, block_n), triton.cdiv(target, q_blocks)))
    per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, per_split)
    keys = torch.empty(splits, q, kp, dtype=torch.int64, device=queries.device)
    precision = None  # 16-bit inputs: tensor cores (Triton's default); fp32: exact unless torch allows TF32
    if queries.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    excl = exclude if exclude is not None else keys  # any pointer; not read without EXCLUDE
    _knn_kernel[(q_blocks, splits)](
        queries, support, excl, keys, q, n, d, per_split, queries.stride(0), queries.stride(1),
        support.stride(0), support.stride(1), KP=kp, COSINE=metric == "cosine", EXCLUDE=exclude is not None,
        PRECISION=precision, UPCAST=_interpreted() and queries.dtype == torch.bfloat16, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        **({} if _interpreted() else {"num_warps": warps}))
    keys = keys.permute(1, 0, 2).reshape(q, splits * kp)
    keys = torch.topk(keys, k, dim=1, largest=False, sorted=True).values  # the lists come unsorted
    return decode(keys, metric)


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
