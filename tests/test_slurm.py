"""`sweep --launcher slurm` against a real Slurm (tests/slurm_cluster.py: Debian's munged, slurmctld, slurmd on this
machine): a 4-run tiny sweep submitted through submitit, one job requeued mid-run with `scontrol requeue`; every run
finishes, the requeued one bit for bit where an unbroken run ends, a second sweep submits nothing, --status and the
report see all four. Skipped, with the reason, where Slurm is not installed."""

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

from seal_fast.runs import slurm as slurm_mod
from seal_fast.runs import sweep

from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--arch", "resnet10", "--epochs", "3", "--generations", "2", "--ascent-epochs", "1", "--warmup", "1",
         "--batch-size", "16", "--workers", "0", "--device", "cpu", "--eval-every", "1", "--keep-generations", "none"]
KINDS = ["normal160", "normal", "llf", "seal"]


def epochs_done(folder):
    m = folder / "metrics.jsonl"
    return len([ln for ln in m.read_text().splitlines() if ln.strip()]) if m.exists() else 0


def wait_for(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.mark.slow
def test_a_sweep_on_slurm_survives_a_requeue_bit_for_bit(slurm_cluster, tiny_data, tmp_path, capsys):  # noqa: F811
    def say(msg):  # the figures the note quotes, shown with -s even though capsys captures
        with capsys.disabled():
            print(msg, flush=True)

    say(f"single-node Slurm started in {slurm_cluster.seconds:.1f} s")
    out = tmp_path / "sweep"
    argv = ["--launcher", "slurm", "--data", str(tiny_data), "--runs", ",".join(KINDS), "--seeds", "0", "--out",
            str(out), "--cpus-per-run", "1", "--time", "10", *TRAIN]
    t0 = time.time()
    assert sweep.main(argv) == 0
    ids = {k: v[-1] for k, v in slurm_mod.read_jobs(out).items()}
    assert sorted(ids) == sorted(f"{k}-s0" for k in KINDS)
    assert sweep.main(argv) == 0  # again at once: every job is queued or running, nothing submitted twice
    assert all(len(v) == 1 for v in slurm_mod.read_jobs(out).values())
    seal = out / "seal-s0"
    wait_for(lambda: 1 <= epochs_done(seal), 240, "seal-s0 training its first epoch")
    t_requeue = time.time()
    at = epochs_done(seal)
    res = slurm_cluster.cmd("scontrol", "requeue", ids["seal-s0"])
    assert res.returncode == 0, res.stderr
    wait_for(lambda: slurm_mod.job_state(ids["seal-s0"]) == ("PENDING", 1), 60, "the job requeued and pending")
    # Slurm holds a requeued job for 120 s (its begin time); the test lets it start at once (StartTime=now)
    res = slurm_cluster.cmd("scontrol", "update", f"JobId={ids['seal-s0']}", "StartTime=now")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: slurm_mod.job_state(ids["seal-s0"])[0] == "RUNNING", 120, "the requeued job running again")
    say(f"seal-s0 requeued after epoch {at}; running again {time.time() - t_requeue:.1f} s after the requeue")
    runs = [out / f"{k}-s0" for k in KINDS]
    wait_for(lambda: all((r / "last.pt").exists() and epochs_done(r) >= (3 if "160" in r.name else 6) for r in runs)
             and all(slurm_mod.job_state(i)[0] == "COMPLETED" for i in ids.values()), 420, "every run finished")
    total = time.time() - t0
    states = {k: slurm_mod.job_state(i) for k, i in ids.items()}
    say(f"job states: {states}; seal-s0 requeued after epoch {at} at {t_requeue - t0:.0f} s, resumed and "
          f"finished; whole sweep {total:.0f} s")
    assert states["seal-s0"] == ("COMPLETED", 1)
    assert "Slurm job" in (seal / "train.log").read_text() and "restart 1" in (seal / "train.log").read_text()
    # the unbroken run, trained alone into its own folder
    ref = tmp_path / "unbroken"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "seal_fast.train", "--data", str(tiny_data), *TRAIN, "--method", "seal",
                        "--seed", "0", "--out", str(ref)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    a = torch.load(ref / "last.pt", weights_only=False)["model"]
    b = torch.load(seal / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert sweep.main([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    assert "4/4 runs finished" in status and "1 restart(s)" in status
    say(status)
    assert sweep.main(argv) == 0 and "0 job(s) submitted" in capsys.readouterr().out
    rep = subprocess.run([sys.executable, "-m", "seal_fast", "report", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    with open(out / "report.csv", newline="") as f:
        kinds = sorted(row.get("kind", "") for row in csv.DictReader(f))
    assert kinds == sorted(KINDS), kinds


@pytest.mark.slow
def test_packed_jobs_on_slurm_survive_a_requeue_bit_for_bit(slurm_cluster, tiny_data, tmp_path, capsys):  # noqa: F811
    """--runs-per-gpu 2 on the CPU-only cluster: 4 runs in 2 jobs of 2; the job holding llf and seal is requeued
    mid-run; every run ends bit for bit where the same run trained alone ends."""
    def say(msg):
        with capsys.disabled():
            print(msg, flush=True)

    out = tmp_path / "packed"
    argv = ["--launcher", "slurm", "--runs-per-gpu", "2", "--data", str(tiny_data), "--runs", ",".join(KINDS),
            "--seeds", "0", "--out", str(out), "--cpus-per-run", "1", "--time", "10", *TRAIN]
    t0 = time.time()
    assert sweep.main(argv) == 0
    ids = {k: v[-1] for k, v in slurm_mod.read_jobs(out).items()}
    assert ids["normal160-s0"] == ids["normal-s0"] != ids["llf-s0"] == ids["seal-s0"], ids  # 2 jobs of 2 runs
    assert sweep.main(argv) == 0 and "0 job(s) submitted" in capsys.readouterr().out  # nothing twice
    assert all(len(v) == 1 for v in slurm_mod.read_jobs(out).values())
    job = ids["seal-s0"]
    wait_for(lambda: epochs_done(out / "seal-s0") >= 1, 240, "seal-s0 training its first epoch")
    t_requeue, at = time.time(), {k: epochs_done(out / f"{k}-s0") for k in ("llf", "seal")}
    res = slurm_cluster.cmd("scontrol", "requeue", job)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: slurm_mod.job_state(job) == ("PENDING", 1), 60, "the packed job requeued and pending")
    assert slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
    wait_for(lambda: slurm_mod.job_state(job)[0] == "RUNNING", 120, "the requeued packed job running again")
    runs = [out / f"{k}-s0" for k in KINDS]
    wait_for(lambda: all((r / "last.pt").exists() and epochs_done(r) >= (3 if "160" in r.name else 6) for r in runs)
             and all(slurm_mod.job_state(i)[0] == "COMPLETED" for i in ids.values()), 420, "every run finished")
    states = {k: slurm_mod.job_state(i) for k, i in ids.items()}
    say(f"packed: 2 jobs {sorted(set(ids.values()))}; job {job} (llf-s0, seal-s0) requeued at epochs {at} "
        f"{t_requeue - t0:.0f} s in; states {states}; whole packed sweep {time.time() - t0:.0f} s")
    assert states["seal-s0"] == states["llf-s0"] == ("COMPLETED", 1)
    for k in ("llf", "seal"):
        log = (out / f"{k}-s0" / "train.log").read_text()
        assert "restart 1, packed: llf-s0, seal-s0" in log, log[-2000:]
    alone = tmp_path / "alone"  # the same four runs alone, unbroken (two at once: the same weights, test_sweep_report)
    t1 = time.time()
    assert sweep.main(["--data", str(tiny_data), "--runs", ",".join(KINDS), "--seeds", "0", "--out", str(alone),
                       "--jobs", "2", "--threads-per-run", "1", *TRAIN]) == 0
    say(f"the same 4 runs alone (2 processes at a time): {time.time() - t1:.0f} s")
    for k in KINDS:
        a = torch.load(alone / f"{k}-s0" / "last.pt", weights_only=False)["model"]
        b = torch.load(out / f"{k}-s0" / "last.pt", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
    capsys.readouterr()
    assert sweep.main([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    assert "4/4 runs finished" in status and "(2 runs), 1 restart(s)" in status, status
    say(status)


def test_status_shows_every_run_the_folder_records(tiny_data, tmp_path, capsys, monkeypatch):
    """--status with fewer --seeds than were submitted still lists the folder's other runs (from jobs.json)."""
    out = tmp_path / "s"
    monkeypatch.setattr(slurm_mod, "job_state", lambda job: ("PENDING", 0) if job == "7" else ("RUNNING", 0))
    for name, job in (("seal-s0", "7"), ("seal-s1", "8"), ("llf-s1", "8")):
        slurm_mod.record(out, name, job)
    argv = ["--launcher", "slurm", "--data", str(tiny_data), "--runs", "seal", "--seeds", "0", "--out", str(out)]
    assert sweep.main([*argv, "--status", *TRAIN]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:3]] == ["seal-s0", "seal-s1", "llf-s1"], lines
    assert "job 7 " in lines[0] and "pending" in lines[0] and "job 8 (2 runs)" in lines[1] and "running" in lines[2]
    assert lines[-1] == "0/3 runs finished"


def test_bad_slurm_flags_are_one_line_exit_2(tiny_data, tmp_path, capsys):
    base = ["--data", str(tiny_data), "--out", str(tmp_path / "s"), "--launcher", "slurm"]
    assert sweep.main([*base, "--runs-per-gpu", "2", "--gpus", "0"]) == 2  # Slurm picks the GPUs: --gpus-per-job
    assert sweep.main([*base, "--time", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--gpus-per-job" in err[0] and "--time" in err[1]


@pytest.mark.parametrize("line, parsed", [("constraint=h100", {"constraint": "h100"}),
                                          ("#SBATCH --exclusive", {"exclusive": True}),
                                          ("--gres-flags=enforce-binding", {"gres_flags": "enforce-binding"})])
def test_sbatch_lines_pass_through(line, parsed):
    assert slurm_mod.sbatch_lines([line]) == parsed


@pytest.mark.slow
def test_torchrun_under_srun_meets_from_the_slurm_environment(slurm_cluster, tiny_data, tmp_path, capsys):  # noqa: F811
    """seal_fast/runs/ddp_srun.sh on the single-node cluster: one node, 2 trainers (gloo on the CPU) that find each
    other from SLURM_* alone; the run finishes in one folder."""
    out, log = tmp_path / "ddp", tmp_path / "ddp.out"
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               MASTER_PORT="29731")
    res = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--cpus-per-task", "2", "-o", str(log),
                          os.path.join(ROOT, "seal_fast", "runs", "ddp_srun.sh"), "--data", str(tiny_data), *TRAIN,
                          "--generations", "1", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_for(lambda: slurm_mod.job_state(job)[0] not in slurm_mod.ALIVE, 300, "the DDP job ending")
    text = log.read_text()
    assert slurm_mod.job_state(job)[0] == "COMPLETED", text[-3000:]
    assert "1 node(s) x 2 process(es)" in text and (out / "last.pt").exists()
    assert epochs_done(out) == 3
