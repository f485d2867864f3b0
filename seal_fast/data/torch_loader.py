"""The PyTorch DataLoader path (`--loader torch`) with the recipe's augmentation.

Train: zero-pad 4, random crop back to the image size (9 x 9 offsets), random horizontal flip;
val: nothing. Workers return uint8 CHW tensors; `normalize` (ImageNet mean/std) runs on the
training device. Every random choice comes from (seed, epoch, image index), never from worker
or global RNG state, so an epoch is the same whatever the worker count and a resumed run sees
exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .layout import Split

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD = 4


def load_rgb(path: str) -> np.ndarray:
    """HWC uint8 RGB (grayscale and palette images are converted); DataError names a broken file."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError ...
        raise DataError(f"{path}: cannot decode this image ({type(exc).__name__}: {exc}); replace or delete "
                        "the file (a val image also needs its line removed from val_annotations.txt)") from None


def augment(img: np.ndarray, rng: np.random.Generator, pad: int = PAD) -> np.ndarray:
    """Random crop of the original size from the zero-padded image, then a random horizontal flip."""
    h, w, c = img.shape
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    flip = rng.random() < 0.5
    padded = np.zeros((h + 2 * pad, w + 2 * pad, c), dtype=img.dtype)
    padded[pad:pad + h, pad:pad + w] = img
    out = padded[dy:dy + h, dx:dx + w]
    return out[:, ::-1] if flip else out


class ImageDataset(Dataset):
    def __init__(self, split: Split, train: bool, seed: int = 0):
        self.split, self.train, self.seed, self.epoch = split, train, seed, 0

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, i: int):
        img = load_rgb(self.split.files[i])
        if self.train:
            img = augment(img, np.random.default_rng([self.seed, self.epoch, i]))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.split.labels[i]


class EpochShuffle(Sampler):
    """Every index once per epoch, in an order fixed by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n).tolist())


class TorchLoader:
    """`epoch(e)` yields (uint8 images [B,3,H,W], int64 labels [B]) batches; the last may be short."""

    name = "torch"

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, workers: int, pin_memory: bool):
        self.dataset = ImageDataset(split, train, seed)
        self.sampler = EpochShuffle(len(self.dataset), seed) if train else None
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, shuffle=False,
                                 num_workers=workers, pin_memory=pin_memory, drop_last=False)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def epoch(self, e: int):
        self.dataset.epoch = e
        if self.sampler is not None:
            self.sampler.epoch = e
        return iter(self.loader)


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalized on `device` (ToTensor then Normalize, same arithmetic)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
