"""The layout (docs/architecture.md): every command through `python -m seal_fast COMMAND`."""

import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_through_the_dispatcher(command):
    res = run("-m", "seal_fast", command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:"), res.stdout


def test_train_module_stays():
    res = run("-m", "seal_fast.train", "--help")
    assert res.returncode == 0, res.stderr
    assert "python -m seal_fast.train" in res.stdout


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_bare_lists_the_commands(args):
    res = run("-m", "seal_fast", *args)
    assert res.returncode == 0, res.stderr
    for command in COMMANDS:
        assert f"\n  {command} " in res.stdout, res.stdout


def test_unknown_command_is_one_line_exit_2():
    res = run("-m", "seal_fast", "nope")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: unknown command 'nope'"), res.stderr


def test_every_console_script_has_a_command():
    """setup.py's seal-NAME points at the module `python -m seal_fast NAME` runs."""
    script = (
        "import setuptools, runpy\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "print('\\n'.join(seen['entry_points']['console_scripts']))\n")
    done = run("-c", script)
    assert done.returncode == 0, done.stderr
    scripts = dict(line.split("=") for line in done.stdout.split())
    assert {name.removeprefix("seal-") for name in scripts} == set(COMMANDS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert (module, func) == (COMMANDS[name.removeprefix("seal-")][0], "main")
