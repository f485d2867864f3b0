"""What every loader does to an image: decode it (PIL, RGB) and normalize it (ImageNet mean / std).

The torch, cache and DALI loaders, the studies and the benchmarks share these, so normalisation is
written once: uint8 [B,3,H,W] -> float, / 255, - mean, / std (torchvision's ToTensor then Normalize, in
that order). DALI's fn.crop_mirror_normalize takes the same MEAN / STD scaled by 255.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_rgb(path: str) -> np.ndarray:
    """HWC uint8 RGB (grayscale and palette images are converted); DataError names a broken file."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError ...
        raise DataError(f"{path}: cannot decode this image ({type(exc).__name__}: {exc}); replace or delete "
                        "the file (a val image also needs its line removed from val_annotations.txt)") from None


@functools.lru_cache(maxsize=None)
def mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255 as a 0-dim tensor, ImageNet mean and std as [1,3,1,1] tensors, on `device`, made once (not per batch).

    The 255 is a tensor on purpose: PyTorch's CUDA division by a Python number multiplies by its reciprocal
    (one rounding more), which put the GPU loaders 1 ulp (7e-7) off the CPU's true division on an H200."""
    return (torch.tensor(255.0, device=device), torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalized `dtype` on `device` (ToTensor then Normalize, same arithmetic: true
    divisions, on the CPU and the GPU alike)."""
    scale, mean, std = mean_std(torch.device(device))
    x = images.to(device, non_blocking=True).float().div_(scale)
    x = x.sub_(mean).div_(std).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
