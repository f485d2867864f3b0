"""The dataset layouts the transfer and few-shot studies read, each turned into `Split`s (files, labels, classes).

Transfer (`python -m seal_fast transfer --dataset NAME --root DIR`), splits "train", "test" and, where the
dataset has one, "val":
  flowers102      torchvision.datasets.Flowers102 (official train / val / test; md5-checked .mat files, read with
                  scipy):  DIR/flowers-102/jpg/image_00001.jpg ..., imagelabels.mat, setid.mat
  fgvc-aircraft   torchvision.datasets.FGVCAircraft, the 100 variants (official train / val / test):
                  DIR/fgvc-aircraft-2013b/data/images/*.jpg, variants.txt, images_variant_{train,val,test}.txt
  cub200          CUB-200-2011 as distributed (official train / test; no val):  DIR/CUB_200_2011/images/...,
                  images.txt, image_class_labels.txt, train_test_split.txt, classes.txt
  mit67           MIT Indoor-67 as distributed (official train / test lists; no val):  DIR/Images/<class>/*.jpg,
                  DIR/TrainImages.txt, DIR/TestImages.txt (lines "<class>/<file>")
  stanford-dogs   Stanford Dogs as distributed (official train / test lists, read with scipy; no val):
                  DIR/Images/<synset-breed>/*.jpg, DIR/train_list.mat, DIR/test_list.mat (or under DIR/lists/)
  folder          an ImageFolder layout: DIR/train/<class>/*, DIR/test/<class>/*, optional DIR/val/<class>/*
Few-shot (`python -m seal_fast fewshot`), one split "all" from which episodes are drawn:
  eurosat         torchvision.datasets.EuroSAT (RGB):  DIR/eurosat/2750/<class>/*.jpg (or, read the same way,
                  DIR/2750/<class>/*.jpg: BSCD-FSL's EuroSAT/2750)
  cropdisease     BSCD-FSL's CropDisease (PlantVillage):  DIR/dataset/train/<class>/* (or DIR/<class>/*)
  folder          an ImageFolder layout:  DIR/<class>/*

An ImageFolder layout is read as torchvision's ImageFolder reads it: classes are the sub-folders in sorted order,
images (torchvision's IMG_EXTENSIONS) are found recursively in sorted order. A DIR given one level too deep or too
high (the dataset's own folder instead of its parent) is accepted where that is unambiguous. Anything missing or
malformed is a DataError that names the layout expected.

The generic reading is imagefolder.py, the readers transfer_sets.py and fewshot_sets.py; this module opens them
(and keeps every name the studies import from it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .fewshot_sets import read_cropdisease, read_eurosat, read_fewshot_folder
from .imagefolder import IMG_EXTENSIONS, LAYOUTS, Dataset, scan_image_folder
from .transfer_sets import (read_cub200, read_fgvc_aircraft, read_flowers102, read_mit67, read_stanford_dogs,
                            read_transfer_folder)

__all__ = ["IMG_EXTENSIONS", "LAYOUTS", "Dataset", "scan_image_folder", "TRANSFER_DATASETS", "FEWSHOT_DATASETS",
           "DISPLAY", "TRANSFER_READERS", "FEWSHOT_READERS", "open_transfer", "open_fewshot", "SYNTHETIC",
           "write_image_folder", "synthetic_dataset", "read_flowers102", "read_fgvc_aircraft", "read_cub200",
           "read_mit67", "read_stanford_dogs", "read_transfer_folder", "read_eurosat", "read_cropdisease",
           "read_fewshot_folder"]

TRANSFER_DATASETS = ("flowers102", "fgvc-aircraft", "cub200", "mit67", "stanford-dogs", "folder")
FEWSHOT_DATASETS = ("eurosat", "cropdisease", "folder")
DISPLAY = {"flowers102": "Flower102", "fgvc-aircraft": "FGVC-Aircraft", "cub200": "CUB-200", "mit67": "MIT-67",
           "stanford-dogs": "Stanford Dogs", "eurosat": "EuroSAT", "cropdisease": "CropDisease"}


TRANSFER_READERS = {"flowers102": read_flowers102, "fgvc-aircraft": read_fgvc_aircraft, "cub200": read_cub200,
                    "mit67": read_mit67, "stanford-dogs": read_stanford_dogs, "folder": read_transfer_folder}
FEWSHOT_READERS = {"eurosat": read_eurosat, "cropdisease": read_cropdisease, "folder": read_fewshot_folder}


def open_transfer(kind: str, root, download: bool = False) -> Dataset:
    if kind not in TRANSFER_READERS:
        raise ConfigError(f"--dataset {kind!r}: choose one of {', '.join(TRANSFER_DATASETS)}")
    return TRANSFER_READERS[kind](root, download)


def open_fewshot(kind: str, root, download: bool = False) -> Dataset:
    if kind not in FEWSHOT_READERS:
        raise ConfigError(f"--dataset {kind!r}: choose one of {', '.join(FEWSHOT_DATASETS)}")
    return FEWSHOT_READERS[kind](root, download)


# ----------------------------------------------------------------------------------------------
# Built-in synthetic sets (--dataset synthetic): the demo's drawings, other classes, in the layouts above
# ----------------------------------------------------------------------------------------------

SYNTHETIC = {  # study: (classes, {split: images per class})
    "transfer": (8, {"train": 40, "val": 10, "test": 20}),
    "fewshot": (8, {"all": 50}),
}


def write_image_folder(root: str | os.PathLike, num_classes: int, per_split: dict[str, int], size: int = 64,
                       seed: int = 0, ext: str = ".jpg") -> Path:
    """Learnable images in an ImageFolder layout: root/<split>/<class>/<i><ext> (split "all": root/<class>/...).
    Class k is synthetic.py's shape k % 5 in a hue of its own among `num_classes` (so not the demo's 10 classes)."""
    import numpy as np

    from .synthetic import _draw

    root = Path(root)
    for s, (split, count) in enumerate(per_split.items()):
        base = root if split == "all" else root / split
        for k in range(num_classes):
            folder = base / f"class_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = _draw(np.random.default_rng([seed, 7, s, k, i]), k, num_classes, size)
                img.save(folder / f"{i:04d}{ext}", quality=90) if ext == ".jpg" else img.save(folder / f"{i:04d}{ext}")
    return root


def synthetic_dataset(study: str, root: str | os.PathLike | None = None) -> Dataset:
    """The built-in set of a study, written once (atomically) into `root` or the data cache."""
    import shutil
    import tempfile

    from .synthetic import cache_root

    classes, per_split = SYNTHETIC[study]
    final = Path(root).expanduser() if root is not None else cache_root() / f"synthetic-{study}-v1"
    if not (final / ".complete").is_file():
        if final.exists() and any(final.iterdir()):
            raise ConfigError(f"--dataset synthetic --root {final}: the folder exists and is not a complete synthetic "
                              "set; give a new folder (or none: the data cache)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            write_image_folder(tmp, classes, per_split)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():
                final.rmdir()
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first
                if not (final / ".complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ds = read_transfer_folder(final) if study == "transfer" else read_fewshot_folder(final)
    ds.name, ds.kind = "synthetic", "synthetic"
    ds.source = f"built-in synthetic set ({classes} classes of coloured shapes, 64x64) in {final}"
    return ds
