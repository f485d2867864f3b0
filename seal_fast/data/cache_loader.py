"""`--loader cache`: the whole split decoded once into device memory (uint8), augmented per batch there.

Tiny-ImageNet's train split is 100,000 x 3 x 64 x 64 bytes = 1.2 GB. Decoding uses PIL (the torch
loader's decoder), and the per-batch crop, flip and normalization use augment.crop_flip_params, so the
batches equal the torch loader's exactly. On a machine without a GPU the cache lives in CPU memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .augment import PAD, crop_flip_params, epoch_indices
from .images import load_rgb, normalize
from .layout import Split


def decode_all(split: Split, workers: int = 8, progress: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] on the CPU. All images must share one size (Tiny-ImageNet's are 64 x 64)."""
    first = load_rgb(split.files[0])
    h, w, _ = first.shape
    out = torch.empty(len(split.files), 3, h, w, dtype=torch.uint8)

    def one(i: int) -> None:
        img = load_rgb(split.files[i])
        if img.shape != (h, w, 3):
            raise DataError(f"{split.files[i]}: is {img.shape[1]}x{img.shape[0]}, but the cache needs every image at "
                            f"{w}x{h} like {split.files[0]}; use --loader torch for mixed sizes")
        out[i] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(one, range(len(split.files)))
        if progress:
            from tqdm import tqdm
            jobs = tqdm(jobs, total=len(split.files), desc="decoding into the cache", leave=False, disable=None)
        for _ in jobs:
            pass
    return out


class CacheLoader:
    """`epoch(e)` yields (normalized images [B,3,H,W] on `device`, int64 labels on `device`)."""

    name = "cache"

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, workers: int, device: torch.device,
                 channels_last: bool = False, rank: int = 0, world: int = 1, progress: bool = False):
        self.device, self.channels_last = torch.device(device), channels_last
        self.batch_size, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world
        self.n = len(split.files)
        images = decode_all(split, workers=max(1, workers), progress=progress)
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if free is not None and images.numel() > 0.8 * free:
            raise DataError(f"the {images.numel() / 1e9:.1f} GB cache does not fit in the GPU's free "
                            f"{free / 1e9:.1f} GB; use --loader dali or --loader torch")
        self.images = images.to(self.device)
        self.labels = torch.tensor(split.labels, dtype=torch.int64, device=self.device)
        h, w = self.images.shape[2:]
        self.rows = torch.arange(h, device=self.device)
        self.cols = torch.arange(w, device=self.device)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(epoch_indices(self.n, self.seed, 0, self.rank, self.world, shuffle=False))

    def epoch(self, e: int):
        idx_np = epoch_indices(self.n, self.seed, e, self.rank, self.world, shuffle=self.train)
        idx = torch.from_numpy(idx_np).to(self.device)
        if self.train:
            dy, dx, flip = (torch.from_numpy(v).to(self.device) for v in crop_flip_params(self.seed, e, idx_np))
        for start in range(0, len(idx_np), self.batch_size):
            b = idx[start:start + self.batch_size]
            x = self.images[b]
            if self.train:
                x = self._crop_flip(x, dy[start:start + len(b)], dx[start:start + len(b)], flip[start:start + len(b)])
            yield normalize(x, self.device, self.channels_last), self.labels[b]

    def _crop_flip(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        bsz, c, h, w = x.shape
        padded = F.pad(x, (PAD, PAD, PAD, PAD))                       # zeros, [B, C, H+8, W+8]
        rows = (dy[:, None] + self.rows[None, :])                     # [B, H] rows of the crop
        cols = dx[:, None] + self.cols[None, :]                       # [B, W] columns of the crop
        cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)  # a flip reads the columns backwards
        x = padded.gather(2, rows[:, None, :, None].expand(bsz, c, h, w + 2 * PAD))
        return x.gather(3, cols[:, None, None, :].expand(bsz, c, h, w))
