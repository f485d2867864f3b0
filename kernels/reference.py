"""Pure-PyTorch references of the kernels in this package. Tests and benchmarks import these.

signed_sgd_ref: torch.optim.SGD's update for any number of groups whose learning rates may be
negative (gradient ascent), with momentum buffers that a reset flag can restart, and optional loss
scaling: grads are multiplied by `inv_scale`, and when any of them is non-finite (or `found_inf`
is already set) nothing is updated.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def signed_sgd_ref(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                   fresh: list[bool], lrs: list[float], wds: list[float], momentum: float, dampening: float,
                   nesterov: bool, inv_scale: torch.Tensor | None = None,
                   found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """One step over tensor lists (one entry per parameter; lrs/wds per parameter), in place.

    fresh[i] = True: parameter i's momentum buffer restarts at d_p (torch.optim.SGD's first step).
    Returns the found-non-finite flag (float32 0/1 tensor on the parameters' device); when loss scaling
    is used (`inv_scale` given) and the flag is set, params and buffers are left unchanged.
    Math in float32 (or the parameter's dtype if wider), stored back in the parameter's dtype."""
    device = params[0].device if params else torch.device("cpu")
    flag = torch.zeros((), dtype=torch.float32, device=device)
    if found_inf is not None:
        flag = flag + (found_inf.to(device) > 0).float()
    if inv_scale is not None:
        for g in grads:
            flag = torch.maximum(flag, (~torch.isfinite(g * inv_scale.to(g.device))).any().float())
        if bool(flag > 0):
            return flag
    for p, g, buf, new, lr, wd in zip(params, grads, bufs, fresh, lrs, wds):
        wide = torch.promote_types(p.dtype, torch.float32)
        narrow = wide != p.dtype  # bf16 / fp16 parameters: compute in fp32, store rounded
        d_p = g.to(wide)          # no copy when g is already fp32
        if inv_scale is not None:
            d_p = d_p * inv_scale.to(device=d_p.device, dtype=wide)
        if wd != 0:
            d_p = d_p.add(p.to(wide), alpha=wd)
        if momentum != 0:
            if new:
                b = d_p.clone()
            elif narrow:
                b = buf.to(wide).mul_(momentum).add_(d_p, alpha=1 - dampening)
            else:
                b = buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            if b is not buf:
                buf.copy_(b)
            d_p = d_p.add(b, alpha=momentum) if nesterov else b
        if narrow:
            p.copy_(p.to(wide).add_(d_p, alpha=-lr))
        else:
            p.add_(d_p, alpha=-lr)
    return flag


def knn_topk_ref(queries: torch.Tensor, support: torch.Tensor, k: int, metric: str = "l2",
                 exclude: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float64,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.knn.knn_topk by brute force: (dist float32 [Q, k], index int64 [Q, k]), nearest first, equal
    distances ordered by the lower index (a stable sort), (inf, -1) where fewer than k candidates remain.
    Distances in `compute_dtype` from the inputs' values, `chunk` queries at a time (chunk x N memory)."""
    q_all, n = queries.shape[0], support.shape[0]
    x = support.to(compute_dtype)
    xn = (x * x).sum(1)
    dists, idxs = [], []
    for lo in range(0, q_all, chunk):
        q = queries[lo:lo + chunk].to(compute_dtype)
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
            d[hit.nonzero().squeeze(1), e[hit]] = float("inf")
            invalid = torch.zeros_like(d, dtype=torch.bool)
            invalid[hit.nonzero().squeeze(1), e[hit]] = True
        d, order = torch.sort(d, dim=1, stable=True)
        d, order = d[:, :k], order[:, :k]
        if exclude is not None:
            order = torch.where(invalid.gather(1, order), -1, order)
        if metric == "l2":
            d = d.sqrt()
        d = d.float()
        if d.shape[1] < k:  # fewer support points than k
            pad = k - d.shape[1]
            d = torch.cat([d, d.new_full((d.shape[0], pad), float("inf"))], 1)
            order = torch.cat([order, order.new_full((order.shape[0], pad), -1)], 1)
        dists.append(d.masked_fill(order < 0, float("inf")))
        idxs.append(order)
    return torch.cat(dists), torch.cat(idxs)
