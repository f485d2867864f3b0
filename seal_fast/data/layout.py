"""The Tiny-ImageNet folder layout, parsed once for every loader.

    tiny-imagenet-200/
      wnids.txt                              class ids, one a line; label = line index
      train/<wnid>/images/<wnid>_<i>.JPEG    one folder deeper than a class-per-folder layout
      val/images/val_<i>.JPEG
      val/val_annotations.txt                file <TAB> wnid <TAB> 4 box ints
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp")
_HINT = "give --data the tiny-imagenet-200 folder (the one holding wnids.txt, train/ and val/)"


@dataclass
class Split:
    files: list[str]    # absolute paths
    labels: list[int]   # index into classes
    classes: list[str]  # wnids in wnids.txt order


def read_wnids(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {root}: no such folder; {_HINT}")
    if not root.is_dir():
        raise DataError(f"--data {root}: is a file, not a folder; {_HINT}")
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"{wnids_file}: missing; {_HINT}")
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{wnids_file}: lists no class ids; it needs one wnid a line")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{wnids_file}: lists a class id twice")
    return wnids


def scan_train(root: str | os.PathLike) -> Split:
    """Every train image in sorted order, labelled by its class folder's line in wnids.txt."""
    root = Path(root)
    wnids = read_wnids(root)
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{train}: missing; {_HINT}")
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = train / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; wnids.txt names class {wnid} but its train images are not there")
        found = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{folder}: has no images (.JPEG); class {wnid} of wnids.txt cannot be trained")
        files += found
        labels += [label] * len(found)
    return Split(files, labels, wnids)


def scan_val(root: str | os.PathLike) -> Split:
    """The val images in val_annotations.txt order, labelled from its wnid column."""
    root = Path(root)
    wnids = read_wnids(root)
    index = {w: i for i, w in enumerate(wnids)}
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"{ann}: missing; the val labels come from it")
    files, labels = [], []
    for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            raise DataError(f"{ann}:{lineno}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
        name, wnid = cols[0].strip(), cols[1].strip()
        if wnid not in index:
            raise DataError(f"{ann}:{lineno}: class {wnid!r} is not in wnids.txt")
        path = root / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"{ann}:{lineno}: names {name}, but {path} does not exist")
        files.append(str(path))
        labels.append(index[wnid])
    if not files:
        raise DataError(f"{ann}: lists no images")
    return Split(files, labels, wnids)
