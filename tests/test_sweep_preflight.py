"""`python -m seal_fast sweep` checks before it spends: every run's trainer flags go through the trainer's own parser
and checks (seal_fast.preflight) before anything starts, the dry run included; --out naming a file is one line; the
exit codes are the documented ones; every option has a help text."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.runs import sweep

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--arch", "resnet10", "--generations", "2", "--ascent-epochs", "1", "--warmup", "1", "--batch-size", "16",
        "--workers", "0", "--device", "cpu"]
TINY = BASE + ["--epochs", "2"]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("case, words", [
    ("no-data", ["normal160-s0: ", "no such folder"]),
    ("unknown-flag", ["normal160-s0: ", "unrecognized arguments: --bogus"]),
    ("negative-lr", ["normal160-s0: ", "--lr -1.0: the peak learning rate must be positive"]),
    ("bad-type", ["normal160-s0: ", "--epochs", "invalid int value: 'two'"]),
])
def test_bad_trainer_flags_are_refused_before_anything_starts(tiny_data, tmp_path, capsys, dry, case, words):
    """The user's case: `sweep --dry-run` accepted a missing --data, an unknown flag and --lr -1 (exit 0), and the
    real sweep then failed every run."""
    extra = {"no-data": ["--data", str(tmp_path / "nowhere")], "unknown-flag": ["--data", str(tiny_data), "--bogus"],
             "negative-lr": ["--data", str(tiny_data), "--lr", "-1"],
             "bad-type": ["--data", str(tiny_data), "--epochs", "two"]}[case]
    out = tmp_path / "sweep"
    argv = ["--runs", "normal160,seal", "--seeds", "0", "1", "--out", str(out), *(BASE if case == "bad-type" else TINY),
            *extra]
    assert sweep.main(argv + (["--dry-run"] if dry else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not out.exists()                                         # nothing started, nothing written


def test_dry_run_plans_from_the_checked_flags(tiny_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(["--data", str(tiny_data), "--runs", "normal160,seal", "--seeds", "0", "1", "--out", str(out),
                       "--dry-run", *TINY]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0].endswith(("-s0", "-s1"))}
    assert sorted(lines) == ["normal160-s0", "normal160-s1", "seal-s0", "seal-s1"]
    assert "0/2 epochs" in lines["normal160-s0"] and "0/4 epochs" in lines["seal-s1"]   # 1 x 2 and 2 x 2 epochs
    assert "4 runs passed the trainer's checks; nothing was started" in text
    assert not out.exists()


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("sub", ["", "sub"])
def test_out_naming_a_file_is_one_line_exit_2(tmp_path, dry, sub):
    f = tmp_path / "afile"
    f.write_text("x")
    target = f / sub if sub else f
    res = subprocess.run([sys.executable, "-m", "seal_fast", "sweep", "--out", str(target), "--runs", "seal",
                          *(["--dry-run"] if dry else [])], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --out {target}: ") and "is a file" in res.stderr
    assert f.read_text() == "x"


def test_every_option_has_help_and_the_exit_codes_are_documented():
    p = sweep.parser()
    for action in p._actions:
        assert action.help, action.option_strings
    text = " ".join(p.format_help().split())
    for code in ("exit codes: 0 every run finished", "1 a run failed", "2 bad input", "3 every run that failed stopped "
                 "on a non-finite loss", "130 interrupted"):
        assert code in text
    assert "--seeds SEED [SEED ...]" in text and "--version" in text


@pytest.mark.parametrize("codes, expected", [((3, 3), 3), ((3, 1), 1), ((0, 1), 1), ((0, 0), 0)])
def test_exit_code_of_the_sweep_follows_its_runs(tiny_data, tmp_path, monkeypatch, capsys, codes, expected):
    """The runs are stand-in processes exiting with the given codes: 3 only when every failed run hit a non-finite
    loss, 1 when any other failure, 0 when all finished."""
    exits = iter(codes)

    def launch(run, threads, slot=None):
        run.folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({next(exits)})"])
        proc.log = open(os.devnull, "w")
        return proc

    monkeypatch.setattr(sweep, "launch", launch)
    assert sweep.main(["--data", str(tiny_data), "--runs", "normal160,seal", "--out", str(tmp_path / "s"),
                       "--threads-per-run", "1", *TINY]) == expected
    failed = sum(c != 0 for c in codes)
    assert (f"{failed} run(s) failed" in capsys.readouterr().err) == (failed > 0)
