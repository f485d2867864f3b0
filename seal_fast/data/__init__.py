"""Data for the trainer: the Tiny-ImageNet layout, the loaders behind one seam, the synthetic set.

The loader seam is `build_loaders`: it returns train and val loaders whose `epoch(e)` yields
(uint8 images, labels) batches and whose `len()` is the number of batches. Only the PyTorch
DataLoader (`torch`) exists today; DALI and the GPU-resident cache plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .layout import scan_train, scan_val
from .torch_loader import TorchLoader, normalize

LOADERS = ("torch",)

__all__ = ["Loaders", "build_loaders", "normalize", "LOADERS"]


@dataclass
class Loaders:
    train: TorchLoader
    val: TorchLoader
    classes: list[str]


def build_loaders(root: str, batch_size: int, seed: int, workers: int, pin_memory: bool,
                  kind: str = "torch", eval_batch_size: int | None = None) -> Loaders:
    if kind not in LOADERS:
        raise ConfigError(f"--loader {kind!r}: available loaders are {', '.join(LOADERS)}")
    train_split, val_split = scan_train(root), scan_val(root)
    train = TorchLoader(train_split, batch_size, True, seed, workers, pin_memory)
    val = TorchLoader(val_split, eval_batch_size or batch_size, False, seed, workers, pin_memory)
    return Loaders(train, val, train_split.classes)
