"""Data for the trainer: the Tiny-ImageNet layout, three loaders behind one seam, the synthetic set.

The seam is `build_loaders`: train and val `Loader`s (the protocol below) whose `epoch(e)` yields
(normalized float images [B,3,H,W] on the training device, int64 labels there) and whose `len()` is the
number of batches. Decoding and normalisation are shared by all of them (images.py).
  torch  a torch DataLoader with PIL decoding (the published code's pipeline)
  cache  the split decoded once into device memory (CPU memory without a GPU), augmented per batch there
  dali   NVIDIA DALI (GPU decoding with a GPU; CPU operators without one)
  auto   the fastest available: the cache when it fits in memory, else DALI, else torch
All three use the same epoch order and the same per-image random crop and flip (augment.py): the cache
reproduces the torch loader bit for bit, DALI within float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError
from ..runtime import free_memory
from .layout import Split, scan_train, scan_val

LOADERS = ("auto", "torch", "cache", "dali")

__all__ = ["Loader", "Loaders", "build_loaders", "build_eval_loaders", "pick_loader", "LOADERS"]


class Loader(Protocol):
    """What the trainer and the studies need of a loader (torch_loader, cache_loader, dali_loader)."""

    name: str

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, workers: int, device: torch.device,
                 channels_last: bool = False, rank: int = 0, world: int = 1, progress: bool = False): ...

    def __len__(self) -> int: ...             # batches per epoch (the last may be short)

    @property
    def num_images(self) -> int: ...          # this rank's images per epoch

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # (normalized images, labels)


@dataclass
class Loaders:
    train: Loader
    val: Loader
    classes: list[str]
    kind: str
    why: str


def _cache_bytes(split: Split) -> int:
    from .images import load_rgb

    h, w, c = load_rgb(split.files[0]).shape
    return len(split.files) * h * w * c


def pick_loader(train: Split, val: Split, device: torch.device) -> tuple[str, str]:
    """(loader, reason) for --loader auto."""
    from .dali_loader import dali_available

    need = _cache_bytes(train) + _cache_bytes(val)
    if device.type == "cuda":
        free = free_memory(device)
        if need < 0.25 * free:
            return "cache", f"the {need / 1e9:.2f} GB cache fits in the GPU's {free / 1e9:.0f} GB free memory"
        if dali_available():
            return "dali", f"the {need / 1e9:.2f} GB cache would take over a quarter of the GPU's free memory"
        return "torch", "the cache does not fit in GPU memory and DALI is not installed"
    ram = free_memory(device)
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


def _loader_class(kind: str) -> type[Loader]:
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
    common = dict(seed=seed, workers=workers, device=device, channels_last=channels_last, rank=rank, world=world,
                  progress=progress)
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
    common = dict(seed=0, workers=workers, device=device, channels_last=channels_last, progress=progress)
    cls = _loader_class(kind)
    return Loaders(cls(train_split, batch_size, False, **common), cls(val_split, batch_size, False, **common),
                   train_split.classes, kind, why)
