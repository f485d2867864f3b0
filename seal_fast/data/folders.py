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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .layout import Split

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

TRANSFER_DATASETS = ("flowers102", "fgvc-aircraft", "cub200", "mit67", "stanford-dogs", "folder")
FEWSHOT_DATASETS = ("eurosat", "cropdisease", "folder")
DISPLAY = {"flowers102": "Flower102", "fgvc-aircraft": "FGVC-Aircraft", "cub200": "CUB-200", "mit67": "MIT-67",
           "stanford-dogs": "Stanford Dogs", "eurosat": "EuroSAT", "cropdisease": "CropDisease"}

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
# Transfer datasets
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


def read_flowers102(root, download: bool = False) -> Dataset:
    kind = "flowers102"
    root = Path(root).expanduser() if root is not None else None
    if download and root is not None:
        root.mkdir(parents=True, exist_ok=True)
    root = _parent_if_named(_check_root(kind, root), "flowers-102")
    _need_scipy(kind)
    splits = {}
    for split in ("train", "val", "test"):
        ds = _torchvision("Flowers102", kind, root, download and split == "train", split=split)
        files, labels = _tv_split(ds, kind, root, split)
        splits[split] = files, labels
    names = list(getattr(ds, "classes", None) or [])
    n = 1 + max(max(lab) for _, lab in splits.values())
    classes = names[:n] if len(names) >= n else [f"class {i + 1}" for i in range(n)]
    return Dataset("Flower102", kind, str(root), "torchvision.datasets.Flowers102, official train / val / test",
                   classes, {s: Split(f, lab, classes) for s, (f, lab) in splits.items()})


def read_fgvc_aircraft(root, download: bool = False) -> Dataset:
    kind = "fgvc-aircraft"
    root = Path(root).expanduser() if root is not None else None
    if download and root is not None:
        root.mkdir(parents=True, exist_ok=True)
    root = _parent_if_named(_check_root(kind, root), "fgvc-aircraft-2013b")
    splits, classes = {}, None
    for split in ("train", "val", "test"):
        ds = _torchvision("FGVCAircraft", kind, root, download and split == "train", split=split,
                          annotation_level="variant")
        files, labels = _tv_split(ds, kind, root, split)
        classes = list(ds.classes)
        splits[split] = Split(files, labels, classes)
    return Dataset("FGVC-Aircraft", kind, str(root), "torchvision.datasets.FGVCAircraft (variant, 100 classes), "
                   "official train / val / test", classes, splits)


def _read_lines(kind: str, root: Path, path: Path, fields: int) -> list[list[str]]:
    if not path.is_file():
        raise _layout_error(kind, root, f"{path} is missing")
    rows = [line.split(maxsplit=fields - 1) for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != fields]
    if bad or not rows:
        raise _layout_error(kind, root, f"{path} is malformed (expected {fields} fields a line)"
                            if bad else f"{path} is empty")
    return rows


def read_cub200(root, download: bool = False) -> Dataset:
    kind = "cub200"
    if download:
        raise ConfigError("--dataset cub200 has no --download (torchvision has no CUB class); unpack CUB_200_2011.tgz")
    root = _check_root(kind, root)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images = {i: p for i, p in _read_lines(kind, root, base / "images.txt", 2)}
    labels = {i: y for i, y in _read_lines(kind, root, base / "image_class_labels.txt", 2)}
    is_train = {i: t for i, t in _read_lines(kind, root, base / "train_test_split.txt", 2)}
    classes = [name for _, name in sorted(_read_lines(kind, root, base / "classes.txt", 2), key=lambda r: int(r[0]))]
    splits = {"train": ([], []), "test": ([], [])}
    for i in sorted(images, key=int):
        if i not in labels or i not in is_train:
            raise _layout_error(kind, root, f"image id {i} of images.txt has no line in image_class_labels.txt or "
                                            "train_test_split.txt")
        y = int(labels[i]) - 1
        if not 0 <= y < len(classes):
            raise _layout_error(kind, root, f"image id {i} has class {labels[i]}, not in classes.txt")
        f, lab = splits["train" if is_train[i] == "1" else "test"]
        f.append(str(base / "images" / images[i]))
        lab.append(y)
    for s, (f, _) in splits.items():
        _check_files(kind, root, s, f)
    return Dataset("CUB-200", kind, str(root), "CUB_200_2011, official train / test (train_test_split.txt)", classes,
                   {s: Split(f, lab, classes) for s, (f, lab) in splits.items()})


def read_mit67(root, download: bool = False) -> Dataset:
    kind = "mit67"
    if download:
        raise ConfigError("--dataset mit67 has no --download (torchvision has no MIT-67 class); unpack "
                          "indoorCVPR_09.tar beside TrainImages.txt and TestImages.txt")
    root = _check_root(kind, root)
    lists = {s: root / f"{s.capitalize()}Images.txt" for s in ("train", "test")}
    for path in lists.values():
        if not path.is_file():
            raise _layout_error(kind, root, f"{path} is missing")
    images = root / "Images"
    if not images.is_dir():
        raise _layout_error(kind, root, f"{images} is missing")
    entries = {s: [line.strip() for line in p.read_text().splitlines() if line.strip()] for s, p in lists.items()}
    bad = [e for es in entries.values() for e in es if "/" not in e]
    if bad:
        raise _layout_error(kind, root, f"{lists['train']} or {lists['test']} has line {bad[0]!r}, not "
                                        "<class>/<file>")
    classes = sorted({e.split("/", 1)[0] for e in entries["train"]})
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s, es in entries.items():
        unknown = [e for e in es if e.split("/", 1)[0] not in index]
        if unknown:
            raise _layout_error(kind, root, f"{lists[s]} lists {unknown[0]!r}, whose class has no train image")
        files = [str(images / e) for e in es]
        _check_files(kind, root, s, files)
        splits[s] = Split(files, [index[e.split("/", 1)[0]] for e in es], classes)
    return Dataset("MIT-67", kind, str(root), "MIT Indoor-67, official TrainImages.txt / TestImages.txt", classes,
                   splits)


