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

Before anything starts (the dry run included), every run's command line is parsed with the trainer's own parser and
put through the trainer's own checks (seal_fast.preflight: values, presets, the data folder and its layout, the run
folder and what it holds): a missing --data folder, an unknown flag or `--lr -1` is one line and exit 2, not a sweep
of failed runs.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import command_parser
from ..config import Config, read_saved_config
from ..errors import ConfigError, SealError, cli_main
from ..preflight import check_train_argv
from .outdir import out_folder
from .packing import MPS, launch, measured_packing, open_slots, pack_csv, parse_gpus, train_in_slots

KINDS = {"normal160": ["--method", "normal", "--generations", "1"], "normal": ["--method", "normal"],
         "llf": ["--method", "llf"], "seal": ["--method", "seal"]}
ROOT = Path(__file__).resolve().parents[2]
REAL_TRAIN_IMAGES = 100_000  # Tiny-ImageNet's train split: what an epoch of the real table trains on
EXIT_CODES = ("exit codes: 0 every run finished (or, with --dry-run, every run passed the trainer's checks and the "
              "plan was printed); 1 a run failed (the others still ran; its train.log says why; run the same command "
              "again to retry it, finished runs are skipped); 2 bad input, found before anything started: a sweep "
              "flag, a trainer flag or value, the data folder, --out naming a file; 3 every run that failed stopped "
              "on a non-finite loss (lower --lr, or --amp off); 130 interrupted (run the same command again to "
              "resume). Any other flag is passed to every `python -m seal_fast.train`.")


@dataclass
class Run:
    kind: str
    seed: int
    folder: Path
    args: list[str]
    cfg: Config | None = None  # what the trainer's checks returned for this run

    @property
    def argv(self) -> list[str]:
        """The trainer's command line of this run (after `python -m seal_fast.train`)."""
        return [*self.args, "--out", str(self.folder), "--resume", "auto"]

    @property
    def name(self) -> str:
        return f"{self.kind}-s{self.seed}"

    @classmethod
    def named(cls, out: Path, name: str) -> "Run":
        """The run `name` (<kind>-s<seed>) of the sweep folder `out`, for its state only (no command line)."""
        kind, _, seed = name.rpartition("-s")
        return cls(kind, int(seed) if seed.isdigit() else -1, out / name, [])

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


