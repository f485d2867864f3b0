"""What every loader does to an image: decode it (PIL, RGB) and normalize it (ImageNet mean / std).

The torch, cache and DALI loaders, the studies and the benchmarks share these, so normalisation is
written once: uint8 [B,3,H,W] -> float, / 255, - mean, / std (torchvision's ToTensor then Normalize, in
that order). DALI's fn.crop_mirror_normalize takes the same MEAN / STD scaled by 255.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The most pixels one image may have: PIL's own default warning threshold (1024**3 // 4 // 3 px, 0.27 GB as RGB;
# Image.MAX_IMAGE_PIXELS). PIL only warns between it and twice it; here anything above it is refused before it is
# decoded (a decompression bomb: a small file that decodes to an enormous image), whatever MAX_IMAGE_PIXELS says.
MAX_PIXELS = 1024 ** 3 // 4 // 3
# PIL's warning for images between its limit and twice it says nothing check_pixels does not: no stray lines
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_pixels(path, width: int, height: int) -> None:
    """DataError naming `path` when its header announces more than MAX_PIXELS pixels (read before any decoding)."""
    if width * height > MAX_PIXELS:
        raise DataError(f"{path}: a {width}x{height} image ({width * height / 1e6:.0f} Mpx, "
                        f"{3 * width * height / 1e9:.1f} GB decoded) is over the {MAX_PIXELS / 1e6:.0f} Mpx limit "
                        "for one image (a decompression bomb?); replace or delete the file")


def open_checked(path, fp=None):
    """PIL's lazy Image.open of `path` (or of the file object `fp`, named `path`): header only, refused with a
    DataError if the image would decode to over MAX_PIXELS."""
    try:
        img = Image.open(path if fp is None else fp)
    except Image.DecompressionBombError as exc:  # PIL's own refusal (over twice its limit), before any decoding
        raise DataError(f"{path}: the image is over the {MAX_PIXELS / 1e6:.0f} Mpx limit for one image (a "
                        f"decompression bomb? {exc}); replace or delete the file") from None
    try:
        check_pixels(path, *img.size)
    except DataError:
        img.close()
        raise
    return img


def check_encoded(path, data) -> None:
    """The MAX_PIXELS check for an image already read into memory (the DALI loader's bytes), from its header alone;
    a file PIL cannot parse is left to the decoder's own error."""
    import io

    try:
        open_checked(path, io.BytesIO(data)).close()
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - not an image PIL knows: the decoder reports it (and names it)
        pass


def load_rgb(path: str) -> np.ndarray:
    """HWC uint8 RGB (grayscale and palette images are converted); DataError names a broken file, or one that would
    decode to more than MAX_PIXELS pixels (nothing of it is decoded then)."""
    try:
        with open_checked(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except DataError:
        raise
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
