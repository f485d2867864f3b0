"""The table workflow: sweep (resume-and-skip, --jobs K == one at a time, bit for bit), and the folder lock that
keeps two trainers out of one folder. The report's tests: tests/test_report.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from seal_fast import runtime, train
from seal_fast.runs import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--arch", "resnet10", "--epochs", "2", "--generations", "2", "--ascent-epochs", "1", "--warmup", "1",
         "--batch-size", "16", "--workers", "0", "--device", "cpu", "--eval-every", "1", "--keep-generations", "none"]


def sweep_cmd(data, out, *extra):
    return [sys.executable, "-m", "seal_fast", "sweep", "--data", str(data), "--runs", "normal160,seal", "--seeds", "0",
            "--out", str(out), "--threads-per-run", "1", *extra, *TRAIN]


def weights(folder):
    return torch.load(folder / "last.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def sequential(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "seq"
    res = subprocess.run(sweep_cmd(tiny_data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.mark.slow
def test_sweep_trains_each_run_in_its_folder_and_skips_finished_ones(sequential, tiny_data):
    assert sorted(p.name for p in sequential.iterdir()) == ["normal160-s0", "seal-s0"]
    assert json.loads((sequential / "normal160-s0" / "config.json").read_text())["generations"] == 1
    assert json.loads((sequential / "seal-s0" / "config.json").read_text())["method"] == "seal"
    res = subprocess.run(sweep_cmd(tiny_data, sequential), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "2 finished already, 0 to train" in res.stdout


@pytest.mark.slow
def test_two_jobs_at_once_equal_one_at_a_time(sequential, tiny_data, tmp_path):
    out = tmp_path / "par"
    res = subprocess.run(sweep_cmd(tiny_data, out, "--jobs", "2"), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for run in ("normal160-s0", "seal-s0"):
        a, b = weights(sequential / run), weights(out / run)
        assert all(torch.equal(a[k], b[k]) for k in a), run


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_ends_where_an_uninterrupted_one_does(sequential, tiny_data, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(sweep_cmd(tiny_data, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "seal-s0" / "last.pt").exists():  # mid-way through the 2nd run
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training, as a preemption does
    proc.wait()
    assert (out / "normal160-s0" / "last.pt").exists(), "the kill came before the sweep got going"
    res = subprocess.run(sweep_cmd(tiny_data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 finished already, 1 to train" in res.stdout and "start  seal-s0 (resuming at epoch" in res.stdout
    for run in ("normal160-s0", "seal-s0"):
        a, b = weights(sequential / run), weights(out / run)
        assert all(torch.equal(a[k], b[k]) for k in a), run


def test_dry_run_lists_runs_and_says_hours_are_unknown_without_a_measurement(sequential, tiny_data, capsys):
    assert sweep.main(["--data", str(tiny_data), "--runs", "normal160,seal", "--seeds", "0", "1", "--out",
                       str(sequential), "--dry-run", "--partial-data"]) == 0
    text = capsys.readouterr().out
    assert "normal160-s0" in text and "finished" in text and "seal-s1" in text and "new" in text
    assert "projected GPU hours: unknown" in text


@pytest.mark.parametrize("args, words", [
    (["--runs", "seal,sgd"], "unknown run kind(s) sgd"),
    (["--jobs", "0"], "--jobs 0"),
    (["--method", "llf"], "--method: set by the sweep"),
    (["--seeds", "1", "1"], "a seed is listed twice"),
])
def test_sweep_refuses_bad_input_in_one_line(tmp_path, capsys, args, words):
    assert sweep.main(["--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err


# ---- the folder lock (report: tests/test_report.py) ----------------------------------------------


def test_two_trainers_never_share_a_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    held = runtime.lock_folder(out)  # as a trainer running there holds it
    try:
        assert train.main(["--data", str(tiny_data), "--out", str(out), *TRAIN]) == 2
        assert "another process is training in this folder" in capsys.readouterr().err
    finally:
        held.close()
    assert train.main(["--data", str(tiny_data), "--out", str(out), *TRAIN, "--generations", "1"]) == 0
