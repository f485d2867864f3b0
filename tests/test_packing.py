"""Packed runs (`sweep --runs-per-gpu K`): the slots' environment (GPU, memory share), MPS started and stopped
around the sweep (a stand-in nvidia-cuda-mps-control on PATH records its calls), and K = 2 packed tiny runs
ending bit for bit where the same two runs trained alone end."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from seal_fast.errors import ConfigError
from seal_fast.runs import packing, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--arch", "resnet10", "--epochs", "2", "--generations", "2", "--ascent-epochs", "1", "--warmup", "1",
         "--batch-size", "16", "--workers", "0", "--device", "cpu", "--eval-every", "1", "--keep-generations", "none"]
TIMINGS = {"images_per_s", "train_seconds", "seconds"}


def fake_mps(bin_dir, calls, code=0):
    """An executable nvidia-cuda-mps-control that appends its argv, stdin and MPS folders to `calls`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / packing.MPS_CONTROL
    exe.write_text("#!/bin/sh\n"
                   f'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> {calls}\n'
                   f'if [ "$#" = 0 ]; then cat >> {calls}; fi\n'
                   f'[ {code} = 0 ] || echo "An instance of this daemon is already running" >&2\n'
                   f"exit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("text, gpus", [("0", ["0"]), ("0,1", ["0", "1"]), (" 2 , 3 ", ["2", "3"])])
def test_gpus_list(text, gpus):
    assert packing.parse_gpus(text) == gpus


@pytest.mark.parametrize("text", ["", "a", "0,0", "0;1", "-1"])
def test_bad_gpus_list_is_one_line(text):
    with pytest.raises(ConfigError, match="--gpus"):
        packing.parse_gpus(text)


def test_each_slot_names_its_gpu_and_a_share_of_its_memory(monkeypatch):
    monkeypatch.setattr(packing, "gpu_memory_mb", lambda gpu: 1000)
    s = packing.slots(["0", "1"], 4, mps_on=True)
    assert [x["CUDA_VISIBLE_DEVICES"] for x in s] == ["0"] * 4 + ["1"] * 4
    assert {x["SEAL_FAST_CUDA_MEMORY_FRACTION"] for x in s} == {str(round(0.95 / 4, 4))}
    assert {x["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] for x in s} == {"0=237M"}
    assert all("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in x for x in packing.slots(["0"], 2, mps_on=False))


def test_mps_starts_in_the_sweep_folder_and_quits(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{fake_mps(tmp_path / 'bin', calls)}{os.pathsep}{os.environ['PATH']}")
    mps = packing.MPS(tmp_path / "sweep")
    assert mps.start()
    mps.stop()
    mps.stop()  # once only
    pipe, log = tmp_path / "sweep" / "mps" / "pipe", tmp_path / "sweep" / "mps" / "log"
    assert calls.read_text().splitlines() == [f"args=-d pipe={pipe} log={log}", f"args= pipe={pipe} log={log}", "quit"]
    assert "control daemon started" in capsys.readouterr().out


@pytest.mark.parametrize("present", [False, True])
def test_mps_absent_or_refused_is_one_line_and_time_slices(tmp_path, monkeypatch, capsys, present):
    path = str(fake_mps(tmp_path / "bin", tmp_path / "calls", code=1)) if present else str(tmp_path / "empty")
    monkeypatch.setenv("PATH", path)
    mps = packing.MPS(tmp_path / "sweep")
    assert not mps.start() and mps.env == {}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "time-slice" in out[0] and ("refused" in out[0]) == present


@pytest.mark.parametrize("flags, words", [(["--runs-per-gpu", "0"], "--runs-per-gpu 0"),
                                          (["--runs-per-gpu", "2", "--jobs", "2"], "not with --jobs"),
                                          (["--gpus", "0"], "only with --runs-per-gpu"),
                                          (["--runs-per-gpu", "2", "--gpus", "x"], "--gpus 'x'")])
def test_bad_packing_flags_are_one_line_exit_2(tiny_data, tmp_path, capsys, flags, words):
    assert sweep.main(["--data", str(tiny_data), "--out", str(tmp_path / "s"), "--dry-run", *flags, *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def run_sweep(data, out, *extra, env=None):
    cmd = [sys.executable, "-m", "seal_fast", "sweep", "--data", str(data), "--runs", "normal160,seal", "--seeds", "0",
           "--out", str(out), "--threads-per-run", "1", *extra, *TRAIN]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def results(folder):
    """Every epoch's metrics but its timings."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMINGS} for ln in lines if ln.strip()]


@pytest.mark.slow
def test_two_packed_runs_equal_the_same_runs_alone(tiny_data, tmp_path):
    alone = tmp_path / "alone"
    run_sweep(tiny_data, alone)  # one at a time
    calls = tmp_path / "calls"
    env = dict(os.environ, PYTHONPATH=ROOT,
               PATH=f"{fake_mps(tmp_path / 'bin', calls)}{os.pathsep}{os.environ['PATH']}")
    out = run_sweep(tiny_data, tmp_path / "packed", "--runs-per-gpu", "2", "--gpus", "0", env=env)
    assert "2 at a time" in out and "control daemon started" in out
    assert calls.read_text().splitlines()[-1] == "quit"  # stopped when the sweep ended
    for run in ("normal160-s0", "seal-s0"):
        a = torch.load(alone / run / "last.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "packed" / run / "last.pt", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
        assert results(alone / run) == results(tmp_path / "packed" / run), run
        log = (tmp_path / "packed" / run / "train.log").read_text()
        assert "# slot: CUDA_VISIBLE_DEVICES=0 SEAL_FAST_CUDA_MEMORY_FRACTION=0.475" in log


def dry(tiny_data, tmp_path, *flags):
    return sweep.main(["--data", str(tiny_data), "--runs", "normal160,seal", "--seeds", "0", "--out",
                       str(tmp_path / "s"), "--dry-run", *flags, *TRAIN])


def test_dry_run_says_not_measured_without_a_row_for_the_device(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEAL_FAST_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(sweep, "device_name", lambda: "NVIDIA H200")
    assert dry(tiny_data, tmp_path, "--runs-per-gpu", "4", "--gpus", "0") == 0
    out = capsys.readouterr().out
    assert "packed, 4 per GPU: not measured on NVIDIA H200" in out and "bench_pack.py --k 1 4" in out


@pytest.mark.parametrize("gain", ["2.5", ""])
def test_dry_run_projects_from_the_measured_packing(tiny_data, tmp_path, monkeypatch, capsys, gain):
    results = tmp_path / "results"
    results.mkdir()
    rows = ["device,k,batch,mps,aggregate_images_per_s,gain_vs_k1,date",
            "NVIDIA H200,4,32,off,9,2.0,d1", f"NVIDIA H200,4,32,on,12,{gain},d2",
            "NVIDIA H100,4,32,on,99999,9.0,d3", "NVIDIA H200,8,32,on,99999,9.0,d4"]
    (results / "pack.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("SEAL_FAST_BENCH_RESULTS", str(results))
    monkeypatch.setattr(sweep, "device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(sweep, "measured_hours", lambda gpu: (1600.0, "train.csv"))  # an hour an epoch
    assert dry(tiny_data, tmp_path, "--runs-per-gpu", "4", "--gpus", "0,1") == 0
    out = capsys.readouterr().out
    epochs = 2 * 1 + 2 * 2  # normal160: 1 generation of 2 epochs; seal: 2 generations of 2
    if gain:
        hours = 1600.0 * epochs / 1600 / 2.5 / 2
    else:  # no K = 1 row with it: the images left at the measured aggregate speed
        hours = epochs * 100_000 / (12 * 2) / 3600
    assert f"packed, 4 per GPU on 2 GPU(s): ~{hours:.1f} h" in out and "12 images/s summed over 4 runs, MPS on" in out


def test_bench_pack_without_cuda_is_one_line_exit_2():
    res = subprocess.run([sys.executable, "bench/bench_pack.py", "--k", "1", "2", "--mps", "off", "on", "--seconds",
                          "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no CUDA" in res.stderr
