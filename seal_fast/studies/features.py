"""What every study of a trained network shares (depth, transfer, few-shot, Hessian, PoF): load a seal_fast
checkpoint into its model, frozen, on a device; run that frozen backbone over a dataset of image files and keep
its pooled features, streamed, with a progress bar; cache those features per checkpoint x dataset x transform.

A study never imports the trainer: it reads checkpoints through checkpoint.read (the RunState schema) and
rebuilds the model from the checkpoint's own config.

Features (`extract`):
- the layer is the output of the network's last residual block, global-average-pooled: the input of `fc`
  (2,048 values for ResNet-50, 512 for resnet18 / resnet10), `models.forward_probes(..., pooled=True)`;
- images are decoded with PIL (RGB), resized and center-cropped by a `Transform`, turned into uint8 tensors in
  DataLoader workers, and normalized on the device with ImageNet's mean / std (data.images.normalize, the
  trainer's arithmetic);
- the forward pass runs in eval mode (BatchNorm's running statistics), under bf16 autocast where `precision`
  says bf16 is native (a GPU with bf16, a CPU with AVX512_BF16 / AMX / Arm BF16; precision.amp_dtype), else
  fp32; the features are stored as fp32 either way;
- a NaN or infinite feature stops the study with a DataError (diverged weights).

Cache (`FeatureCache`): one file per checkpoint x dataset split x transform x layer x precision, named
`<dataset>-<split>-<run>-<file>-<key>.pt` in the cache folder (default `$SEAL_FAST_CACHE/features`, i.e.
`~/.cache/seal_fast/features`). The key hashes the checkpoint's resolved path, size and modification time, the
split's file list (paths, labels, sizes, modification times), the transform, the layer, the precision and
FEATURES_VERSION: a checkpoint written again, or a dataset changed, is extracted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import checkpoint
from ..errors import DataError, SealError
from ..evaluate import load_checkpoint_model
from ..models import forward_probes, probe_names

FEATURES_VERSION = 1  # bump when the extraction's arithmetic changes: old cache files are then never read


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def load_model(path: str, device: torch.device, channels_last: bool = False, trust: bool = False):
    """(model in eval mode on `device`, the run's config dict, a label "method @ epoch N (run/file)").

    A file that is not a seal_fast checkpoint, or whose weights are not those of the architecture its config
    names, is a DataError with one line that says so. The file is read as data only (checkpoint.load): one whose
    pickle would run code is refused unless `trust` (--trust-checkpoint)."""
    model, ckpt = load_checkpoint_model(path, device, trust=trust)
    cfg = ckpt.config
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    label = f"{cfg.get('method', '?')} @ epoch {ckpt.next_epoch} ({Path(path).parent.name}/{Path(path).name})"
    return model, cfg, label


def feature_layer(model) -> str:
    """The probe whose pooled output is the features: the last residual block (fc's input)."""
    return probe_names(model)[-1]


def precision(device: torch.device, amp: bool | None) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, a line saying why). amp None: on with CUDA, off on a CPU."""
    from ..precision import amp_dtype

    if amp is None:
        amp = device.type == "cuda"
    return amp_dtype(device, amp)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """Resize, then center-crop to size x size. square=False: the shorter side is resized to `resize` (aspect
    kept, torchvision's Resize(int)); square=True: both sides to `resize` (BSCD-FSL's Scale([r, r]))."""

    size: int
    resize: int
    square: bool = False

    def describe(self) -> str:
        how = f"both sides to {self.resize} (aspect not kept)" if self.square else f"the shorter side to {self.resize}"
        return (f"resize {how} (bilinear, antialiased), center crop {self.size}x{self.size}, normalize with "
                "ImageNet's mean / std")

    def __call__(self, img):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img = TF.resize(img, [self.resize, self.resize] if self.square else self.resize,
                        interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(img, [self.size, self.size]))


def open_rgb(path: str):
    """A PIL RGB image; a DataError names a file that does not decode, or one whose header announces more than
    data.images.MAX_PIXELS pixels (a decompression bomb: refused before it is decoded)."""
    from ..data.images import open_checked

    try:
        with open_checked(path) as img:
            img.load()
            return img.convert("RGB")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError ...
        raise DataError(f"{path}: cannot decode this image ({type(exc).__name__}: {exc}); replace or delete the "
                        "file") from None


class ImageFiles(torch.utils.data.Dataset):
    """(uint8 [3, S, S] tensor, label) for each file of a Split, through a Transform."""

    def __init__(self, files: list[str], labels: list[int], transform: Transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(self.files[i])), self.labels[i]


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract(model, files: list[str], labels: list[int], transform: Transform, device: torch.device,
            dtype: torch.dtype | None = None, batch_size: int = 256, workers: int = 0, desc: str = "features",
            layer: str | None = None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 features [N, D] on the CPU, int64 labels [N]) of the files, in their order: the frozen model's pooled
    `layer` (default: the last block's) under autocast `dtype` (None: fp32), streamed in batches with a progress
    bar (on a terminal)."""
    from tqdm import tqdm

    from ..data.images import normalize

    layer = layer or feature_layer(model)
    loader = torch.utils.data.DataLoader(ImageFiles(files, labels, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=False)
    out, ys = None, []
    at = 0
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for images, y in tqdm(loader, total=len(loader), desc=desc, leave=False, disable=None, dynamic_ncols=True,
                          file=sys.stderr):
        x = normalize(images, device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            f = forward_probes(model, x, {layer}, pooled=True)[layer]
        f = f.float()
        bad |= ~torch.isfinite(f).all()
        if out is None:
            out = torch.empty(len(files), f.shape[1], dtype=torch.float32)
        out[at:at + len(f)].copy_(f, non_blocking=False)
        at += len(f)
        ys.append(y)
    if out is None:
        raise DataError(f"{desc}: no images to extract features from")
    if bool(bad):
        raise DataError(f"{desc}: the {layer} features hold NaN or inf values: the checkpoint has diverged "
                        "weights; use an earlier checkpoint")
    return out, torch.cat(ys).to(torch.int64)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def checkpoint_fingerprint(path: str | os.PathLike) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def files_fingerprint(files: list[str], labels: list[int]) -> str:
    """sha1 of every (path, label, size, mtime) of a split, in order: any added, removed, relabelled or rewritten
    image changes it."""
    h = hashlib.sha1()
    for f, y in zip(files, labels):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0{y}\0missing\n".encode())
    return h.hexdigest()


def add_extraction_args(p) -> None:
    """The flags of every study that extracts features (transfer, fewshot): forward batch, workers, device,
    precision, the feature cache and --trust-checkpoint. The study reads them as args.batch_size / workers / device /
    amp / cache_dir / no_cache / trust_checkpoint."""
    import argparse

    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--workers", type=int, default=-1, help="data-loader workers (default: from the CPU count)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run: auto (a GPU when one is visible), cpu or cuda (default auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 forward (default: on with CUDA; on a CPU only where bf16 is native)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default $SEAL_FAST_CACHE/features, i.e. "
                                                      "~/.cache/seal_fast/features)")
    p.add_argument("--no-cache", action="store_true", help="extract features every time, store none")
    checkpoint.add_trust_flag(p)


def default_cache_dir() -> Path:
    from ..data.synthetic import cache_root

    return cache_root() / "features"


class FeatureCache:
    """Feature files keyed by checkpoint x dataset split x transform x layer x precision (see the module
    docstring). folder None: no cache (every call extracts)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.hits = self.misses = 0

    def path(self, ckpt_path: str, dataset: str, split: str, files: list[str], labels: list[int],
             transform: Transform, layer: str, dtype: torch.dtype | None) -> Path | None:
        if self.folder is None:
            return None
        key = {"version": FEATURES_VERSION, "checkpoint": checkpoint_fingerprint(ckpt_path),
               "files": files_fingerprint(files, labels), "count": len(files), "transform": asdict(transform),
               "layer": layer, "precision": str(dtype or torch.float32)}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        ck = Path(ckpt_path)
        safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa: E731
        return self.folder / f"{safe(dataset)}-{split}-{safe(ck.parent.name)}-{safe(ck.stem)}-{digest}.pt"

    def features(self, model, ckpt_path: str, dataset: str, split: str, files: list[str], labels: list[int],
                 transform: Transform, device: torch.device, dtype: torch.dtype | None, batch_size: int,
                 workers: int, desc: str, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(features, labels, "cache" | "extracted") of a split, from the cache when there, else extracted (and
        stored, atomically)."""
        layer = feature_layer(model)
        path = self.path(ckpt_path, dataset, split, files, labels, transform, layer, dtype)
        if path is not None and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob["features"].shape[0] == len(files) and blob["labels"].tolist() == list(labels):
                    self.hits += 1
                    return blob["features"], blob["labels"], f"cache {path}"
            except Exception:  # noqa: BLE001 - a broken or not-plain-data file (refused: nothing runs): extracted again
                pass
        self.misses += 1
        feats, ys = extract(model, files, labels, transform, device, dtype, batch_size, workers, desc,
                            layer=layer, channels_last=channels_last)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.save({"features": feats, "labels": ys, "layer": layer, "transform": asdict(transform),
                                 "checkpoint": str(Path(ckpt_path).resolve()), "dataset": dataset, "split": split},
                                path)
            except (OSError, SealError) as exc:
                print(f"note: could not cache features in {path.parent} ({exc}); continuing without", file=sys.stderr)
                return feats, ys, "extracted"
        return feats, ys, "extracted" + (f", cached in {path}" if path is not None else "")
