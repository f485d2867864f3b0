"""The transfer study's dataset layouts (`python -m seal_fast transfer --dataset NAME --root DIR`): one reader each,
turning the dataset as distributed (or torchvision's copy of it) into train / test (and val) `Split`s. The layouts
are listed in folders.py's docstring; opened through folders.open_transfer."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .imagefolder import (Dataset, _check_files, _check_root, _layout_error, _need_scipy, _parent_if_named,
                          _read_lines, _torchvision, _tv_split, scan_image_folder)
from .layout import Split


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