def parser():
    p = command_parser("sweep", __doc__.split("\n\n")[0], epilog=EXIT_CODES, allow_abbrev=False)
    p.add_argument("--data", metavar="DIR",
                   help="tiny-imagenet-200 folder (default: the built-in synthetic set, demo schedule)")
    p.add_argument("--runs", default="normal160,normal,llf,seal", metavar="KINDS",
                   help="comma-separated run kinds: normal160 (normal, 1 generation), normal, llf, seal "
                        "(default: all four, the paper's table)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="the seeds each run kind is trained with, one run folder per (kind, seed) (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder (created if needed); each run in DIR/<kind>-s<seed>/")
    p.add_argument("--jobs", type=int, default=1, metavar="K",
                   help="runs trained at once (separate processes; default 1)")
    p.add_argument("--runs-per-gpu", type=int, metavar="K",
                   help="pack K runs on each GPU (each capped at about 0.95/K of its memory, under NVIDIA MPS when "
                        "nvidia-cuda-mps-control is there, else time-sliced); without a GPU, K runs share the CPU; "
                        "with --launcher slurm, K runs per GPU of each job")
    p.add_argument("--gpus", metavar="LIST",
                   help="with --runs-per-gpu: the GPUs to pack, e.g. 0,1 (default: every visible GPU)")
    p.add_argument("--threads-per-run", type=int, metavar="N", help="CPU threads of each run (default: cores / jobs)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: train here (default); slurm: one Slurm job per run (K x GPUs with --runs-per-gpu K) "
                        "through submitit, requeued on preemption / time limit and resumed exactly (docs/cluster.md)")
    p.add_argument("--status", action="store_true",
                   help="show each run's state (Slurm's and its folder's) in --out, start nothing")
    s = p.add_argument_group("Slurm (--launcher slurm)")
    s.add_argument("--partition", help="partition of the jobs")
    s.add_argument("--account", help="account the jobs are charged to")
    s.add_argument("--qos", help="quality of service of the jobs")
    s.add_argument("--time", type=int, default=24 * 60, metavar="MIN",
                   help="time limit of each job in minutes (default 1440); a run that outlasts it is requeued")
    s.add_argument("--gpus-per-job", type=int, default=0, metavar="N", help="GPUs of each job (default 0: none asked)")
    s.add_argument("--cpus-per-run", type=int, default=4, metavar="N",
                   help="CPUs of each run (default 4); a packed job asks that times its runs")
    s.add_argument("--mem", metavar="SIZE", help="memory of each job, as sbatch's --mem (e.g. 32G)")
    s.add_argument("--sbatch", action="append", metavar="NAME=VALUE",
                   help="an extra #SBATCH option for every job, e.g. --sbatch constraint=h100 (repeatable)")
    p.add_argument("--wait", action="store_true",
                   help="with --launcher slurm: wait until every submitted job ends; exit codes as a local sweep")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run as the trainer would, list the runs and the projected GPU hours, then exit")
    return p


def parse(argv: list[str] | None):
    args, passthrough = parser().parse_known_args(argv)
    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"--runs {args.runs!r}: unknown run kind(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(KINDS)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: run at least 1 training at a time")
    if args.runs_per_gpu is not None and (args.runs_per_gpu < 1 or args.jobs != 1):
        raise ConfigError(f"--runs-per-gpu {args.runs_per_gpu}: give K >= 1, and not with --jobs (K runs per GPU "
                          "already sets how many train at once)")
    if args.launcher == "slurm" and args.gpus is not None:
        raise ConfigError(f"--gpus {args.gpus} with --launcher slurm: Slurm picks each job's GPUs; say how many with "
                          "--gpus-per-job N (K x N runs share a job with --runs-per-gpu K)")
    if args.time < 1 or args.cpus_per_run < 1 or args.gpus_per_job < 0:
        raise ConfigError("--time, --cpus-per-run: at least 1; --gpus-per-job: 0 or more")
    if args.gpus is not None and args.runs_per_gpu is None:
        raise ConfigError("--gpus: only with --runs-per-gpu K (say how many runs share each GPU)")
    args.gpus = parse_gpus(args.gpus)
    if args.threads_per_run is not None and args.threads_per_run < 1:
        raise ConfigError(f"--threads-per-run {args.threads_per_run}: give each run at least 1 thread")
    owned = {"--method", "--seed", "--out", "--resume", "--data", "--dry-run"}  # --generations: normal160 keeps 1
    clash = sorted({a.split("=")[0] for a in passthrough if a.split("=")[0] in owned})
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by the sweep for every run; give --runs / --seeds / --out / "
                          "--data instead")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError("--seeds: a seed is listed twice")
    out = out_folder(args.out, create=False)  # --out FILE or FILE/sub: one line, before anything
    data = ["--data", args.data] if args.data else []
    runs = [Run(k, s, out / f"{k}-s{s}", data + passthrough + KINDS[k] + ["--seed", str(s)])  # the kind's flags last
            for k in kinds for s in args.seeds]
    return args, runs


def preflight(runs: list[Run]) -> None:
    """Every run through the trainer's own parser and checks (writing nothing), before any starts: the first that
    the trainer would refuse is one line naming the run, with the trainer's reason and exit code."""
    for r in runs:
        try:
            r.cfg = check_train_argv(r.argv)
        except SealError as exc:
            raise type(exc)(f"{r.name}: {exc}") from None


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


def device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def dry_run(runs: list[Run], args) -> int:
    gpu = device_name()
    per_1600, source = measured_hours(gpu)
    total, epochs_left = 0.0, 0
    for r in runs:
        state, done, planned = r.state()
        epochs = r.cfg.generations * r.cfg.epochs  # as the trainer's checks resolved the flags
        epochs_left += epochs - done
        share = (epochs - done) / 1600
        hours = per_1600 * share if per_1600 is not None else None
        total += hours or 0.0
        left = f"{done}/{epochs} epochs"
        print((f"{r.name:14s} {state:9s} {left:18s} {r.folder}  " + (f"~{hours:.1f} GPU h" if hours is not None
                                                                     else "")).rstrip())
    if per_1600 is None:
        print(f"projected GPU hours: {source}")
    else:
        print(f"projected GPU hours: {total:.1f} run one after another on {gpu} ({source}: ResNet-50 at batch 32, "
              "scaled by each run's epochs)")
    if args.runs_per_gpu is not None:
        packed_projection(args, gpu, total if per_1600 is not None else None, epochs_left)
    print(f"{len(runs)} runs passed the trainer's checks; nothing was started")
    return 0


