"""Is a folder the complete Tiny-ImageNet? (`python -m seal_fast.data verify DIR` / `prepare ZIP --to DIR`)

verify: checks a Tiny-ImageNet folder against the real set (200 classes, 500 train images each, 10,000 val
images listed in val_annotations.txt, every file there and decodable-looking) and says exactly what is
missing or extra. prepare: checks the archive's md5 (the official tiny-imagenet-200.zip), unpacks it into
DIR and verifies the result. Both exit non-zero on anything short of the full set.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..errors import DataError
from .layout import IMAGE_SUFFIXES, read_wnids

CLASSES, TRAIN_PER_CLASS, VAL_IMAGES = 200, 500, 10_000
ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def check_counts(root: str | Path, classes: int = CLASSES, train_per_class: int = TRAIN_PER_CLASS,
                 val_images: int = VAL_IMAGES) -> list[str]:
    """Every way the folder falls short of the full set (empty when complete), one readable line each."""
    root = Path(root)
    problems: list[str] = []
    wnids = read_wnids(root)  # raises DataError with the layout hint when the folder is not a dataset at all
    if len(wnids) != classes:
        problems.append(f"wnids.txt lists {len(wnids)} classes, the full set has {classes}")
    short = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        n = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
        if n != train_per_class:
            short.append(f"{wnid} ({n})")
    if short:
        problems.append(f"{len(short)} class(es) without {train_per_class} train images: {', '.join(short[:10])}"
                        + (f" and {len(short) - 10} more" if len(short) > 10 else ""))
    extra = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and p.name not in set(wnids)) \
        if (root / "train").is_dir() else []
    if extra:
        problems.append(f"train/ holds folders not in wnids.txt: {', '.join(extra[:10])}")
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        problems.append(f"{ann} is missing")
    else:
        known = set(wnids)
        lines = [ln.split("\t") for ln in ann.read_text().splitlines() if ln.strip()]
        missing = [c[0] for c in lines if not (root / "val" / "images" / c[0]).is_file()]
        unknown = [c[0] for c in lines if len(c) < 2 or c[1] not in known]
        if len(lines) != val_images:
            problems.append(f"val_annotations.txt lists {len(lines)} images, the full set has {val_images}")
        if missing:
            problems.append(f"{len(missing)} val image(s) listed but missing: {', '.join(missing[:10])}")
        if unknown:
            problems.append(f"{len(unknown)} val line(s) name a class not in wnids.txt: {', '.join(unknown[:10])}")
        listed = {c[0] for c in lines}
        images = root / "val" / "images"
        junk = sorted(p.name for p in images.iterdir() if p.name not in listed) if images.is_dir() else []
        if junk:
            problems.append(f"val/images holds {len(junk)} file(s) not in val_annotations.txt: {', '.join(junk[:10])}")
    return problems


def verify(root: str | Path, say=print, **sizes) -> int:
    problems = check_counts(root, **sizes)
    if problems:
        for p in problems:
            say(f"missing or wrong: {p}")
        say(f"{root}: NOT the complete Tiny-ImageNet ({len(problems)} problem(s) above)")
        return 1
    say(f"{root}: complete Tiny-ImageNet layout ({CLASSES} classes x {TRAIN_PER_CLASS} train, {VAL_IMAGES} val)")
    return 0


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(archive: str | Path, to: str | Path, say=print, expected_md5: str = ZIP_MD5, **sizes) -> int:
    archive, to = Path(archive), Path(to)
    if not archive.is_file():
        raise DataError(f"{archive}: no such file; download tiny-imagenet-200.zip first")
    got = md5(archive)
    if got != expected_md5:
        raise DataError(f"{archive}: md5 {got}, expected {expected_md5} (the official tiny-imagenet-200.zip); "
                        "the download is incomplete or another file")
    final = to / "tiny-imagenet-200"
    if final.exists():
        raise DataError(f"{final} already exists; verify it with python -m seal_fast.data verify {final}, or "
                        "remove it and prepare again")
    to.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=to))
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        inner = tmp / "tiny-imagenet-200"
        if not inner.is_dir():
            raise DataError(f"{archive}: holds no tiny-imagenet-200/ folder")
        inner.rename(final)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"unpacked {archive} into {final}")
    return verify(final, say, **sizes)
