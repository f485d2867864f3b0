"""Files written whole: every command's outputs (tables, JSON, CSV, pages, metrics.jsonl rewrites) go through
here, so a reader never sees half a file and a failure or a kill while writing leaves the earlier file as it was.
Checkpoints have their own, fsync'd writer (checkpoint.py). No torch here: the runs' commands import it too."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_whole(path: str | os.PathLike):
    """A text file opened for writing under a temporary name beside `path` (newline="", as csv wants), renamed over
    `path` once closed whole; on any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_whole(path: str | os.PathLike, text: str) -> None:
    """`text` into `path`, replaced whole (see written_whole)."""
    with written_whole(path) as f:
        f.write(text)
