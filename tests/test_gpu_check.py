"""bench/gpu_check.py: the one call a lent GPU gets. Proven here on the CPU (--smoke, and the real command, which
skips every GPU step saying why) before a GPU sees it; results.csv and summary.md survive a kill after any step."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Step, run_step, targets

ROOT = gpu_check.ROOT
CHECK = [sys.executable, str(ROOT / "bench" / "gpu_check.py")]


def committed_results():
    return {p.name: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*")}


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def step_status(out):
    return {r["step"]: r["status"] for r in rows(out) if r["bench"] == "step"}


@pytest.mark.parametrize("smoke", [False, True])
def test_the_time_boxes_fit_the_budget_most_valuable_first(tmp_path, smoke):
    steps = gpu_check.plan(smoke, tmp_path, tmp_path / "run", tmp_path / "native")
    assert [s.name for s in steps] == list(gpu_check.STEPS)
    assert sum(s.cap_s for s in steps) <= gpu_check.BASE_S[smoke] - gpu_check.RESERVE_S
    assert [s.name for s in steps[:4]] == ["env", "native", "pytest", "sanitizer"] and steps[-1].name == "cli"
    if not smoke:  # the module's docstring lists each step's box: it says what the plan does
        listed = {ln.split()[0]: float(ln.split()[1]) for ln in gpu_check.__doc__.splitlines()
                  if ln.startswith("  ") and len(ln.split()) > 1 and ln.split()[1].isdigit()}
        assert listed == {s.name: s.cap_s for s in steps}, listed
    pack = next(s for s in steps if s.name == "pack").cmd
    assert pack[2:] == ["--k", "1", "8", "--mps", "on", "--seconds", "8", "--csv", str(tmp_path / "pack.csv")]


@pytest.mark.slow
def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    before = committed_results()
    out = tmp_path / "out"
    t = time.perf_counter()
    budget = gpu_check.BASE_S[True]  # the smoke's boxes fit it
    res = subprocess.run([*CHECK, "--smoke", "--out", str(out), "--budget-s", str(budget)], cwd=ROOT,
                         capture_output=True, text=True, timeout=budget + 60)
    seconds = time.perf_counter() - t
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], (out / "log.txt").read_text()[-5000:])
    assert seconds < budget + 10, f"the smoke run took {seconds:.0f} s of its {budget:.0f} s budget"
    files = sorted(p.name for p in out.iterdir())
    cuda = torch.cuda.is_available()
    assert files == (["log.txt", "pack.csv", "profile.txt", "pytest.txt", "results.csv", "summary.md"] if cuda
                     else ["log.txt", "pytest.txt", "results.csv", "summary.md"]), files  # CUDA only: profile, pack
    summary = (out / "summary.md").read_text()
    for step in gpu_check.STEPS:
        skipped = step in gpu_check.GPU_ONLY and not cuda
        assert (f"| {step} | skipped |" if skipped else f"| {step} | ok |") in summary, (step, summary)
    for target in ("SGD step", "KNN bf16 D=2048", "cache loader", "prediction depth", "projected 1,600-epoch SEAL",
                   "the real CLI", "packed runs: K=8"):
        assert target in summary, target
    benches = {r["bench"] for r in rows(out)}
    assert {"env", "step", "sgd", "knn", "train", "data", "depth", "cli"} <= benches, benches
    assert all(r["torch"] and r["device"] for r in rows(out))
    assert committed_results() == before, "a smoke run must not touch bench/results/"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_sanitized_script_runs_on_a_cpu(backend):
    """The sanitizer step's script (bench/gpu_steps.py SANITIZED) on the CPU, the GPU's device names swapped: the
    optimizer and KNN calls it makes still exist and run (Triton under its interpreter: the fused SGD kernel itself
    with BE=triton, the KNN kernel with both), so a renamed API fails here, not in a GPU's minutes. About 40 s per backend on 2 cores."""
    from bench.gpu_steps import SANITIZED

    script = SANITIZED.replace("device='cuda'", "device='cpu'").replace("torch.cuda.synchronize(); ", "")
    assert script.count("device='cpu'") == 3 and "cuda" not in script.replace("backend", "")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, BE=backend, TRITON_INTERPRET="1",
                                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(f"{backend} ran"), done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real command runs every step")
def test_the_real_command_on_a_cpu_skips_every_gpu_step_saying_why(tmp_path):
    out = tmp_path / "gc"
    res = subprocess.run([*CHECK, "--out", str(out), "--budget-s", "60"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    status = step_status(out)
    assert status == dict.fromkeys(gpu_check.STEPS, "skipped") | {"env": "ok"}, status
    assert all("needs a CUDA device" in r["note"] for r in rows(out) if r["bench"] == "step" and r["step"] != "env")
    assert "| native | skipped | 0.0 | needs a CUDA device" in (out / "summary.md").read_text()


def marked_processes(mark: str) -> list[int]:
    """The processes whose environment holds GPU_CHECK_TEST=mark: the check and every step it started."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"GPU_CHECK_TEST={mark}".encode() in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


def wait_for(cond, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_check_killed_after_a_step_keeps_the_finished_steps(tmp_path, sig):
    """Killed while its third step runs (the smoke's synth, after env and knn): results.csv and summary.md hold env
    and knn; SIGTERM also ends the running step, marks it killed and exits 143."""
    out, mark = tmp_path / "out", str(tmp_path)
    proc = subprocess.Popen([*CHECK, "--smoke", "--out", str(out), "--only", "knn", "synth"], cwd=ROOT,
                            env=dict(os.environ, GPU_CHECK_TEST=mark), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        done = wait_for(lambda: (out / "results.csv").exists() and step_status(out).get("knn") not in ("not run",
                                                                                                    None), 120)
        assert done, (out / "log.txt").read_text()[-3000:] if (out / "log.txt").exists() else "no log"
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        for pid in marked_processes(mark):  # a SIGKILLed check leaves its running step behind: end it here
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    status = step_status(out)
    assert status["env"] == "ok" and status["knn"] == "ok", status
    assert {r["bench"] for r in rows(out)} >= {"env", "step", "knn"}  # knn's own rows too
    summary = (out / "summary.md").read_text()
    if sig == signal.SIGTERM:
        assert code == 143 and status["synth"] == "killed", (code, status)
        assert "stopped during synth" in summary
        assert wait_for(lambda: not marked_processes(mark), 10), "the killed step's processes outlived it"
    else:
        assert code == -9 and status["synth"] == "not run" and "running: 2 of 3 steps done" in summary, summary
    assert not list(out.glob("*.tmp"))


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
    steps["pack"].rows = [{"k": "1", "aggregate_images_per_s": "5000", "gain_vs_k1": "1.0"},
                          {"k": "8", "aggregate_images_per_s": "20000", "gain_vs_k1": "4.0"}]
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
    assert got["packed runs: K=8 on one GPU, images/s summed at batch 32 (MPS on)"] == "missed"  # 20,000 < 34,000
    assert got["packed runs: K=8 over one run alone (gain)"] == "met"
