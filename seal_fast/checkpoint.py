"""The run's checkpoint schema (RunState), atomic writes and the RNG state needed for an exact resume.

Every writer and reader of `last.pt` / `best.pt` goes through `RunState`: the trainer writes them
(`write_last`, `write_best`), the trainer's --resume and every study read them (`read`). Schema 2 (this
one) keeps schema 1's keys, so files of either version read the same way:
  last.pt  kind "last": model, optimizer, scaler, rng, config, next_epoch, best_val, metrics (resumable)
  best.pt  kind "best": model, config, next_epoch, val_acc (weights only; schema 1 wrote global_epoch)
  gen<G>.pt, gen<G>-after-ascent.pt  kind "generation": the weights at the end of generation G (and of
           SEAL's ascent in it), val_acc the last val top-1 there, as the published code keeps them
`model` holds the plain model's state_dict (no wrapper prefixes); `next_epoch` counts the global epochs
done. `save` writes to a temporary file in the same folder, flushes and fsyncs it, renames it over the
target and fsyncs the folder: a kill at any moment leaves either the old or the new file, whole.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, SealError

SCHEMA = 2


@dataclass
class RunState:
    model: dict                          # the plain model's state_dict
    config: dict                         # Config.to_dict() of the run
    next_epoch: int                      # global epochs done (the plan index to continue from)
    kind: str = "last"                   # "last" (resumable), "best" or "generation" (weights only)
    optimizer: dict | None = None        # last only: torch.optim.SGD-compatible state_dict
    scaler: dict | None = None           # last only: GradScaler state
    rng: dict | None = None              # last only: rng_state()
    best_val: float | None = None        # best val top-1 so far (last)
    val_acc: float | None = None         # the val top-1 of these weights (best)
    metrics: list = field(default_factory=list)  # last only: one dict per epoch done (metrics.jsonl)

    def to_dict(self) -> dict:
        d = {"version": SCHEMA, "kind": self.kind, "model": self.model, "config": self.config,
             "next_epoch": self.next_epoch}
        if self.kind == "last":
            d.update(optimizer=self.optimizer, scaler=self.scaler, rng=self.rng, best_val=self.best_val,
                     metrics=self.metrics)
        else:
            d.update(val_acc=self.val_acc, global_epoch=self.next_epoch - 1)  # global_epoch: schema 1 readers
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str | os.PathLike = "checkpoint") -> "RunState":
        if not isinstance(d, dict) or "model" not in d or "config" not in d:
            raise DataError(f"{path}: not a seal_fast checkpoint (no model / config); pass a last.pt or best.pt "
                            "written by python -m seal_fast.train")
        version = d.get("version", 1)
        if version > SCHEMA:
            raise DataError(f"{path}: checkpoint schema {version} is newer than this seal_fast reads ({SCHEMA}); "
                            "update seal_fast")
        resumable = "optimizer" in d and "next_epoch" in d
        kind = d.get("kind", "last" if resumable else "best")
        next_epoch = d["next_epoch"] if "next_epoch" in d else d.get("global_epoch", -1) + 1
        return cls(model=d["model"], config=dict(d["config"]), next_epoch=int(next_epoch), kind=kind,
                   optimizer=d.get("optimizer"), scaler=d.get("scaler"), rng=d.get("rng"),
                   best_val=d.get("best_val"), val_acc=d.get("val_acc"), metrics=list(d.get("metrics") or []))


def read(path: str | os.PathLike, resumable: bool = False) -> RunState:
    """A last.pt or best.pt of either schema; resumable=True also requires the optimizer and RNG state."""
    state = RunState.from_dict(load(path), path)
    if resumable and (state.kind != "last" or state.optimizer is None or state.rng is None):
        raise DataError(f"{path}: holds weights only ({state.kind}.pt), not a resumable state; resume from the "
                        "run folder's last.pt")
    return state


def write_last(state: RunState, folder: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    write(state, Path(folder) / "last.pt", saver)


def write_best(state: RunState, folder: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    write(state, Path(folder) / "best.pt", saver)


def write(state: RunState, path: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    """Atomically now, or on the saver's thread (snapshot taken now) when a BackgroundSaver is given."""
    (saver.save if saver is not None else save)(state.to_dict(), path)


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