def packed_projection(args, gpu: str | None, sequential_h: float | None, epochs_left: int) -> None:
    """The hours with K runs per GPU, from bench/bench_pack.py's measured gain (never assumed)."""
    k = args.runs_per_gpu
    n = len(args.gpus) if args.gpus else max(1, torch.cuda.device_count())
    m = measured_packing(gpu, k)
    if m is None:
        print(f"packed, {k} per GPU: not measured on {gpu or 'this machine (no GPU)'} (no row in {pack_csv()}); "
              f"measure it: python bench/bench_pack.py --k 1 {k} --mps off on --seconds 30")
        return
    where = (f"{pack_csv().name} {m.get('date', '?')}: {m['aggregate']:.0f} images/s summed over {k} runs, MPS "
             f"{m.get('mps', '?')}")
    if sequential_h is not None and m["gain"]:
        hours, how = sequential_h / m["gain"] / n, f"{m['gain']:.2f}x one run"
    else:  # training steps only: the images left at the measured aggregate speed
        hours, how = epochs_left * REAL_TRAIN_IMAGES / (m["aggregate"] * n) / 3600, "training steps only"
    print(f"packed, {k} per GPU on {n} GPU(s): ~{hours:.1f} h ({where}; {how})")


def packed_slots(args, out: Path) -> tuple[list[dict[str, str] | None], MPS | None]:
    """The slots the runs train in: `--jobs K` plain ones, or K per GPU with `--runs-per-gpu K` (MPS started)."""
    if args.runs_per_gpu is None:
        return [None] * args.jobs, None
    return open_slots(args.runs_per_gpu, args.gpus or [str(i) for i in range(torch.cuda.device_count())], out)


def on_slurm(runs: list[Run], out: Path, args) -> int:
    from .slurm import submit

    jobs = submit(runs, out, args)
    print(f"{len(jobs)} job(s) submitted; their states: python -m seal_fast sweep --out {out} --status ...", flush=True)
    if not args.wait:
        return 0
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - submitit raises the job's failure; one line each
            failed.append(job.job_id)
            print(f"FAILED job {job.job_id}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
                  file=sys.stderr)
    return 1 if failed else 0


def _terminate(signum, frame):  # a killed sweep stops the way Ctrl-C does: MPS stopped, exit 130
    raise KeyboardInterrupt


def run(argv: list[str] | None = None) -> int:
    args, runs = parse(argv)
    preflight(runs)
    if args.dry_run:
        return dry_run(runs, args)
    out = out_folder(args.out)
    if args.status:  # the runs given and every run the sweep folder's jobs.json records (other seeds, kinds)
        from .slurm import read_jobs, status
        known = {r.name for r in runs}
        return status(runs + [Run.named(out, n) for n in read_jobs(out) if n not in known], out)
    if args.launcher == "slurm":
        return on_slurm(runs, out, args)
    old = signal.signal(signal.SIGTERM, _terminate)
    free, mps = packed_slots(args, out)
    try:
        return train_all(args, runs, free)
    finally:
        if mps is not None:
            mps.stop()
        signal.signal(signal.SIGTERM, old)


def train_all(args, runs: list[Run], free: list[dict[str, str] | None]) -> int:
    threads = args.threads_per_run or max(1, (os.cpu_count() or 1) // len(free))
    todo = [r for r in runs if r.state()[0] != "finished"]
    skipped = len(runs) - len(todo)
    print(f"sweep {args.out}: {len(runs)} runs, {skipped} finished already, {len(todo)} to train, "
          f"{len(free)} at a time ({threads} CPU threads each)", flush=True)
    failed = train_in_slots(todo, free, threads, start=launch)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and run the same command again "
              "(finished runs are skipped)", file=sys.stderr)
        return 3 if set(failed.values()) == {3} else 1
    print(f"all {len(runs)} runs finished; the table: python -m seal_fast report {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted; run the same command again to resume (finished runs are skipped)")


if __name__ == "__main__":
    sys.exit(main())
