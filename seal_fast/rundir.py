"""The run folder and the console: where a run writes (its --out, created and locked once), and what it says
(stdout, and the same lines in the folder's train.log), with the small file helpers the trainer needs there."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

from . import distributed
from .config import Config
from .errors import ConfigError
from .files import write_whole
from .runtime import lock_folder, make_out_folder


class Console:
    """say(msg): a line on stdout (rank 0 only; with --quiet only warnings and the result) and in train.log. Lines
    said before the folder exists wait, and go into train.log once `attach(out)` opens it."""

    def __init__(self, main: bool = True, quiet: bool = False):
        self.main, self.quiet = main, quiet
        self.pending: list[str] = []
        self.log = None

    def __call__(self, msg: str, result: bool = False) -> None:
        if not self.main:
            return
        if not self.quiet or result or msg.startswith(("warning", "error")):
            print(msg, flush=True)
        self.record(msg)

    def record(self, msg: str) -> None:
        """Into train.log only (an error line, which cli_main prints on stderr)."""
        if self.log is not None:
            self.log.write(msg + "\n")
            self.log.flush()
        elif self.main:
            self.pending.append(msg)

    def attach(self, out: Path) -> None:
        """Open out/train.log (appending: a resumed run continues it), unless stdout already goes there (a sweep
        sends each run's output to its train.log)."""
        if not self.main:
            return
        path = Path(out) / "train.log"
        if _same_file(sys.stdout, path):
            self.pending.clear()
            return
        self.log = open(path, "a", encoding="utf-8")
        for msg in self.pending:
            self.log.write(msg + "\n")
        self.log.flush()
        self.pending.clear()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def _same_file(stream, path: Path) -> bool:
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def prepare_out(cfg: Config, resuming: bool) -> Path:
    if cfg.out is None:  # a fresh folder per run: two runs started in the same second still get their own
        base = Path("runs") / f"{cfg.method}-s{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
        for n in range(1, 1000):
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                candidate.mkdir(parents=True)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise ConfigError(f"--out {candidate}: cannot write there ({exc.strerror or exc}); pass --out DIR "
                                  "with a folder you can write to") from None
        return make_out_folder(candidate)
    out = make_out_folder(cfg.out)
    if not resuming and (out / "last.pt").exists():
        raise ConfigError(f"--out {out} already holds a run (last.pt): continue it with --resume {out}, "
                          "or choose another --out")
    return out


LOCKS: list = []  # the output folder's lock, held until run() returns (release_locks) or the process dies


def setup_out(cfg: Config, resuming: bool, dist: distributed.Dist) -> Path:
    """Rank 0 checks and creates the output folder; every rank gets its path (or its error)."""
    out, error = None, None
    if dist.main:
        try:
            out = prepare_out(cfg, resuming)
            LOCKS.append(lock_folder(out))
        except ConfigError as exc:
            error = str(exc)
    out, error = distributed.broadcast((out, error), dist)
    if error:
        raise ConfigError(error)
    return out


def release_locks() -> None:
    while LOCKS:
        LOCKS.pop().close()


def append_line(path: Path, line: str) -> None:
    """Append one line; a failed write (a full disk) cuts the file back to where it was, so no half line stays."""
    data = memoryview((line + "\n").encode())
    with open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
        except OSError:
            f.truncate(size)
            raise


def rewrite_metrics(out: Path, history: list[dict]) -> None:
    """On resume: metrics.jsonl = exactly the epochs the checkpoint holds (drops a line written after it)."""
    write_whole(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
