"""`sweep --launcher slurm`: one Slurm job per run through submitit (or K runs per GPU of each job with
`--runs-per-gpu K`), requeued on preemption or time limit.

Each job runs `python -m seal_fast.train ... --resume auto` into the run's folder (its output appended to the
folder's train.log). A packed job (`PackedJob`) trains its runs at once in packing.py's slots, the ones a local
`--runs-per-gpu` sweep uses (K per GPU the job holds, MPS started inside the job where it runs, else time-sliced;
without a GPU they share the job's CPUs); a run that fails does not stop the others. When Slurm preempts a job or
its time runs out, submitit calls the job's `checkpoint()`, which hands back the same run(s): the job is requeued
and every unfinished run resumes from its last checkpoint, exactly (a `scontrol requeue` reruns the same submission
to the same end). The job ids are recorded per run in OUT/slurm/jobs.json, so running the sweep again never submits
a run whose job is still queued or running; `sweep --out OUT --status` shows every run's state from Slurm
(scontrol) and from its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from ..files import write_whole

ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
         "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


class TrainJob:
    """What one Slurm job runs: the trainer on one run's command line; submitit's checkpoint() requeues it."""

    def __init__(self, argv: list[str], folder: str, env: dict[str, str]):
        self.argv, self.folder, self.env = argv, folder, env

    def __call__(self) -> int:
        cmd = [sys.executable, "-m", "seal_fast.train", *self.argv]
        with open(Path(self.folder) / "train.log", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}  (Slurm job {os.environ.get('SLURM_JOB_ID', '?')}, restart "
                      f"{os.environ.get('SLURM_RESTART_COUNT', '0')})\n")
            log.flush()
            code = subprocess.call(cmd, env=dict(os.environ, **self.env), stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"the trainer exited {code}: {last_line(Path(self.folder) / 'train.log')}")
        return code

    def checkpoint(self):
        """Preempted or out of time: requeue the same run (it resumes with --resume auto)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.argv, self.folder, self.env))


class PackedJob:
    """What one packed Slurm job runs: its runs at once, K per GPU it holds (packing.open_slots, MPS in
    OUT/slurm/<job>/r<restart>/mps), each with its own seed, folder and `--resume auto`; a run that fails does not
    stop the others, and the job fails once they end, naming it. checkpoint() requeues the unfinished ones."""

    def __init__(self, runs: list, k: int, threads: int, out: str):
        self.runs, self.k, self.threads, self.out = runs, k, threads, out

    def __call__(self) -> int:
        from .packing import launch, open_slots, train_in_slots, visible_gpus

        job, restart = os.environ.get("SLURM_JOB_ID", "?"), os.environ.get("SLURM_RESTART_COUNT", "0")
        todo = [r for r in self.runs if r.state()[0] != "finished"]
        free, mps = open_slots(self.k, visible_gpus(), Path(self.out) / "slurm" / job / f"r{restart}")
        try:
            note = f"(Slurm job {job}, restart {restart}, packed: {', '.join(r.name for r in self.runs)})"
            failed = train_in_slots(todo, free, self.threads, start=lambda r, t, slot: launch(r, t, slot, note))
        finally:
            if mps is not None:
                mps.stop()
        if failed:
            raise RuntimeError("; ".join(f"{r.name}: the trainer exited {failed[r.name]}: "
                                         f"{last_line(r.folder / 'train.log')}" for r in self.runs if r.name in failed))
        return 0

    def checkpoint(self):
        """Preempted or out of time: requeue the same runs (each resumes with --resume auto)."""
        import submitit

        return submitit.helpers.DelayedSubmission(PackedJob(self.runs, self.k, self.threads, self.out))


def runs_per_job(args) -> int:
    """1, or with --runs-per-gpu K: K per GPU of each job (K when the jobs ask for no GPU)."""
    return 1 if args.runs_per_gpu is None else args.runs_per_gpu * max(1, args.gpus_per_job)


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    return lines[-1].strip() if lines else "(no output)"


