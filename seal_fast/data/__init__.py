"""Data for the trainer: the Tiny-ImageNet layout, three loaders behind one seam, the synthetic set.

The seam is `build_loaders`: train and val loaders whose `epoch(e)` yields (normalized float images
[B,3,H,W] on the training device, int64 labels there) and whose `len()` is the number of batches.
  torch  a torch DataLoader with PIL decoding (the published code's pipeline)
  cache  the split decoded once into device memory (CPU memory without a GPU), augmented per batch there
  dali   NVIDIA DALI (GPU decoding with a GPU; CPU operators without one)
  auto   the fastest available: the cache when it fits in memory, else DALI, else torch
All three use the same epoch order and the same per-image random crop and flip (augment.py): the cache
reproduces the torch loader bit for bit, DALI within float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .layout import Split, scan_train, scan_val

LOADERS = ("auto", "torch", "cache", "dali")

__all__ = ["Loaders", "build_loaders", "build_eval_loaders", "pick_loader", "LOADERS"]


@dataclass
class Loaders:
    train: object
    val: object
    classes: list[str]
    kind: str
    why: str


def _cache_bytes(split: Split) -> int:
    from .torch_loader import load_rgb

    h, w, c = load_rgb(split.files[0]).shape
    return len(split.files) * h * w * c


def pick_loader(train: Split, val: Split, device: torch.device) -> tuple[str, str]:
    """(loader, reason) for --loader auto."""
    from .dali_loader import dali_available

    need = _cache_bytes(train) + _cache_bytes(val)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need < 0.25 * free:
            return "cache", f"the {need / 1e9:.2f} GB cache fits in the GPU's {free / 1e9:.0f} GB free memory"
        if dali_available():
            return "dali", f"the {need / 1e9:.2f} GB cache would take over a quarter of the GPU's free memory"
        return "torch", "the cache does not fit in GPU memory and DALI is not installed"
    try:
        ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 0
    if need < 0.25 * ram:
        return "cache", f"no GPU; the {need / 1e9:.2f} GB cache fits in {ram / 1e9:.0f} GB of free RAM (no decoding per epoch)"
    return "torch", "no GPU and not enough free RAM for the cache"


def _choose(root: str, kind: str, device: torch.device) -> tuple[Split, Split, str, str]:
    """(train split, val split, loader kind, why) for --loader `kind`."""
    if kind not in LOADERS:
        raise ConfigError(f"--loader {kind!r}: choose one of {', '.join(LOADERS)}")
    train_split, val_split = scan_train(root), scan_val(root)
    if kind == "auto":
        return (train_split, val_split, *pick_loader(train_split, val_split, device))
    return train_split, val_split, kind, "asked for"


def _loader_class(kind: str):
    if kind == "torch":
        from .torch_loader import TorchLoader
        return TorchLoader
    if kind == "cache":
        from .cache_loader import CacheLoader
        return CacheLoader
    from .dali_loader import DaliLoader
    return DaliLoader


def build_loaders(root: str, batch_size: int, seed: int, workers: int, device: torch.device,
                  channels_last: bool = False, kind: str = "auto", eval_batch_size: int | None = None,
                  rank: int = 0, world: int = 1, progress: bool = False) -> Loaders:
    device = torch.device(device)
    train_split, val_split, kind, why = _choose(root, kind, device)
    common = dict(seed=seed, workers=workers, device=device, channels_last=channels_last, rank=rank, world=world)
    if kind == "cache":
        common["progress"] = progress
    cls = _loader_class(kind)
    train = cls(train_split, batch_size, True, **common)
    val = cls(val_split, eval_batch_size or batch_size, False, **dict(common, rank=0, world=1))
    return Loaders(train, val, train_split.classes, kind, why)


def build_eval_loaders(root: str, batch_size: int, workers: int, device: torch.device, channels_last: bool = False,
                       kind: str = "auto", progress: bool = False) -> Loaders:
    """Both splits without augmentation, in file order (for probes and studies): `train` is the train split
    as the network sees it at evaluation. kind "dali" is served by the torch loader (same batches)."""
    device = torch.device(device)
    train_split, val_split, kind, why = _choose(root, kind, device)
    if kind == "dali":
        kind, why = "torch", "DALI is not used for evaluation passes; the torch loader gives the same batches"
    common = dict(seed=0, workers=workers, device=device, channels_last=channels_last)
    if kind == "cache":
        common["progress"] = progress
    cls = _loader_class(kind)
    return Loaders(cls(train_split, batch_size, False, **common), cls(val_split, batch_size, False, **common),
                   train_split.classes, kind, why)