def read_stanford_dogs(root, download: bool = False) -> Dataset:
    kind = "stanford-dogs"
    if download:
        raise ConfigError("--dataset stanford-dogs has no --download (torchvision has no Stanford Dogs class); "
                          "unpack images.tar and lists.tar")
    root = _check_root(kind, root)
    _need_scipy(kind)
    from scipy.io import loadmat

    images = root / "Images"
    if not images.is_dir():
        raise _layout_error(kind, root, f"{images} is missing")
    raw = {}
    for s in ("train", "test"):
        path = next((p for p in (root / f"{s}_list.mat", root / "lists" / f"{s}_list.mat") if p.is_file()), None)
        if path is None:
            raise _layout_error(kind, root, f"{root / f'{s}_list.mat'} is missing")
        try:
            m = loadmat(str(path))
            names = [str(x.ravel()[0] if hasattr(x, "ravel") else x) for x in m["file_list"].ravel()]
            labels = [int(y) - 1 for y in m["labels"].ravel()]
        except Exception as exc:  # noqa: BLE001 - scipy's errors for a broken .mat are many
            raise _layout_error(kind, root, f"{path} is not a Stanford Dogs list ({type(exc).__name__}: {exc})") \
                from None
        if len(names) != len(labels):
            raise _layout_error(kind, root, f"{path}: file_list and labels differ in length")
        raw[s] = names, labels
    by_label = {}
    for names, labels in raw.values():
        for n, y in zip(names, labels):
            by_label.setdefault(y, n.split("/", 1)[0])
    if sorted(by_label) != list(range(len(by_label))):
        raise _layout_error(kind, root, "its lists' labels are not 1..number of classes")
    classes = [by_label[y] for y in range(len(by_label))]
    splits = {}
    for s, (names, labels) in raw.items():
        files = [str(images / n) for n in names]
        _check_files(kind, root, s, files)
        splits[s] = Split(files, labels, classes)
    return Dataset("Stanford Dogs", kind, str(root), "Stanford Dogs, official train_list.mat / test_list.mat",
                   classes, splits)


def read_transfer_folder(root, download: bool = False) -> Dataset:
    kind = "folder-transfer"
    if download:
        raise ConfigError("--dataset folder has nothing to download; point --root at DIR with train/ and test/")
    root = _check_root(kind, root)
    for s in ("train", "test"):
        if not (root / s).is_dir():
            raise _layout_error(kind, root, f"{root / s} is missing")
    train = scan_image_folder(root / "train", kind, root)
    splits = {"train": train}
    for s in ("val", "test"):
        if (root / s).is_dir():
            splits[s] = scan_image_folder(root / s, kind, root, train.classes)
    return Dataset(root.name, "folder", str(root), "ImageFolder layout: " + " / ".join(splits), train.classes, splits)


# ----------------------------------------------------------------------------------------------
# Few-shot datasets
# ----------------------------------------------------------------------------------------------


def read_eurosat(root, download: bool = False) -> Dataset:
    kind = "eurosat"
    root = Path(root).expanduser() if root is not None else None
    if download and root is not None:
        root.mkdir(parents=True, exist_ok=True)
    root = _check_root(kind, root)
    if root.name == "2750" and root.parent.name == "eurosat":
        root = root.parent.parent
    else:
        root = _parent_if_named(root, "eurosat")
    if not download and not (root / "eurosat" / "2750").is_dir():
        # BSCD-FSL's own layout (EuroSAT/2750, the folder the zip unpacks to, under any name): the same ImageFolder
        # reading as torchvision's EuroSAT class, which only looks under DIR/eurosat/2750
        folder = root if root.name == "2750" else root / "2750"
        if folder.is_dir():
            split = scan_image_folder(folder, kind, root)
            return Dataset("EuroSAT", kind, str(root), f"ImageFolder {folder} (EuroSAT RGB), all images",
                           split.classes, {"all": split})
    ds = _torchvision("EuroSAT", kind, root, download)
    files = [str(p) for p, _ in ds.samples]
    labels = [int(y) for _, y in ds.samples]
    _check_files(kind, root, "all", files)
    return Dataset("EuroSAT", kind, str(root), "torchvision.datasets.EuroSAT (RGB), all images", list(ds.classes),
                   {"all": Split(files, labels, list(ds.classes))})


def read_cropdisease(root, download: bool = False) -> Dataset:
    kind = "cropdisease"
    if download:
        raise ConfigError("--dataset cropdisease has no --download; get the PlantVillage set BSCD-FSL uses "
                          "(its dataset/train/ folder)")
    root = _check_root(kind, root)
    folder = root / "dataset" / "train" if (root / "dataset" / "train").is_dir() else root
    split = scan_image_folder(folder, kind, root)
    return Dataset("CropDisease", kind, str(root), f"ImageFolder {folder} (BSCD-FSL's CropDisease), all images",
                   split.classes, {"all": split})


def read_fewshot_folder(root, download: bool = False) -> Dataset:
    kind = "folder-fewshot"
    if download:
        raise ConfigError("--dataset folder has nothing to download; point --root at DIR/<class>/<image>")
    root = _check_root(kind, root)
    split = scan_image_folder(root, kind, root)
    return Dataset(root.name, "folder", str(root), "ImageFolder layout, all images", split.classes, {"all": split})


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
