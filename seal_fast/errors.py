"""User-facing errors: each says what is wrong and how to fix it, and is printed without a traceback."""

from __future__ import annotations

import errno
import os
import sys


class SealError(Exception):
    """Base class of the errors `python -m seal_fast.train` reports as one clear message."""

    exit_code = 1


class ConfigError(SealError):
    """A flag or a combination of flags that cannot run."""

    exit_code = 2


class DataError(SealError):
    """A dataset folder, file or image that is missing or broken."""

    exit_code = 2


class UntrustedFileError(DataError):
    """A file handed to a command that is not plain data (a checkpoint whose pickle would run code): refused."""


class WriteError(SealError):
    """An output that could not be written (a full disk): what, where, and that the previous file is whole."""


class NonFiniteLossError(SealError):
    """Training produced a NaN or infinite loss."""

    exit_code = 3


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_failure(exc: OSError, path, atomic: bool = True, then: str | None = None) -> str:
    """One line for a failed write of `path`: a full filesystem (or quota) says which and how much is free. atomic: the
    write replaces `path` only once whole (checkpoint.save), so the previous file is still there, whole. then: what
    to do once there is room (default: run again; a training run resumes)."""
    then = then or "run again (a training run: --resume with its folder)"
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if exc.errno in DISK_FULL:
        try:
            import shutil

            free = f", {shutil.disk_usage(folder).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        what = "the disk quota is used up" if exc.errno == errno.EDQUOT else "no space left"
        kept = f"; the earlier {os.path.basename(path)} there, if any, is untouched and whole" if atomic else ""
        return (f"could not write {path}: {what} on the filesystem holding {folder}{free}{kept}. Free space there "
                f"(or move the folder), then {then}")
    kept = f"; the earlier {os.path.basename(path)} there, if any, is untouched and whole" if atomic else ""
    return f"could not write {path} ({exc.strerror or exc}){kept}. Fix that, then {then}"


def one_line(exc: BaseException) -> str:
    """One clear line, also for errors re-raised from a DataLoader worker (which embed a traceback)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[1] if "Error: " in last else last
    return text


def cli_main(run, argv: list[str] | None, interrupted: str) -> int:
    """Run a command's `run(argv)`: a SealError becomes one "error:" line and its exit code, never a traceback."""
    try:
        return run(argv)
    except SealError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a full disk wherever an output is written: one line, never a traceback
        if exc.errno not in DISK_FULL:
            raise
        print(f"error: {write_failure(exc, exc.filename or 'an output file', atomic=False)}", file=sys.stderr)
        return WriteError.exit_code
