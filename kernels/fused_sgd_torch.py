"""The fused SGD step in plain PyTorch ops: SignedSGD's backend "torch" (the CPU default), over the same
table (kernels/fused_sgd_table.py) as the Triton and native kernels (kernels/fused_sgd.py), with the same
semantics. Production code: its test oracle is kernels/reference.py (fp64) and torch.optim.SGD, never this file."""

from __future__ import annotations

import torch

from .fused_sgd_table import SGDTable


def step(table: SGDTable, *, nesterov: bool = False, scaled: bool = False) -> None:
    """One step over the table, like kernels.fused_sgd.step (check is implied by scaled here: the
    non-finite test runs first and a step that finds one stores nothing). Reads the hyper-parameters from
    the table's host copy (`synced`), the RESTART flags and found_inf from the device."""
    if table.synced is None:
        raise RuntimeError("fused_sgd_torch: set the table's hyper-parameters first (SGDTable.set_hyperparameters)")
    per_group, momentum, dampening = table.synced
    lrs = [per_group[g][0] for g in table.groups]
    wds = [per_group[g][1] for g in table.groups]
    fresh = table.pending() if table.momentum else [False] * len(table.params)
    flag = _update(table.params, [p.grad for p in table.params], table.bufs, fresh, lrs, wds,
                   momentum if table.momentum else 0.0, dampening, nesterov,
                   inv_scale=table.scalars[2] if scaled else None, found_inf=table.found_inf if scaled else None)
    if scaled:
        table.found_inf.copy_(flag.reshape(1))
    if table.momentum and not (scaled and bool(flag > 0)):  # a skipped step leaves the restart pending
        table.clear_restart()


@torch.no_grad()
def _update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], fresh: list[bool],
            lrs: list[float], wds: list[float], momentum: float, dampening: float, nesterov: bool,
            inv_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> torch.Tensor:
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


