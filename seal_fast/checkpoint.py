"""The run's checkpoint schema (RunState), safe loading, atomic writes and the RNG state needed for an exact resume.

Every writer and reader of `last.pt` / `best.pt` goes through `RunState`: the trainer writes them
(`write_last`, `write_best`), the trainer's --resume and every study read them (`read`).
  last.pt  kind "last": model, optimizer, scaler, rng, config, next_epoch, best_val, metrics (resumable)
  best.pt  kind "best": model, config, next_epoch, val_acc (weights only; schema 1 wrote global_epoch)
  gen<G>.pt, gen<G>-after-ascent.pt  kind "generation": the weights at the end of generation G (and of
           SEAL's ascent in it), val_acc the last val top-1 there, as the published code keeps them
`model` holds the plain model's state_dict (no wrapper prefixes); `next_epoch` counts the global epochs
done. `save` writes to a temporary file in the same folder, flushes and fsyncs it, renames it over the
target and fsyncs the folder: a kill at any moment, or a full disk, leaves either the old or the new file, whole.

A checkpoint is data, never code. Schema 3 (this one) holds only what PyTorch's safe unpickler
(torch.load(weights_only=True)) accepts: tensors, numbers, strings, None, lists, tuples and dicts; the RNG states
of numpy and Python are plain ints (`rng_state`). `load` reads every file through that unpickler. Schemas 1 and 2
kept numpy's RNG state as a uint32 ndarray: those files read through the same safe unpickler with exactly the
numpy types of that array allowed (`LEGACY_SAFE_GLOBALS`, the one allow-list), and `RunState.from_dict` turns the
state into schema 3's plain form. Anything else that is not plain data (a pickle that would call a function or
build an arbitrary object: a code-carrying file) is refused with one line naming the file; only `trust=True`
(the commands' --trust-checkpoint) loads it with Python's full unpickler, which runs whatever the file carries.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, SealError, UntrustedFileError, WriteError, write_failure

SCHEMA = 3

TRUST_FLAG = "--trust-checkpoint"
TRUST_HELP = ("also load checkpoints that are not plain data, with Python's full unpickler, which runs any code "
              "such a file carries: only for files you made yourself or fully trust")


def add_trust_flag(parser) -> None:
    """--trust-checkpoint, the same words in every command that reads checkpoints."""
    parser.add_argument(TRUST_FLAG, action="store_true", dest="trust_checkpoint", help=TRUST_HELP)


def _legacy_safe_globals() -> list:
    """The one allow-list: the types of numpy's legacy RNG state (np.random.get_state()[1], a uint32 ndarray), which
    schema 1 / 2 last.pt files hold. Both spellings of numpy's reconstructor (numpy 2 `numpy._core`, numpy 1
    `numpy.core`). Used only to read those older files; schema 3 holds no numpy object."""
    core = np._core if hasattr(np, "_core") else np.core
    rec = core.multiarray._reconstruct
    return [(rec, "numpy._core.multiarray._reconstruct"), (rec, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


LEGACY_SAFE_GLOBALS = _legacy_safe_globals()


@dataclass
class RunState:
    model: dict                          # the plain model's state_dict
    config: dict                         # Config.to_dict() of the run
    next_epoch: int                      # global epochs done (the plan index to continue from)
    kind: str = "last"                   # "last" (resumable), "best" or "generation" (weights only)
    optimizer: dict | None = None        # last only: torch.optim.SGD-compatible state_dict
    scaler: dict | None = None           # last only: GradScaler state
    rng: dict | None = None              # last only: rng_state() (plain ints and tensors)
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
        if not isinstance(d, dict) or "model" not in d or not isinstance(d.get("config"), dict):
            raise DataError(f"{path}: not a seal_fast checkpoint (no model / config); pass a last.pt or best.pt "
                            "written by python -m seal_fast.train")
        version = d.get("version", 1)
        if not isinstance(version, int) or version > SCHEMA:
            raise DataError(f"{path}: checkpoint schema {version} is newer than this seal_fast reads ({SCHEMA}); "
                            "update seal_fast")
        resumable = "optimizer" in d and "next_epoch" in d
        kind = d.get("kind", "last" if resumable else "best")
        next_epoch = d["next_epoch"] if "next_epoch" in d else d.get("global_epoch", -1) + 1
        try:
            next_epoch = int(next_epoch)
        except (TypeError, ValueError):
            raise DataError(f"{path}: its next_epoch ({next_epoch!r}) is not a number; not a seal_fast "
                            "checkpoint") from None
        return cls(model=d["model"], config=dict(d["config"]), next_epoch=next_epoch, kind=kind,
                   optimizer=d.get("optimizer"), scaler=d.get("scaler"), rng=plain_rng(d.get("rng")),
                   best_val=d.get("best_val"), val_acc=d.get("val_acc"), metrics=list(d.get("metrics") or []))


def read(path: str | os.PathLike, resumable: bool = False, trust: bool = False) -> RunState:
    """A last.pt or best.pt of any schema; resumable=True also requires the optimizer and a well-formed RNG state.
    trust: see `load`."""
    if resumable and not Path(path).is_file():
        raise SealError(f"{path}: no checkpoint to resume from (a run writes last.pt at the end of its first epoch)")
    state = RunState.from_dict(load(path, trust=trust), path)
    if resumable and (state.kind != "last" or state.optimizer is None or state.rng is None):
        raise DataError(f"{path}: holds weights only ({state.kind}.pt), not a resumable state; resume from the "
                        "run folder's last.pt")
    if resumable:
        problem = rng_problem(state.rng)
        if problem:
            raise DataError(f"{path}: its RNG state is malformed ({problem}); resume from a last.pt written by "
                            "seal_fast")
    return state


def write_last(state: RunState, folder: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    write(state, Path(folder) / "last.pt", saver)


def write_best(state: RunState, folder: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    write(state, Path(folder) / "best.pt", saver)


def write(state: RunState, path: str | os.PathLike, saver: "BackgroundSaver | None" = None) -> None:
    """Atomically now, or on the saver's thread (snapshot taken now) when a BackgroundSaver is given. A failed write
    (a full disk) is a WriteError that names the file and its filesystem; the previous file stays whole."""
    if saver is not None:
        saver.save(state.to_dict(), path)
        return
    try:
        save(state.to_dict(), path)
    except OSError as exc:
        raise WriteError(write_failure(exc, path)) from None


class _Sink:
    """The file object torch.save writes to: it keeps the OSError of a failed write (a full disk), which torch's
    zip writer would otherwise turn into an opaque RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def save(obj: dict, path: str | os.PathLike) -> None:
    """Write `obj` with torch.save, atomically: a temporary file in the same folder, flushed and fsynced, renamed over
    `path`, the folder fsynced. Any failure (a kill, a full disk) leaves `path` as it was and removes the temporary
    file; a failed write raises OSError (errno ENOSPC for a full disk) naming `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = os.fdopen(fd, "wb")
    try:
        try:
            sink = _Sink(f)
            try:
                torch.save(obj, sink)
            except Exception:
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        finally:
            try:
                f.close()
            except OSError:  # the buffered rest of a failed write: the file is being dropped anyway
                pass
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


# ----------------------------------------------------------------------------------------------
# Loading: data only
# ----------------------------------------------------------------------------------------------


def _torch_load(path: Path, weights_only: bool):
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _unsafe_globals(path: Path) -> list[str]:
    """The functions / classes the file's pickle names that the safe unpickler does not allow (read statically:
    nothing runs)."""
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint, or unreadable: no names to give
        return []


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                       "Check the documentation", "(1)", "(2)"))]
    return f"{type(exc).__name__}: {(useful or lines or [''])[0][:300]}"


def load(path: str | os.PathLike, trust: bool = False) -> dict:
    """The object a checkpoint holds, through PyTorch's safe unpickler (weights_only=True): plain data only.

    A schema 1 / 2 file is read the same way with numpy's RNG-state types allowed (LEGACY_SAFE_GLOBALS). A file whose
    pickle names anything else (code it would run on loading) raises UntrustedFileError, one line naming the file
    and --trust-checkpoint, and nothing of it runs; with trust=True it is loaded by Python's full unpickler."""
    path = Path(path)
    if not path.is_file():
        raise SealError(f"{path}: no such checkpoint file (a training run writes last.pt, best.pt and gen<G>.pt)")
    try:
        try:
            return _torch_load(path, weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
                return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = exc
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / EOFError / ... for a broken file
        raise SealError(f"{path}: cannot read this checkpoint ({_short(exc)})") from None
    unsafe = _unsafe_globals(path)
    if trust:
        carries = f" (it names {', '.join(unsafe)})" if unsafe else ""
        print(f"warning: {TRUST_FLAG}: loading {path} with Python's full unpickler{carries}", file=sys.stderr)
        try:
            return _torch_load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise SealError(f"{path}: cannot read this checkpoint ({_short(exc)})") from None
    named = unsafe or re.findall(r"(?:GLOBAL|global:?) ([\w.]+)", str(refused))
    if named or "global" in str(refused).lower():
        what = ", ".join(named[:4]) + (" ..." if len(named) > 4 else "") if named else "objects outside plain data"
        raise UntrustedFileError(
            f"{path}: refused: not plain data, loading it would run code it carries ({what}); nothing of it was run. "
            f"Use only checkpoints from people you trust; if you made this file yourself or fully trust it, add "
            f"{TRUST_FLAG}")
    raise SealError(f"{path}: cannot read this checkpoint ({_short(refused)})")


# ----------------------------------------------------------------------------------------------
# RNG state: plain ints and tensors
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch's, numpy's (legacy MT19937) and Python's RNG states, as tensors and plain ints (exactly)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(kind), "key": [int(k) for k in key], "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def plain_rng(rng):
    """An RNG state of any schema in schema 3's plain form: schema 1 / 2 kept numpy's as np.random.get_state()'s tuple
    (a uint32 ndarray inside) and Python's as random.getstate()'s tuple. Anything unrecognised is left as it is
    (rng_problem says what is wrong with it)."""
    if not isinstance(rng, dict):
        return rng
    out = dict(rng)
    n = rng.get("numpy")
    if isinstance(n, (tuple, list)) and len(n) == 5:
        key = n[1]
        key = key.tolist() if isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.ndim == 1 else key
        out["numpy"] = {"bit_generator": n[0], "key": key, "pos": n[2], "has_gauss": n[3], "cached_gaussian": n[4]}
    p = rng.get("python")
    if isinstance(p, (tuple, list)) and len(p) == 3:
        out["python"] = {"version": p[0], "state": list(p[1]) if isinstance(p[1], (tuple, list)) else p[1],
                         "gauss_next": p[2]}
    return out


def _ints(v, n: int, below: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(type(x) is int and 0 <= x < below for x in v)


def rng_problem(rng) -> str | None:
    """What is wrong with a (plain) RNG state, or None."""
    if not isinstance(rng, dict):
        return "not a dict"
    t = rng.get("torch")
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
        return "torch: not a uint8 tensor"
    n = rng.get("numpy")
    if not (isinstance(n, dict) and n.get("bit_generator") == "MT19937" and _ints(n.get("key"), 624, 2 ** 32)
            and type(n.get("pos")) is int and 0 <= n["pos"] <= 624 and n.get("has_gauss") in (0, 1)
            and isinstance(n.get("cached_gaussian"), float)):
        return "numpy: not MT19937 with 624 key words, pos, has_gauss and cached_gaussian"
    p = rng.get("python")
    if not (isinstance(p, dict) and type(p.get("version")) is int and _ints(p.get("state"), 625, 2 ** 32)
            and (p.get("gauss_next") is None or isinstance(p.get("gauss_next"), float))):
        return "python: not a version, 625 state words and gauss_next"
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple))
                                 and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
        return "cuda: not a list of uint8 tensors"
    return None


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() (any schema's) recorded, exactly."""
    state = plain_rng(state)
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Background writes
# ----------------------------------------------------------------------------------------------


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
    previous one, and a failed write raises a WriteError (the file, what failed, the filesystem when it is full)
    at the next `save()` or `wait()`; the file it was replacing stays whole. A kill at any moment still leaves
    each file whole: the old one or the new one."""

    def __init__(self, then: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = []
        self.then = then  # the error's advice once there is room again (errors.write_failure)

    def save(self, obj: dict, path: str | os.PathLike) -> None:
        self.wait()
        self._pending.append((self._pool.submit(save, snapshot(obj), path), Path(path)))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f, path in pending:
            try:
                f.result()
            except OSError as exc:
                raise WriteError(write_failure(exc, path, then=self.then)) from None

