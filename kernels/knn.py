"""Fused k-nearest neighbours: distance + top-k in one pass, never building the Q x N distance matrix.

The family (one op, three files):
  kernels/knn.py          (here) the public API (knn_topk, knn_predict, vote, merge_topk / empty_topk,
                          knn_distance_pass), the launcher (norm pre-pass, stage 1 passes, stage 2), the
                          autotuner around the kernel, and the PyTorch-ops backend (_topk_torch)
  kernels/knn_kernel.py   the Triton kernels: `_norms_kernel` (the pre-pass) and `_knn_kernel` (stage 1:
                          distances on tensor cores + a k-best list per slice), and compile_specs()
  kernels/knn_configs.py  launch configurations: Config, the per-architecture tables (candidates), MAXNREG,
                          the autotuner's keys (list_slots, d_class) and its winners (_WINNERS)

Pre-pass: every query's and support row's squared norm (cosine: the reciprocal norm), Q + N floats; stage 1:
program (i, s) takes BLOCK_Q queries and the s-th slice of the support and keeps each row's k best as int64
keys (the distance's float bits << 32 | support index); kernels/knn_kernel.py says how.
Stage 2 (the launcher): torch.topk over the slices' lists, [Q, slices * k], exact on the int64 keys.

k > 64: the list of one pass holds 64 entries (registers); further passes find the next ranks above a lower
bound (the previous pass's last key and index, compared as a pair, so ties across passes are exact). Each pass
recomputes the distances: k = 100 costs two passes, k = 256 four.

Configurations (`candidates`, `pick_config`; the tables are kernels/knn_configs.py's): a table per GPU
architecture (sm_90: wgmma tiles; sm_80 and every other GPU: mma.sync tiles), input dtype and dot precision, list
slots (k) and row alignment, each entry a short list whose first configuration is the default. On a GPU the first
call of each key (architecture, dtype, precision, list slots, alignment, class of D: the power of two >= D) times
the list with triton.autotune and keeps the winner for the process (`_WINNERS`); never under the interpreter (one
small fixed tile: fast and deterministic), never while a CUDA graph is captured (the known winner or the default),
SEAL_FAST_KNN_AUTOTUNE=0: always the default. All candidates of a key issue the same MMAs in the same order along
D, so the winner changes the speed, not the result. Every configuration compiles for its architecture without
spills under a 240-register cap (knn_kernel.compile_specs, tests/test_kernel_static.py).

Extra memory: the keys, Q x slices x k x 8 bytes, and the norms, (Q + N) x 4 bytes; never O(Q x N).
Ties: equal distances are ordered by the lower support index (the exact rule of the reference).
fp32 inputs use TF32 tensor cores only where torch.mm would (torch.backends.cuda.matmul.fp32_precision = "tf32",
or the legacy allow_tf32).
Interpreter: bf16 tiles are upcast (exactly) to fp32 before the dot (kernels/knn_kernel.py says why).
"""

from __future__ import annotations

import contextlib
import numbers
import os

import torch
import triton

# the launcher reads these through this module's namespace (so a test may patch e.g. knn.candidates here)
from .knn_configs import (K_PER_PASS, MAXNREG, Config, _TABLE, _WINNERS, _interpreted, _tune_key, arch_of, candidates,
                          d_class, list_slots)
from .knn_kernel import _NORMS_GPU, _knn_kernel, _norms_kernel

MAX_K = 256
_SENTINEL = 2**63 - 1  # larger than every real key: real keys have a clear sign bit and bits < 0x7FC00001 << 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 2**31 - 4096  # queries, support rows, features: int32 indices, with a tile of headroom below 2^31
MAX_SPLITS = 65535       # slices of the support: the CUDA grid's y dimension


def pick_config(arch: int | None, dtype: torch.dtype, precision: str | None, k: int, d: int,
                aligned: bool = True) -> Config:
    """The configuration a call runs with for (architecture, dtype, precision, k, D, alignment): the autotuner's
    winner for that key once one is known, else the table's default (`candidates(...)[0]`)."""
    kp = list_slots(k)
    return _WINNERS.get(_tune_key(arch, dtype, precision, kp, d, aligned)) or candidates(arch, dtype, precision, kp,
                                                                                           aligned)[0]


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
