"""The output folders of sweep, report and the study page: checked before anything is done, one line when they cannot
be used, and files of the command's own that never replace a file a run or a study wrote."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

MARK = "<!-- written by python -m seal_fast {command}: rewritten on every run of it -->"


def out_folder(path: str | Path, flag: str = "--out", create: bool = True) -> Path:
    """`path` as a folder to write into: a ConfigError line when it, or a folder above it, is a file, or when it
    cannot be created or written; created (and proved writable) when `create`."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"cannot be a folder: {p} is a file"
            raise ConfigError(f"{flag} {path}: {where}; give a folder (a new one is created)")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                          "write to") from None
    return path


def check_own(folder: Path, page: str, others: list[str], command: str) -> None:
    """Refuse (one line) to write `page` and `others` into `folder` when one of them is already there and is not the
    command's own: `page` (markdown) is the command's when it starts with MARK; the others are the command's only
    beside such a page."""
    mark = MARK.format(command=command)
    md = folder / page
    ours = md.is_file() and md.read_text(encoding="utf-8", errors="replace").startswith(mark)
    clash = [n for n in [page, *others] if (folder / n).exists() and not ours]
    if clash:
        raise ConfigError(f"{folder / clash[0]}: already there and not written by python -m seal_fast {command}; "
                          "nothing was replaced: give --out a folder of the report's own")


def marked(text: str, command: str) -> str:
    return MARK.format(command=command) + "\n\n" + text
