"""A small learnable dataset written in the real Tiny-ImageNet layout (see layout.py).

Each class is a shape (circle, square, triangle, cross, ring) in a hue of its own, drawn at a random
place, size and shade over a random striped background with pixel noise: a network that learns
colour and shape separates the classes, so accuracy rises well above chance when training works.
A few images are saved as grayscale JPEGs, as in the real set. Written once into a cache folder.
"""

from __future__ import annotations

import colorsys
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
GRAYSCALE_EVERY = 97  # every 97th image is written as a 1-channel JPEG


def cache_root() -> Path:
    return Path(os.environ.get("SEAL_FAST_CACHE", Path.home() / ".cache" / "seal_fast"))


def _hue(label: int, num_classes: int) -> float:
    return (label / num_classes + 0.37 * (label % len(SHAPES))) % 1.0


def _draw(rng: np.random.Generator, label: int, num_classes: int, size: int) -> Image.Image:
    shape = SHAPES[label % len(SHAPES)]
    hue = (_hue(label, num_classes) + rng.uniform(-0.3, 0.3) / num_classes) % 1.0
    base = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
    # background: random dark-ish colour with stripes of random period and direction
    bg = rng.uniform(20, 120, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img = bg[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = tuple(int(c) for c in (base + rng.normal(0, 8, 3)).clip(0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:  # ring
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    arr = np.asarray(pil).astype(float) + rng.normal(0, 10, size=(size, size, 3))
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    out.info["box"] = tuple(int(v) for v in box)
    return out


def write_synthetic(root: str | os.PathLike, num_classes: int = 10, train_per_class: int = 160,
                    val_per_class: int = 20, size: int = 64, seed: int = 0) -> Path:
    """Write the dataset into `root` (which must not exist yet); returns `root`."""
    root = Path(root)
    wnids = [f"n{90000000 + k:08d}" for k in range(num_classes)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (root / "words.txt").write_text("".join(
        f"{w}\tsynthetic {SHAPES[k % len(SHAPES)]}, hue {_hue(k, num_classes):.2f}\n" for k, w in enumerate(wnids)))
    count = 0

    def save(img: Image.Image, path: Path) -> None:
        nonlocal count
        count += 1
        if count % GRAYSCALE_EVERY == 0:
            img = img.convert("L")
        img.save(path, format="JPEG", quality=90)

    for k, w in enumerate(wnids):
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        boxes = []
        for i in range(train_per_class):
            img = _draw(np.random.default_rng([seed, 0, k, i]), k, num_classes, size)
            name = f"{w}_{i}.JPEG"
            save(img, folder / name)
            boxes.append(name + "\t" + "\t".join(map(str, img.info["box"])))
        (root / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i in range(val_per_class * num_classes):
        k = i % num_classes
        img = _draw(np.random.default_rng([seed, 1, i]), k, num_classes, size)
        name = f"val_{i}.JPEG"
        save(img, root / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[k]}\t" + "\t".join(map(str, img.info["box"])))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for i in range(num_classes):  # unlabelled test images, as in the real layout (unused)
        _draw(np.random.default_rng([seed, 2, i]), i, num_classes, size).save(root / "test" / "images" / f"test_{i}.JPEG")
    return root


# The demo's set: 96 train images a class = 30 steps of 32 a epoch, so the demo's 8 epochs of ResNet-50 (240 steps)
# fit in 6 minutes on a 2-core CPU without native bf16 (fp32, ~0.95 s a step there) and still reach ~45% val top-1.
DEMO_TRAIN_PER_CLASS = 96


def ensure_synthetic(num_classes: int = 10, train_per_class: int = DEMO_TRAIN_PER_CLASS, val_per_class: int = 20,
                     size: int = 64, seed: int = 0, cache: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The cached synthetic dataset folder, written on first use (atomically). Returns (path, created)."""
    params = f"v2-{num_classes}-{train_per_class}-{val_per_class}-{size}-{seed}"
    key = hashlib.sha1(params.encode()).hexdigest()[:10]
    base = Path(cache) if cache is not None else cache_root()
    final = base / f"synthetic-{key}" / "tiny-imagenet-200"
    if (final / "wnids.txt").is_file():
        return final, False
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="synthetic-tmp-", dir=final.parent.parent))
    try:
        write_synthetic(tmp / "tiny-imagenet-200", num_classes, train_per_class, val_per_class, size, seed)
        try:
            os.rename(tmp, final.parent)
        except OSError:  # another process finished first
            if not (final / "wnids.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, True
