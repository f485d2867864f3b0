"""Data-parallel training on one node: `torchrun --nproc_per_node N -m seal_fast.train ...`.

Every rank builds the same model from the same seed, reads its share of each epoch (augment.epoch_indices:
rank r takes positions r, r + N, ... of the epoch order, so the N per-rank batches of a step are exactly
the images of the single-process global batch), and DistributedDataParallel averages the gradients
before the fused step. BatchNorm is synchronized (its statistics are those of the global batch, as in the
single-process recipe): torch.nn.SyncBatchNorm on CUDA, AllReduceBatchNorm2d below on CPU/gloo, where
SyncBatchNorm does not run. Rank 0 writes every output; all ranks resume from the same last.pt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str) -> Dist:
    """Join the process group torchrun set up (env WORLD_SIZE > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started {world} processes but this node has {torch.cuda.device_count()} "
                              "GPUs; use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, d: Dist):
    """rank 0's value of `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks (any backend, CPU included).
    Sums and sums of squares are all-reduced with autograd's all_reduce, so the backward pass is the global
    batch's too. Parameters and buffers are BatchNorm2d's (checkpoints are interchangeable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings

        with warnings.catch_warnings():  # deprecated in favour of _functional_collectives, which has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d synchronized across ranks; parameters and buffers are kept (same tensors)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model
