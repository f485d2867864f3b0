"""seal_fast.cli: the usage line names how the command was started; --version answers on every parser."""

import sys

import pytest

from seal_fast import __version__
from seal_fast.cli import command_parser, prog_name


def test_prog_name_follows_how_the_command_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/seal-depth", "--help"])
    assert prog_name("depth") == "seal-depth"
    monkeypatch.setattr(sys, "argv", ["/x/seal_fast/__main__.py", "depth"])
    assert prog_name("depth") == "python -m seal_fast depth"
    monkeypatch.setattr(sys, "argv", ["/x/seal_fast/train.py"])
    assert prog_name("train", module="seal_fast.train") == "python -m seal_fast.train"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        command_parser("report").parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"seal-fast {__version__}"
