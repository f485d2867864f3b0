"""What every study command shares at its two ends, written once: the parser (script-named usage line, --version),
the check that the checkpoints exist, the output folder (made and proved writable before any work, removed again
when the study fails before writing anything into it), the closing "wrote ..." line, and main() (one error line
and an exit code, never a traceback)."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from ..cli import command_parser
from ..errors import ConfigError, cli_main
from ..runtime import make_out_folder

NOTHING_WRITTEN = "interrupted; nothing was written"


def study_parser(command: str, description: str):
    """The study's ArgumentParser: usage names how it was started (seal-COMMAND / python -m seal_fast COMMAND)."""
    return command_parser(command, description)


def require_checkpoints(paths: Iterable[str], flag: str = "--checkpoint") -> None:
    """Every checkpoint file exists, checked before any folder is made or any work done."""
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file (a training run writes last.pt and best.pt)")


def default_out(command: str) -> str:
    return f"runs/{command}-{datetime.now():%Y%m%d-%H%M%S}"


_MADE: list[Path] = []  # output folders this process made, until the study finishes


def open_output(out: str | None, command: str) -> Path:
    """Make --out (default runs/COMMAND-<time>) and prove it writable, before any work. If the study then fails
    before it writes a result there, study_main removes a folder this call made (one that existed before is never
    touched), so a bad checkpoint or data folder leaves no empty --out behind."""
    path = Path(out or default_out(command))
    if not path.exists():
        _MADE.append(path)
    return make_out_folder(path)


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        if folder.is_dir() and all(p.name == ".lock" for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def say(msg: str) -> None:
    print(msg, flush=True)


def report_written(written: Iterable[Path | str]) -> None:
    say("wrote " + ", ".join(str(p) for p in written))


def study_main(run: Callable[[list[str] | None], int], argv: list[str] | None,
               interrupted: str = NOTHING_WRITTEN) -> int:
    """A study's main(): run(argv), a SealError as one "error:" line and its exit code, Ctrl-C as exit 130; on
    failure an output folder the study made and left empty is removed."""
    _MADE.clear()
    code = 1
    try:
        code = cli_main(run, argv, interrupted)
        return code
    finally:
        if code != 0:
            _remove_if_empty(_MADE)
        _MADE.clear()
