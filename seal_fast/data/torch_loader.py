"""`--loader torch`: a torch DataLoader with PIL decoding (what the published code ran), the shared augmentation.

Workers return uint8 CHW tensors; normalization runs on the training device. The sampler hands each
worker (epoch, index) pairs, so workers stay alive across epochs and every random choice comes from
augment.crop_flip_params, never from worker RNG state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import augment, crop_flip_params, epoch_indices
from .images import load_rgb, normalize
from .layout import Split


class ImageDataset(Dataset):
    def __init__(self, split: Split, train: bool, seed: int):
        self.split, self.train, self.seed = split, train, seed

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, item):
        epoch, i = item
        img = load_rgb(self.split.files[i])
        if self.train:
            dy, dx, flip = (int(v[0]) for v in crop_flip_params(self.seed, epoch, [i]))
            img = augment(img, dy, dx, flip)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.split.labels[i]


class EpochSampler(Sampler):
    """(epoch, index) pairs: this rank's share of the epoch, in the order of augment.epoch_indices."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int, world: int):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.epoch = n, seed, shuffle, rank, world, 0

    def __len__(self) -> int:
        return len(epoch_indices(self.n, self.seed, 0, self.rank, self.world, shuffle=False))

    def __iter__(self):
        idx = epoch_indices(self.n, self.seed, self.epoch, self.rank, self.world, self.shuffle)
        return iter([(self.epoch, int(i)) for i in idx])


class TorchLoader:
    """`epoch(e)` yields (normalized images [B,3,H,W] on `device`, int64 labels on `device`); the last batch
    of an epoch may be short (drop_last=False, as published)."""

    name = "torch"

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, workers: int, device: torch.device,
                 channels_last: bool = False, rank: int = 0, world: int = 1, progress: bool = False):
        self.device, self.channels_last = torch.device(device), channels_last  # progress: nothing to decode ahead
        self.dataset = ImageDataset(split, train, seed)
        self.sampler = EpochSampler(len(self.dataset), seed, train, rank, world)
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", drop_last=False,
                                 persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_images(self) -> int:
        return len(self.sampler)

    def epoch(self, e: int):
        self.sampler.epoch = e
        for images, labels in self.loader:
            yield normalize(images, self.device, self.channels_last), labels.to(self.device, non_blocking=True)
