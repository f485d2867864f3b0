"""User-facing errors: each says what is wrong and how to fix it, and is printed without a traceback."""

from __future__ import annotations

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


class NonFiniteLossError(SealError):
    """Training produced a NaN or infinite loss."""

    exit_code = 3


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
