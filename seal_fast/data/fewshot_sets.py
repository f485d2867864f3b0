"""The few-shot study's dataset layouts (`python -m seal_fast fewshot --dataset NAME --root DIR`): one reader each,
one split "all" from which episodes are drawn. The layouts are listed in folders.py's docstring; opened through
folders.open_fewshot."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .imagefolder import Dataset, _check_files, _check_root, _parent_if_named, _torchvision, scan_image_folder
from .layout import Split


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