def executor(out: Path, args):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install 'submitit>=1.5'") from None
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: sbatch is not on PATH; run the sweep on a Slurm login node "
                          "(or --launcher local)")
    ex = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster="slurm")
    extra = {k: v for k, v in dict(slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
                                   slurm_mem=args.mem).items() if v}
    if args.gpus_per_job:
        extra["gpus_per_node"] = args.gpus_per_job
    root = Path(__file__).resolve().parents[2]
    ex.update_parameters(name="seal-sweep", timeout_min=args.time, tasks_per_node=1, nodes=1,
                         cpus_per_task=args.cpus_per_run * runs_per_job(args), slurm_srun_args=["--cpu-bind=none"],
                         slurm_additional_parameters=dict(requeue=True),
                         slurm_setup=[f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"], **extra)
    if args.sbatch:
        ex.update_parameters(slurm_additional_parameters=dict(requeue=True, **sbatch_lines(args.sbatch)))
    return ex


def sbatch_lines(lines: list[str]) -> dict[str, str | bool]:
    """`--sbatch 'constraint=h100'` (repeatable) as submitit's extra #SBATCH parameters."""
    out: dict[str, str | bool] = {}
    for line in lines:
        key, _, val = line.strip().removeprefix("#SBATCH").strip().lstrip("-").partition("=")
        if not key:
            raise ConfigError(f"--sbatch {line!r}: give an #SBATCH option as NAME=VALUE or NAME, e.g. constraint=h100")
        out[key.replace("-", "_")] = val or True
    return out


def jobs_file(out: Path) -> Path:
    return out / "slurm" / "jobs.json"


def read_jobs(out: Path) -> dict[str, list[str]]:
    path = jobs_file(out)
    return json.loads(path.read_text()) if path.exists() else {}


def record(out: Path, name: str, job_id: str) -> None:
    jobs = read_jobs(out)
    jobs.setdefault(name, []).append(job_id)
    jobs_file(out).parent.mkdir(parents=True, exist_ok=True)
    write_whole(jobs_file(out), json.dumps(jobs, indent=1))


def job_state(job_id: str) -> tuple[str, int]:
    """(Slurm's state, restarts) of a job from scontrol, ("UNKNOWN", 0) once Slurm has forgotten it."""
    if shutil.which("scontrol") is None:
        return "UNKNOWN", 0
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    fields = dict(f.split("=", 1) for f in res.stdout.split() if "=" in f) if res.returncode == 0 else {}
    return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0") or 0)


def submit(runs, out: Path, args) -> list:
    """Submit every unfinished run whose recorded job is not alive, `runs_per_job` to a job; returns submitit's
    jobs."""
    ex = executor(out, args)
    jobs, todo, submitted = read_jobs(out), [], []
    for r in runs:
        state = r.state()[0]
        alive = [j for j in jobs.get(r.name, []) if job_state(j)[0] in ALIVE]
        if state == "finished" or alive:
            print(f"skip   {r.name}: " + ("finished" if state == "finished" else f"job {alive[-1]} "
                                          f"{job_state(alive[-1])[0].lower()}"), flush=True)
            continue
        r.folder.mkdir(parents=True, exist_ok=True)
        todo.append(r)
    size = runs_per_job(args)
    for group in (todo[i:i + size] for i in range(0, len(todo), size)):
        if args.runs_per_gpu is None:
            task = TrainJob(group[0].argv, str(group[0].folder), {"OMP_NUM_THREADS": str(args.cpus_per_run)})
        else:
            task = PackedJob(group, args.runs_per_gpu, args.cpus_per_run, str(out))
        job = ex.submit(task)
        for r in group:
            record(out, r.name, str(job.job_id))
        print(f"submit {', '.join(r.name for r in group)}: Slurm job {job.job_id}", flush=True)
        submitted.append(job)
    return submitted


def status(runs, out: Path) -> int:
    """Each run's state from Slurm and from its folder; 0 when every run finished."""
    jobs = read_jobs(out)
    finished = 0
    for r in runs:
        state, done, planned = r.state()
        ids = jobs.get(r.name, [])
        slurm, restarts = job_state(ids[-1]) if ids else ("-", 0)
        if state == "finished":
            word = "finished"
        elif slurm in ALIVE:
            word = "requeued" if restarts and slurm == "PENDING" else slurm.lower()
        elif slurm in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            word = f"failed ({slurm.lower()}): {last_line(r.folder / 'train.log')}"
        else:
            word = "not submitted" if not ids else f"{state} ({slurm.lower()})"
        finished += state == "finished"
        shared = sum(1 for v in jobs.values() if ids and v and v[-1] == ids[-1])
        job = (f"job {ids[-1]}" + (f" ({shared} runs)" if shared > 1 else "")
               + (f", {restarts} restart(s)" if restarts else "") if ids else "no job")
        print(f"{r.name:14s} {done}/{planned or '?'} epochs  {job:34s} {word}")
    print(f"{finished}/{len(runs)} runs finished")
    return 0 if finished == len(runs) else 1
