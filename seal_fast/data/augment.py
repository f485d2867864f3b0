"""The recipe's augmentation and epoch order, shared by every loader so that all of them do the same science.

Train: zero-pad 4, random crop back to the image size (offsets uniform over the 9 x 9 positions),
random horizontal flip (p = 1/2); then ImageNet mean/std normalization (train and val: images.py).
The random choices for image i in epoch e come from a counter-based hash of (seed, e, i): no RNG
state, so any loader, any worker count, any batch size and any resume point see the same choices.
The order of an epoch is a permutation fixed by (seed, e), sharded by rank for data-parallel runs.
"""

from __future__ import annotations

import numpy as np

PAD = 4
POSITIONS = 2 * PAD + 1  # 9 crop offsets per axis


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def crop_flip_params(seed: int, epoch: int, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) for the given image indices: offsets in [0, 8] into the padded image, flip in {0, 1}."""
    idx = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
        h = _mix(key ^ idx)
    dy = (h % np.uint64(POSITIONS)).astype(np.int64)
    dx = ((h // np.uint64(POSITIONS)) % np.uint64(POSITIONS)).astype(np.int64)
    flip = ((h // np.uint64(POSITIONS * POSITIONS)) % np.uint64(2)).astype(np.int64)
    return dy, dx, flip


def augment(img: np.ndarray, dy: int, dx: int, flip: int, pad: int = PAD) -> np.ndarray:
    """HWC uint8: the crop of the original size at (dy, dx) of the zero-padded image, flipped if `flip`."""
    h, w, c = img.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad, c), dtype=img.dtype)
    padded[pad:pad + h, pad:pad + w] = img
    out = padded[dy:dy + h, dx:dx + w]
    return out[:, ::-1] if flip else out


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> np.ndarray:
    """This rank's image indices for an epoch: every image once per epoch over all ranks (a shuffled
    order fixed by (seed, epoch); padded by wrapping so that every rank gets the same count)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n) if shuffle else np.arange(n)
    if world > 1:
        per_rank = -(-n // world)
        order = np.concatenate([order, order[:per_rank * world - n]])
    return order[rank::world]
