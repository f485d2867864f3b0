"""bench/gpu_check.py: the one call a lent GPU gets. Proven here on the CPU (--smoke) before a GPU sees it."""

import csv
import subprocess
import sys
import time

import pytest

from bench import gpu_check
from bench.gpu_check import Step, run_step, targets

ROOT = gpu_check.ROOT


def committed_results():
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*")}


@pytest.mark.slow
def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    before = committed_results()
    out = tmp_path / "out"
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out),
                          "--budget-s", "170"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], (out / "log.txt").read_text()[-5000:])
    assert seconds < 180, f"the smoke run took {seconds:.0f} s; it must stay under 3 minutes"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "profile.txt", "pytest.txt", "results.csv", "summary.md"] or \
        files == ["log.txt", "pytest.txt", "results.csv", "summary.md"], files  # profile.txt: CUDA only
    assert len(files) <= 6  # the device tool returns at most 8 files
    summary = (out / "summary.md").read_text()
    for step in gpu_check.STEPS:
        assert f"| {step} | ok |" in summary, (step, summary)
    for target in ("SGD step", "KNN bf16 D=2048", "cache loader", "prediction depth", "projected 1,600-epoch SEAL",
                   "the real CLI"):
        assert target in summary, target
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    benches = {r["bench"] for r in rows}
    assert {"env", "step", "sgd", "knn", "train", "data", "depth", "cli"} <= benches, benches
    assert all(r["torch"] and r["device"] for r in rows)
    assert committed_results() == before, "a smoke run must not touch bench/results/"


def test_a_hanging_step_is_killed_at_its_time_box(tmp_path):
    step = Step("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"], 2)
    with open(tmp_path / "log.txt", "w+") as log:
        t = time.perf_counter()
        run_step(step, 2, log, {}, tmp_path)
    assert time.perf_counter() - t < 20
    assert step.status == "timeout" and "2 s" in step.why and "started" in step.output


def test_a_failing_step_is_reported_with_its_status(tmp_path):
    step = Step("fail", [sys.executable, "-c", "raise SystemExit(3)"], 30)
    with open(tmp_path / "log.txt", "w+") as log:
        run_step(step, 30, log, {}, tmp_path)
    assert step.status == "failed" and "exit status 3" in step.why


def test_verdicts_on_gpu_rows():
    """The summary's judgement on rows shaped like the benches' (values made up for the logic, not results)."""
    steps = {name: Step(name, [], 1, status="ok") for name in gpu_check.STEPS}
    steps["sgd"].rows = [{"case": "SignedSGD (fused, one launch)", "frac_of_copy": "0.93"}]
    steps["knn"].rows = [{"case": "fused", "d": "2048", "dtype": "bf16", "median_ms": "10", "frac_of_peak": "0.4"},
                         {"case": "mm+topk", "d": "2048", "dtype": "bf16", "median_ms": "35"}]
    steps["depth"].rows = [{"seconds": "75"}]
    steps["data"].status, steps["data"].why = "timeout", "killed after its 45 s time box"
    got = {name: verdict for name, _, _, verdict in targets(steps, cuda=True)}
    assert got["SGD step, fused SignedSGD fp32, share of copy bandwidth (ResNet-50 shapes)"] == "met"
    assert got["KNN bf16 D=2048 Q=10k N=100k k=30, share of dense bf16 peak"] == "missed"
    assert got["KNN bf16 D=2048, speed-up over the best torch baseline"] == "met"  # 35 / 10 = 3.5x
    assert got["prediction depth, all probes, 10k val x 100k train (s)"] == "missed"
    assert got["cache loader, train images/s at batch 256"].startswith("not measured (timeout")
