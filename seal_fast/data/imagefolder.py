"""Reading image datasets from folders, for every layout in folders.py: the ImageFolder reading (torchvision's: sorted
class sub-folders, images found recursively in sorted order), torchvision's dataset classes behind one-line errors,
the checks every layout shares (the root folder, the files a split lists) and the layouts expected, named in each
error. The transfer layouts are transfer_sets.py, the few-shot ones fewshot_sets.py; folders.py is the entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .layout import Split

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

LAYOUTS = {
    "flowers102": "DIR/flowers-102/ with jpg/image_00001.jpg ..., imagelabels.mat and setid.mat "
                  "(torchvision.datasets.Flowers102's layout; --download fetches it)",
    "fgvc-aircraft": "DIR/fgvc-aircraft-2013b/data/ with images/*.jpg, variants.txt and "
                     "images_variant_{train,val,test}.txt (torchvision.datasets.FGVCAircraft's layout; --download "
                     "fetches it)",
    "cub200": "DIR/CUB_200_2011/ with images/<class>/*.jpg, images.txt, image_class_labels.txt, "
              "train_test_split.txt and classes.txt (CUB_200_2011.tgz unpacked)",
    "mit67": "DIR/Images/<class>/*.jpg with DIR/TrainImages.txt and DIR/TestImages.txt (indoorCVPR_09.tar and the "
             "two lists)",
    "stanford-dogs": "DIR/Images/<synset-breed>/*.jpg with DIR/train_list.mat and DIR/test_list.mat (images.tar and "
                     "lists.tar unpacked into DIR)",
    "folder-transfer": "DIR/train/<class>/<image>, DIR/test/<class>/<image> and optionally DIR/val/<class>/<image> "
                       "(an ImageFolder per split, the same class folders in each)",
    "eurosat": "DIR/eurosat/2750/<class>/*.jpg (torchvision.datasets.EuroSAT's layout, RGB; --download fetches it) "
               "or DIR/2750/<class>/*.jpg",
    "cropdisease": "DIR/dataset/train/<class>/<image> (BSCD-FSL's CropDisease layout) or DIR/<class>/<image>",
    "folder-fewshot": "DIR/<class>/<image> (an ImageFolder: one sub-folder of images per class)",
}


@dataclass
class Dataset:
    name: str                      # the dataset's name in tables ("Flower102", or --name)
    kind: str                      # the --dataset value
    root: str
    source: str                    # how it was read: the torchvision class or the layout, and its splits
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)  # train / val / test, or all (few-shot)

    @property
    def has_val(self) -> bool:
        return "val" in self.splits


def _layout_error(kind: str, root: str | os.PathLike, what: str) -> DataError:
    return DataError(f"--dataset {kind.split('-')[0] if kind.startswith('folder') else kind} --root {root}: {what}; "
                     f"expected {LAYOUTS[kind]}")


def _check_root(kind: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ConfigError(f"--dataset {kind.split('-')[0] if kind.startswith('folder') else kind} needs --root DIR; "
                          f"expected {LAYOUTS[kind]}")
    root = Path(root).expanduser()
    if not root.exists():
        raise _layout_error(kind, root, "no such folder")
    if not root.is_dir():
        raise _layout_error(kind, root, "is a file, not a folder")
    return root


def _parent_if_named(root: Path, name: str) -> Path:
    """torchvision's classes take the folder above the dataset's own folder; accept the dataset's folder too."""
    return root.parent if root.name == name and not (root / name).exists() else root


def _check_files(kind: str, root: Path, split: str, files: list[str]) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise _layout_error(kind, root, f"{missing[0]} is missing ({len(missing)} of the {len(files)} {split} images "
                                        "its split lists are)")
    if not files:
        raise _layout_error(kind, root, f"its {split} split lists no images")


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in sorted(os.walk(folder, followlinks=True)):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def scan_image_folder(folder: str | os.PathLike, kind: str, root: str | os.PathLike,
                      classes: list[str] | None = None) -> Split:
    """ImageFolder's reading of `folder`: sorted class sub-folders, images found recursively, sorted. With `classes`
    (another split's), labels follow that list and a class folder it lacks is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _layout_error(kind, root, f"{folder} is missing")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not found:
        loose = [f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS)]
        raise _layout_error(kind, root, f"{folder} has no class sub-folders"
                                        f"{f' (it holds {len(loose)} images directly)' if loose else ''}")
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise _layout_error(kind, root, f"{folder} has class folder {extra[0]!r}, which the train split lacks "
                                            f"({len(extra)} such)")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        images = _images_under(folder / c)
        if not images:
            raise _layout_error(kind, root, f"{folder / c} holds no images ({', '.join(IMG_EXTENSIONS)})")
        files += images
        labels += [index[c]] * len(images)
    return Split(files, labels, list(classes))


# ----------------------------------------------------------------------------------------------
# torchvision's dataset classes, and split files
# ----------------------------------------------------------------------------------------------


def _torchvision(cls_name: str, kind: str, root: Path, download: bool, **kwargs):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    try:
        return cls(str(root), download=download, **kwargs)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise _layout_error(kind, root, "not found there, or its files fail torchvision's checks"
                                + ("" if download else " (pass --download to fetch it)")) from None
        raise DataError(f"--dataset {kind} --root {root}: torchvision.datasets.{cls_name} failed ({exc})") from None
    except (FileNotFoundError, KeyError, ValueError) as exc:  # a missing or malformed annotation file or class folder
        first = (str(exc).strip().splitlines() or [""])[0]
        raise _layout_error(kind, root, f"torchvision.datasets.{cls_name} found it incomplete or malformed "
                                        f"({type(exc).__name__}: {first})") from None
    except OSError as exc:  # download without network, a broken archive, a permission problem
        raise DataError(f"--dataset {kind} --root {root}: torchvision.datasets.{cls_name} could not "
                        f"{'download or ' if download else ''}read it ({type(exc).__name__}: {exc})") from None


def _need_scipy(kind: str) -> None:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        raise ConfigError(f"--dataset {kind} reads its .mat split files with scipy, which is not installed: "
                          "pip install scipy") from None


def _tv_split(ds, kind: str, root: Path, split: str) -> tuple[list[str], list[int]]:
    files = getattr(ds, "_image_files", None)
    labels = getattr(ds, "_labels", None)
    if files is None or labels is None:
        raise DataError(f"--dataset {kind}: this torchvision ({type(ds).__name__}) keeps no _image_files / _labels; "
                        "use torchvision 0.13 to 0.29, or the folder layout")
    files = [str(f) for f in files]
    _check_files(kind, root, split, files)
    return files, [int(y) for y in labels]


def _read_lines(kind: str, root: Path, path: Path, fields: int) -> list[list[str]]:
    if not path.is_file():
        raise _layout_error(kind, root, f"{path} is missing")
    rows = [line.split(maxsplit=fields - 1) for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != fields]
    if bad or not rows:
        raise _layout_error(kind, root, f"{path} is malformed (expected {fields} fields a line)"
                            if bad else f"{path} is empty")
    return rows

