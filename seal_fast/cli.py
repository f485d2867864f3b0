"""What every command's parser shares: a usage line that names the way the command was started (the console
script `seal-depth`, or `python -m seal_fast depth`), and `--version`."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def prog_name(command: str, module: str | None = None) -> str:
    """`seal-COMMAND` when started as that console script, `python -m MODULE` when started as the module
    itself (the trainer's `python -m seal_fast.train`), else `python -m seal_fast COMMAND`."""
    started = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if started == f"seal-{command}":
        return started
    if module is not None and started.endswith(".py") and module.replace(".", os.sep) in sys.argv[0]:
        return f"python -m {module}"
    return f"python -m seal_fast {command}"


def command_parser(command: str, description: str | None = None, module: str | None = None,
                   **kwargs) -> argparse.ArgumentParser:
    """The ArgumentParser of one command, with `--version` (the package's version, then exit 0)."""
    p = argparse.ArgumentParser(prog=prog_name(command, module), description=description, **kwargs)
    p.add_argument("--version", action="version", version=f"seal-fast {__version__}",
                   help="print seal-fast's version and exit")
    return p
