"""`python -m seal_fast sweep`: the paper's table as one command: every (run kind, seed) in its own folder.

    python -m seal_fast sweep --data DIR --runs normal160,normal,llf,seal --seeds 0 1 2 --out runs/table \\
        [--jobs K] [--dry-run] [any train flag, e.g. --amp --channels-last]

Run kinds: normal160 (normal, 1 generation: the paper's "normal (160 epochs)"), normal, llf, seal. Each
(kind, seed) trains into OUT/<kind>-s<seed>/ through `python -m seal_fast.train ... --resume auto`, so
re-running the same command resumes unfinished runs and skips finished ones: a preempted job is requeued by
running it again. `--jobs K` runs K trainings at once as separate processes (one GPU: ResNet-50 at batch 32
on 64x64 images leaves most of an H100/H200 idle, so packing runs is where a one-GPU user wins hours; on a
CPU each process gets cores / K threads). A run's output goes to its folder's train.log. `--dry-run`
lists the runs, their state and the projected GPU hours (from bench/results/train.csv when it holds a
measured step time for this GPU, else "unknown"). Then `python -m seal_fast report OUT` makes the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import read_saved_config
from ..errors import ConfigError, cli_main

KINDS = {"normal160": ["--method", "normal", "--generations", "1"], "normal": ["--method", "normal"],
         "llf": ["--method", "llf"], "seal": ["--method", "seal"]}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    kind: str
    seed: int
    folder: Path
    args: list[str]

    @property
    def name(self) -> str:
        return f"{self.kind}-s{self.seed}"

    def state(self) -> tuple[str, int, int | None]:
        """("new" | "partial" | "finished", epochs done, epochs planned)."""
        metrics, cfg = self.folder / "metrics.jsonl", self.folder / "config.json"
        if not cfg.exists():
            return "new", 0, None
        c = read_saved_config(cfg)  # data only; a broken one is a one-line DataError naming it
        planned = c["generations"] * c["epochs"]
        done = len([ln for ln in metrics.read_text().splitlines() if ln.strip()]) if metrics.exists() else 0
        if not (self.folder / "last.pt").exists():
            done = 0
        return ("finished" if done >= planned else "partial"), done, planned


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m seal_fast sweep", description=__doc__.split("\n\n")[0],
                                epilog="Any other flag is passed to every `python -m seal_fast.train`.")
    p.add_argument("--data", help="tiny-imagenet-200 folder (default: the built-in synthetic set, demo schedule)")
    p.add_argument("--runs", default="normal160,normal,llf,seal", help="comma-separated run kinds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True, metavar="DIR", help="sweep folder; each run in DIR/<kind>-s<seed>/")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (separate processes)")
    p.add_argument("--threads-per-run", type=int, help="CPU threads of each run (default: cores / jobs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and the projected GPU hours, then exit")
    args, passthrough = p.parse_known_args(argv)
    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"--runs {args.runs!r}: unknown run kind(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(KINDS)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: run at least 1 training at a time")
    owned = {"--method", "--seed", "--out", "--resume", "--data", "--dry-run"}  # --generations: normal160 keeps 1
    clash = sorted({a.split("=")[0] for a in passthrough if a.split("=")[0] in owned})
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by the sweep for every run; give --runs / --seeds / --out / "
                          "--data instead")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError("--seeds: a seed is listed twice")
    out = Path(args.out)
    data = ["--data", args.data] if args.data else []
    runs = [Run(k, s, out / f"{k}-s{s}", data + passthrough + KINDS[k] + ["--seed", str(s)])  # the kind's flags last
            for k in kinds for s in args.seeds]
    return args, runs


def measured_hours(device_name: str | None) -> tuple[float | None, str]:
    """(hours of the full 1,600-epoch SEAL schedule at batch 32, where that figure comes from)."""
    path = ROOT / "bench" / "results" / "train.csv"
    if device_name is None:
        return None, "unknown: no GPU here"
    if not path.exists():
        return None, f"unknown: {path} is not there"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("device") == device_name and r.get("setup") == "ours"
                and r.get("batch") == "32" and r.get("seal_schedule_hours")]
    if not rows:
        return None, f"unknown: bench/results/train.csv has no measured step time for {device_name}"
    return float(rows[-1]["seal_schedule_hours"]), f"bench/results/train.csv ({rows[-1].get('date', '?')})"


def dry_run(runs: list[Run], jobs: int) -> int:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    per_1600, source = measured_hours(gpu)
    total = 0.0
    for r in runs:
        state, done, planned = r.state()
        epochs = 160 if r.kind == "normal160" else 1600  # the paper's schedule; flags may change it
        share = (epochs - done) / 1600
        hours = per_1600 * share if per_1600 is not None else None
        total += hours or 0.0
        left = f"{done}/{planned} epochs" if planned else "not started"
        print(f"{r.name:14s} {state:9s} {left:18s} {r.folder}  " + (f"~{hours:.1f} GPU h" if hours is not None else ""))
    if per_1600 is None:
        print(f"projected GPU hours: {source}")
    else:
        print(f"projected GPU hours: {total:.1f} run one after another on {gpu} ({source}, the paper's schedule); "
              f"--jobs {jobs} packs runs, its speed-up is measured on a GPU, not assumed here")
    return 0


def launch(run: Run, threads: int) -> subprocess.Popen:
    run.folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "seal_fast.train", *run.args, "--out", str(run.folder), "--resume", "auto"]
    log = open(run.folder / "train.log", "a")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # closed when the run ends
    return proc


def run(argv: list[str] | None = None) -> int:
    args, runs = parse(argv)
    if args.dry_run:
        return dry_run(runs, args.jobs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [r for r in runs if r.state()[0] != "finished"]
    skipped = len(runs) - len(todo)
    print(f"sweep {args.out}: {len(runs)} runs, {skipped} finished already, {len(todo)} to train, "
          f"{args.jobs} at a time ({threads} CPU threads each)", flush=True)
    running: list[tuple[Run, subprocess.Popen, float]] = []
    failed: list[str] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            r = queue.pop(0)
            state, done, planned = r.state()
            print(f"start  {r.name} ({'resuming at epoch ' + str(done) if state == 'partial' else 'new'})", flush=True)
            running.append((r, launch(r, threads), time.time()))
        time.sleep(0.2)
        for item in list(running):
            r, proc, t0 = item
            if proc.poll() is None:
                continue
            proc.log.close()
            running.remove(item)
            if proc.returncode == 0:
                print(f"done   {r.name} in {(time.time() - t0) / 60:.1f} min", flush=True)
            else:
                failed.append(r.name)
                print(f"FAILED {r.name} (exit {proc.returncode}); see {r.folder / 'train.log'}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and run the same command again "
              "(finished runs are skipped)", file=sys.stderr)
        return 1
    print(f"all {len(runs)} runs finished; the table: python -m seal_fast report {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted; run the same command again to resume (finished runs are skipped)")


if __name__ == "__main__":
    sys.exit(main())
