"""Test oracles of the kernels in this package: plain float64, written for clarity, never on a production path.

The production paths are elsewhere and are checked against these: the fused SGD step in Triton
(kernels/fused_sgd.py), native CUDA (kernels/cuda/) and PyTorch ops (kernels/fused_sgd_torch.py, the CPU
default); the KNN in Triton (kernels/knn.py) and its PyTorch path (knn_topk(backend="torch"), the CPU default).

signed_sgd_ref: one step of torch.optim.SGD's update for parameters whose learning rates may be negative
  (gradient ascent), with restartable momentum buffers and optional loss scaling, as a pure function in fp64.
knn_topk_ref: the k nearest support rows by brute force: fp64 distances from the inputs' values (the l2 one
  from direct differences, not the |q|^2 - 2 q.x + |x|^2 expansion the fast paths use), a stable sort.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def signed_sgd_ref(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None],
                   fresh: list[bool], lrs: list[float], wds: list[float], momentum: float, dampening: float,
                   nesterov: bool, inv_scale: float | None = None) -> tuple[list, list, bool]:
    """One step, in float64, without touching the inputs: (new params, new buffers, skipped), all fp64.

    Per parameter i (torch.optim.SGD's documented update, lr signed):
        d = g * inv_scale (when given);  d = d + wd * p (only where wd != 0, as torch.optim.SGD: 0 x inf adds no NaN);
        buf = d if fresh[i] else momentum * buf + (1 - dampening) * d;   (momentum != 0 only)
        d = d + momentum * buf if nesterov else buf;  p = p - lr * d
    Loss scaling: when any g * inv_scale is NaN or infinite, the step is skipped: (params, buffers) come back
    unchanged and skipped is True. bufs[i] may be None where fresh[i] (no buffer yet)."""
    g64 = [g.double() * (inv_scale if inv_scale is not None else 1.0) for g in grads]
    if inv_scale is not None and not all(bool(torch.isfinite(g).all()) for g in g64):
        return [p.double() for p in params], [None if b is None else b.double() for b in bufs], True
    new_params, new_bufs = [], []
    for p, g, b, restart, lr, wd in zip(params, g64, bufs, fresh, lrs, wds, strict=True):
        p = p.double()
        d = g + wd * p if wd != 0 else g
        buf = None
        if momentum != 0:
            buf = d if restart else momentum * b.double() + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        new_params.append(p - lr * d)
        new_bufs.append(buf)
    return new_params, new_bufs, False


def knn_topk_ref(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str = "l2",
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.knn.knn_topk by brute force: (dist float32 [Q, k], index int64 [Q, k]), nearest first, equal
    distances ordered by the lower index, (inf, -1) where fewer than k candidates remain (k > N, or the
    excluded point). Distances in fp64 from the inputs' values: l2 = sqrt(sum (q - x)^2) (torch.cdist without
    the matrix-product shortcut), cosine = 1 - q.x / (max(|q|, 1e-8) max(|x|, 1e-8)); NaN ranks as inf.
    Builds the whole Q x N matrix: test sizes only."""
    q, x = queries.double().cpu(), support.double().cpu()
    if metric == "cosine":
        qn, xn = q.norm(dim=1).clamp_min(1e-8), x.norm(dim=1).clamp_min(1e-8)
        d = 1 - (q @ x.T) / (qn[:, None] * xn[None, :])
    else:
        d = torch.cdist(q, x, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.nan_to_num(nan=float("inf"), posinf=float("inf"))
    allowed = torch.ones_like(d, dtype=torch.bool)
    if exclude is not None:
        rows = torch.arange(q.shape[0])
        e = exclude.cpu()
        hit = (e >= 0) & (e < x.shape[0])
        allowed[rows[hit], e[hit]] = False
    # order: by distance, equal ones by index (stable sorts keep the index order), excluded points last
    key = torch.where(allowed, d, torch.full_like(d, float("inf")))
    order = torch.argsort(key, dim=1, stable=True)
    order = order.gather(1, torch.argsort((~allowed).gather(1, order).to(torch.int8), dim=1, stable=True))
    idx = torch.where(allowed.gather(1, order), order, -1)[:, :k]
    dist = key.gather(1, order)[:, :k].float().masked_fill(idx < 0, float("inf"))
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
        dist = torch.cat([dist, dist.new_full((dist.shape[0], pad), float("inf"))], 1)
    return dist.to(queries.device), idx.to(queries.device)
