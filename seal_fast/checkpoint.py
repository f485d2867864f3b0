"""Atomic checkpoints and the RNG state needed for an exact resume.

`save` writes to a temporary file in the same folder, flushes and fsyncs it, renames it over the
target and fsyncs the folder: a kill at any moment leaves either the old or the new file, whole.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import SealError


def save(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SealError(f"{path}: no checkpoint to resume from (a run writes last.pt at the end of its first epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SealError(f"{path}: cannot read this checkpoint ({type(exc).__name__}: {exc})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(obj):
    """A copy of `obj` that later in-place training cannot change: tensors copied to the CPU, containers rebuilt."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundSaver:
    """`save()` snapshots the state to the CPU at once and writes it (atomically, as `save` does) on a thread,
    behind the next epoch's training. Writes happen in order, one at a time; a new save first waits for the
    previous one, and a failed write raises at the next `save()` or `wait()`. A kill at any moment still leaves
    each file whole: the old one or the new one."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = []

    def save(self, obj: dict, path: str | os.PathLike) -> None:
        self.wait()
        self._pending.append(self._pool.submit(save, snapshot(obj), path))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            try:
                f.result()
            except OSError as exc:
                raise SealError(f"could not write a checkpoint ({exc.strerror or exc}: {exc.filename or ''}); "
                                "free some disk space or choose another --out, then resume") from None
