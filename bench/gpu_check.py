"""Everything a lent GPU must tell this project, in one call that stops itself within a budget.

    PYTHONPATH=. python3 bench/gpu_check.py --out DIR [--budget-s 420] [--only sgd knn ...]
    PYTHONPATH=. python3 bench/gpu_check.py --smoke --out DIR      # every step at tiny sizes, on a CPU too

Steps, in order of value, each a subprocess with its own time box, in seconds of a 420 s budget (scaled with
--budget-s; a step may use what earlier steps left over, never the later steps' boxes; a hang or a failure costs
that step only; what it printed stays in log.txt):
  env        10  GPU name, driver, clocks, memory, versions (bench/gpu_steps.py env)
  native     30  build the native CUDA backend (CMakeLists.txt, sm_90) into a scratch folder; later steps use it
                 ($SEAL_FAST_CUDA_LIB): its GPU tests in `pytest`, its rows in `sgd`
  pytest     60  `pytest -m gpu`: every GPU test of the project
  sanitizer  25  compute-sanitizer memcheck / racecheck / synccheck on the fused SGD (Triton, native) and the KNN
  sgd        25  bench/bench_sgd.py: ResNet-50's 161 shapes, fp32 and the fp16-scaling case, copy roofline
  knn        40  bench/bench_knn.py: Q=10,000, N=100,000, D 256 and 2048, k=30, bf16 and fp32, vs torch
  synth      15  the generated 200-class 64 px set that train, data and cli read (cached)
  train     100  bench/bench_train.py: reference vs ours at batch 32 and 256, 1 timed epoch, SEAL hours, --profile
  pack       40  bench/bench_pack.py --k 1 8 --mps on --seconds 8: packed runs on the GPU (issue 23)
  data       15  bench/bench_data.py: the loaders there (cache, torch; DALI only if importable), b32 / b256
  depth      15  bench/bench_depth.py: all probes of ResNet-50, 10,000 val x 100,000 train
  cli        35  python -m seal_fast.train --device cuda --amp --channels-last, 2 generations of 2 epochs
Without CUDA every step after env is skipped, saying so (--smoke runs them at tiny sizes, but sanitizer and pack).
The bench scripts append to their own CSVs as always (bench/results/, or $SEAL_FAST_BENCH_RESULTS; --smoke
uses a scratch folder so trial rows never reach the committed CSVs). Into --out go at most 6 files, results.csv
and summary.md rewritten (atomically) after every step, so a run killed at any moment keeps every finished step;
SIGTERM or Ctrl-C kills the running step and writes them (exit 143):
  summary.md   the steps, then one line per performance target: measured, target, met / missed / not run, and why
  results.csv  every row any step produced, device and versions on each
  log.txt      every step's output, with its command, exit status and seconds
  pytest.txt   the GPU tests' report
  profile.txt  the top kernels of one graphed training step (train --profile)
  pack.csv     the packed-runs rows (copy them to bench/results/pack.csv: `sweep --dry-run` reads them there)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.gpu_steps import sanitizer_exe  # noqa: E402
from seal_fast.files import write_whole  # noqa: E402 - a kill leaves the old file or the new one, never half

STEPS = ("env", "native", "pytest", "sanitizer", "sgd", "knn", "synth", "train", "pack", "data", "depth", "cli")
GPU_ONLY = {"sanitizer", "pack"}  # nothing to run without CUDA, even at tiny sizes
NEEDS_DATA = {"train", "data", "cli"}  # they read the synth step's folder, DATA in their command lines
DATA = "<synth>"
BASE_S = {False: 420.0, True: 380.0}  # the time boxes below are seconds of this budget (full run, smoke run)
RESERVE_S = 10.0  # of the budget, kept for the report; the boxes sum to at most BASE_S - RESERVE_S


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: float            # this step's own time box, in seconds of BASE_S (scaled with --budget-s)
    csv: str | None = None  # the bench CSV whose new rows are this step's results (a name in the results folder,
    status: str = "not run"  # or an absolute path)
    seconds: float = 0.0
    why: str = ""
    rows: list[dict] = field(default_factory=list)
    output: str = ""        # what the step printed (also in log.txt)


def plan(smoke: bool, out: Path, run_dir: Path, native_dir: Path) -> list[Step]:
    """The steps in order of value, each with its time box (the boxes fit BASE_S less RESERVE_S)."""
    py, b = sys.executable, str(ROOT / "bench")
    me = [py, f"{b}/gpu_steps.py"]
    pytest = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE", str(ROOT / "tests")]
    pack = [py, f"{b}/bench_pack.py", "--k", "1", "8", "--mps", "on", "--seconds", "8", "--csv", str(out / "pack.csv")]
    cli = [py, "-m", "seal_fast.train", "--data", DATA, "--out", str(run_dir), "--generations", "2", "--epochs", "2",
           "--ascent-epochs", "1", "--warmup", "1", "--eval-every", "1", "--amp", "--channels-last"]
    if smoke:  # tiny sizes: proves every command line and parser works, on a CPU (Triton interpreter); boxes from
        # a 2-core CPU's CPU seconds (2026-12-05): sgd 109 (the interpreted step over 23.9M parameters), train 59,
        # native 18, cli ~30; a CPU shared with other work (load ~10) needs 2-3x as long and times out
        return [
            Step("env", [*me, "env"], 12), Step("native", [*me, "native", str(native_dir)], 40),
            Step("pytest", pytest, 25), Step("sanitizer", [*me, "sanitize"], 3),
            Step("sgd", [py, f"{b}/bench_sgd.py", "--reps", "2"], 130, "sgd"),
            Step("knn", [py, f"{b}/bench_knn.py", "--q", "64", "--n", "700", "--d", "32", "--k", "5", "--reps", "1"],
                 8, "knn"),
            Step("synth", [*me, "data", "10", "8", "2"], 8),
            Step("train", [py, f"{b}/bench_train.py", "--data", DATA, "--batch", "16", "--epochs", "1", "--workers",
                           "0", "--setups", "ours", "--profile"], 85, "train"),
            Step("pack", pack, 2, str(out / "pack.csv")),
            Step("data", [py, f"{b}/bench_data.py", "--data", DATA, "--seconds", "0.2", "--workers", "1",
                          "--loaders", "cache,torch,dali"], 18, "data"),
            Step("depth", [py, f"{b}/bench_depth.py", "--train", "96", "--val", "32", "--classes", "10",
                           "--batch", "32", "--arch", "resnet10", "--k", "5"], 20, "depth"),
            Step("cli", [*cli[:7], "--arch", "resnet10", "--batch-size", "16", "--workers", "0", *cli[7:]], 19),
        ]
    return [
        Step("env", [*me, "env"], 10), Step("native", [*me, "native", str(native_dir)], 30),
        Step("pytest", pytest, 60), Step("sanitizer", [*me, "sanitize"], 25),
        Step("sgd", [py, f"{b}/bench_sgd.py"], 25, "sgd"),
        Step("knn", [py, f"{b}/bench_knn.py", "--q", "10000", "--n", "100000", "--d", "256", "2048", "--k", "30",
                     "--dtypes", "bf16", "fp32"], 40, "knn"),
        Step("synth", [*me, "data", "200", "50", "10"], 15),  # = bench_train's set; 10-13 s on an H200 host
        Step("train", [py, f"{b}/bench_train.py", "--data", DATA, "--batch", "32", "256", "--epochs", "1",
                       "--profile"], 100, "train"),  # 2 epochs took ~120 s on an H200 (2026-12-04)
        Step("pack", pack, 40, str(out / "pack.csv")),
        Step("data", [py, f"{b}/bench_data.py", "--data", DATA, "--seconds", "0.5", "--loaders", "cache,torch,dali"],
             15, "data"),
        Step("depth", [py, f"{b}/bench_depth.py", "--train", "100000", "--val", "10000"], 15, "depth"),
        Step("cli", [*cli, "--device", "cuda"], 35),  # 6 epochs took 40 s on an H200 (2026-12-04)
    ]


# ---- running the steps ---------------------------------------------------------------------------


def csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Stopped(Exception):
    """SIGTERM (or Ctrl-C) while a step runs: the step is killed, the report written with what is done."""


def run_step(step: Step, timeout: float, log, env: dict, results_dir: Path) -> None:
    path = Path(step.csv) if step.csv and Path(step.csv).is_absolute() else results_dir / f"{step.csv}.csv"
    before = len(csv_rows(path)) if step.csv else 0
    log.write(f"\n===== {step.name}: {' '.join(step.cmd)}\n===== time box {timeout:.0f} s\n")
    log.flush()
    offset = log.tell()
    t = time.perf_counter()
    proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # a timeout, SIGTERM or Ctrl-C: the whole step, its workers included
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    step.seconds = time.perf_counter() - t
    log.seek(0, os.SEEK_END)
    with open(log.name, errors="replace") as f:
        f.seek(offset)
        step.output = f.read()
    if code is None:
        step.status, step.why = "timeout", f"killed after its {timeout:.0f} s time box"
    elif code == 0:
        step.status = "ok"
    else:
        step.status, step.why = "failed", f"exit status {code} (see log.txt)"
    if step.csv:
        step.rows = csv_rows(path)[before:]
    log.write(f"===== {step.name}: {step.status} {step.why} in {step.seconds:.1f} s\n")
    log.flush()


def cli_rows(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    cfg = json.loads((run_dir / "config.json").read_text())
    return [{"bench": "cli", "epochs": len(rows), "method": cfg["method"], "arch": cfg["arch"],
             "batch": cfg["batch_size"], "images_per_s": max(r.get("images_per_s") or 0 for r in rows),
             "seconds": sum(r.get("seconds") or 0 for r in rows),
             "best_val": max((r["val_acc"] for r in rows if r.get("val_acc") is not None), default=None)}]


def pytest_counts(text: str) -> str:
    lines = [ln for ln in text.splitlines() if (" passed" in ln or " skipped" in ln or " failed" in ln
                                                  or "no tests ran" in ln or " deselected" in ln)]
    return lines[-1].strip("= ") if lines else "no summary line"


# ---- the summary: one line per performance target ------------------------------------------------


def num(row: dict | None, key: str) -> float | None:
    try:
        return float(row[key]) if row and row.get(key) not in (None, "") else None
    except ValueError:
        return None


def first(rows: list[dict], **want) -> dict | None:
    for r in rows:
        if all(str(r.get(k, "")) == str(v) for k, v in want.items()):
            return r
    return None


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "missed"


def targets(steps: dict[str, Step], cuda: bool) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict-and-why) per performance target of the project."""
    out = []

    def line(name, step, value, goal, fmt, target=None, higher=True, why=""):
        s = steps.get(step)
        if s is None or s.status in ("not run", "skipped"):
            out.append((name, "", goal, f"not run: {s.why if s else 'not selected'}"))
            return
        shown = fmt.format(value) if value is not None else ""
        if not cuda:
            out.append((name, shown, goal, "not evaluated: no GPU (smoke run)"))
        elif target is None:
            out.append((name, shown, goal, why or "no numeric target"))
        else:
            v = verdict(value, target, higher)
            out.append((name, shown, goal, v + (f" ({s.status}{': ' + s.why if s.why else ''})"
                                                if v == "not measured" else "")))

    sgd = steps["sgd"].rows if "sgd" in steps else []
    signed = next((r for r in sgd if "SignedSGD" in r.get("case", "") and "scal" not in r.get("case", "")
                   and "fp16" not in r.get("case", "") and "graph" not in r.get("case", "")), None)
    line("SGD step, fused SignedSGD fp32, share of copy bandwidth (ResNet-50 shapes)", "sgd",
         num(signed, "frac_of_copy"), ">= 0.90", "{:.2f}", 0.90)
    # the trainer replays its step as a CUDA graph: the graph-replay rows are the figures that decide
    graphed = ("SignedSGD triton (graph replay)", "SignedSGD cuda (native) (graph replay)")
    for name, case in zip(("Triton", "native CUDA"), graphed):
        line(f"SGD step, {name} fp32 graph-replayed, share of copy bandwidth", "sgd",
             num(first(sgd, case=case), "frac_of_copy"), ">= 0.90", "{:.2f}", 0.90)
    tri, nat = (num(first(sgd, case=c), "median_us") for c in graphed)
    line("SGD backend='auto' on a GPU: Triton time / native time (graph replay; > 1: native faster)", "sgd",
         tri / nat if tri and nat else None, "the faster becomes auto", "{:.2f}x",
         why="decide backend='auto' from this figure (seal_fast/optim.py)")
    knn = steps["knn"].rows if "knn" in steps else []
    for d in ("2048", "256"):
        fused = first(knn, case="fused", d=d, dtype="bf16")
        base = [num(r, "median_ms") for r in knn if r.get("d") == d and r.get("dtype") == "bf16"  # torch's cases
                and not r.get("case", "").startswith("fused") and num(r, "median_ms")]
        speed = (min(base) / num(fused, "median_ms")) if base and num(fused, "median_ms") else None
        line(f"KNN bf16 D={d} Q=10k N=100k k=30, share of dense bf16 peak", "knn", num(fused, "frac_of_peak"),
             ">= 0.50", "{:.2f}", 0.50)
        line(f"KNN bf16 D={d}, speed-up over the best torch baseline", "knn", speed, ">= 3x", "{:.2f}x", 3.0)
    data = steps["data"].rows if "data" in steps else []
    line("cache loader, train images/s at batch 256", "data",
         num(first(data, loader="cache", split="train", batch=256), "images_per_s"), ">= 1,000,000", "{:,.0f}",
         1_000_000)
    dali = first(data, loader="dali", split="train", batch=256)
    if dali or not data:
        line("DALI loader, train images/s at batch 256", "data", num(dali, "images_per_s"), ">= 30,000",
             "{:,.0f}", 30_000)
    else:
        out.append(("DALI loader, train images/s at batch 256", "", ">= 30,000", "not run: DALI not importable here"))
    pack = first(steps["pack"].rows if "pack" in steps else [], k=8)
    line("packed runs: K=8 on one GPU, images/s summed at batch 32 (MPS on)", "pack",
         num(pack, "aggregate_images_per_s"), ">= 34,000 (the table in 12 h)", "{:,.0f}", 34_000)
    line("packed runs: K=8 over one run alone (gain)", "pack", num(pack, "gain_vs_k1"), ">= 3x", "{:.2f}x", 3.0)
    depth = steps["depth"].rows[-1] if "depth" in steps and steps["depth"].rows else None
    line("prediction depth, all probes, 10k val x 100k train (s)", "depth", num(depth, "seconds"), "< 60 s",
         "{:.1f} s", 60, higher=False)
    train = steps["train"].rows if "train" in steps else []
    for batch in ("32", "256"):
        ours = first(train, setup="ours", batch=batch)
        line(f"training step, ours vs published setup, batch {batch} (speed-up)", "train",
             num(ours, "speedup_vs_reference"), "as high as it goes", "{:.2f}x")
        line(f"projected 1,600-epoch SEAL on Tiny-ImageNet, batch {batch} (hours)", "train",
             num(ours, "seal_schedule_hours"), "hours, not days", "{:.1f} h")
    cli = steps["cli"].rows[0] if "cli" in steps and steps["cli"].rows else None
    line("the real CLI (--amp --channels-last), images/s", "cli", num(cli, "images_per_s"), "runs end to end",
         "{:,.0f}", why="ran end to end" if cli else "")
    return out


@dataclass
class Check:
    """One gpu_check run: where it writes, its clock and budget, what the steps found so far."""
    out: Path
    smoke: bool
    budget: float
    env: dict
    results_dir: Path
    scratch: Path
    start: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    info: dict = field(default_factory=dict)  # the env step's report
    data: str | None = None                   # the synth step's folder
    state: str = "running"

    @property
    def scale(self) -> float:
        return self.budget / BASE_S[self.smoke]

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def cuda(self) -> bool:
        return bool(self.info) and not str(self.info.get("gpu", "none")).startswith("none")


def write_report(c: Check, steps: list[Step]) -> None:
    """results.csv and summary.md as they stand, each replaced whole: written after every step."""
    info = dict(c.info)
    info.setdefault("date", time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.started_at)))
    info.setdefault("commit", os.environ.get("SEAL_FAST_COMMIT", "unknown"))
    info.setdefault("gpu", "unknown (the env step has not reported)")
    by = {s.name: s for s in steps}
    lines = [f"# gpu_check {'(smoke: tiny sizes, not performance figures)' if c.smoke else ''}".rstrip(), "",
             f"- device: {info['gpu']}; {info.get('nvidia_smi', '')}".rstrip("; "),
             f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, "
             f"python {info.get('python')}, DALI {info.get('dali')}, {info.get('cpu_cores')} CPU cores",
             f"- commit {info['commit']}, {info['date']}; {time.perf_counter() - c.start:.0f} s of a "
             f"{c.budget:.0f} s budget; {c.state}", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.why} |" for s in steps]
    lines += ["", "| performance target | measured | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {n} | {m} | {g} | {v} |" for n, m, g, v in targets(by, c.cuda())]
    write_whole(c.out / "summary.md", "\n".join(lines) + "\n")
    base = {"date": info["date"], "commit": info["commit"], "device": info["gpu"], "torch": info.get("torch", ""),
            "triton": info.get("triton", ""), "cuda": info.get("cuda", "")}
    rows = [dict(base, step="env", bench="env", **{k: v for k, v in info.items() if k not in base})]
    for s in steps:
        rows.append(dict(base, step=s.name, bench="step", status=s.status, seconds=round(s.seconds, 2), note=s.why))
        rows += [dict(base, **r, step=s.name) for r in s.rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_whole(c.out / "results.csv", buf.getvalue())


def skip_reason(s: Step, c: Check, ahead: bool = False) -> str:
    """Why `s` cannot run ("" when it can); `ahead`: only what is known before the steps before it have run."""
    if s.name == "env" or (ahead and not c.info):
        return ""
    if not c.info:
        return "the env step gave no report (see log.txt)"
    if not c.cuda() and (not c.smoke or s.name in GPU_ONLY):
        return "needs a CUDA device; there is none here" + ("" if c.smoke else " (--smoke runs tiny sizes on a CPU)")
    if s.name == "sanitizer" and sanitizer_exe() is None:
        return "compute-sanitizer not found"
    if s.name in NEEDS_DATA and c.data is None and not ahead:
        return "no data: the synth step did not make it"
    return ""


def time_box(steps: list[Step], i: int, c: Check) -> float:
    """Its own box, or more when earlier steps left time over; never eating into the later steps' boxes."""
    scale = max(c.scale, 1.0)  # a smaller budget runs fewer steps, not every step in a box too small for it
    later = sum(s.cap_s for s in steps[i + 1:] if not skip_reason(s, c, ahead=True)) * scale
    return min(c.left() - RESERVE_S, max(steps[i].cap_s * scale, c.left() - RESERVE_S - later))


def after(s: Step, c: Check, run_dir: Path) -> None:
    """What a finished step hands on: the env report, the native build, the data folder, pytest's and the
    profile's files, the CLI run's figures."""
    if s.name == "env":
        c.info = next((json.loads(ln) for ln in s.output.splitlines() if ln.startswith("{")), {})
    elif s.name == "native":  # the later steps load this build (and, if it failed, skip, never rebuild)
        c.env["SEAL_FAST_CUDA_LIB"] = str(c.scratch / "native" / "lib" / "libseal_fast_cuda.so")
    elif s.name == "synth" and s.status == "ok":
        c.data = next((ln[6:] for ln in s.output.splitlines() if ln.startswith("data: ")), None)
    elif s.name == "pytest":
        write_whole(c.out / "pytest.txt", s.output)
        s.why = (s.why + "; " if s.why else "") + pytest_counts(s.output)
    elif s.name == "train":
        profiles = sorted(p for p in c.results_dir.glob("train_profile_*.txt") if p.stat().st_mtime >= c.started_at)
        if profiles:
            write_whole(c.out / "profile.txt", "\n\n".join(p.read_text() for p in profiles))
    elif s.name == "cli" and s.status == "ok":
        s.rows = cli_rows(run_dir)


def run_steps(c: Check, steps: list[Step], run_dir: Path) -> None:
    with open(c.out / "log.txt", "w") as log:
        log.write(f"gpu_check {'--smoke ' if c.smoke else ''}budget {c.budget:.0f} s, {time.ctime()}\n")
        for i, s in enumerate(steps):
            s.why = skip_reason(s, c)
            box = time_box(steps, i, c)
            if s.why or box < max(3.0, 0.3 * s.cap_s):
                s.status, s.why = "skipped", s.why or f"budget spent ({c.budget:.0f} s; {max(box, 0):.0f} s left)"
            else:
                s.cmd = [c.data if a == DATA else a for a in s.cmd]
                try:
                    run_step(s, box, log, c.env, c.results_dir)
                except Stopped:
                    s.status, s.why = "killed", "gpu_check was stopped (SIGTERM or Ctrl-C) during this step"
                    c.state = f"stopped during {s.name}; the steps after it did not run"
                    raise
                finally:
                    after(s, c, run_dir)
            c.state = f"running: {i + 1} of {len(steps)} steps done" if i + 1 < len(steps) else "finished"
            write_report(c, steps)


def stop(signum, frame):
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="folder for summary.md, results.csv, log.txt, pytest.txt, profile.txt, pack.csv")
    p.add_argument("--budget-s", type=float, default=420, help="stop within this many seconds (default 420)")
    p.add_argument("--smoke", action="store_true", help="every step at tiny sizes (CPU: Triton interpreter)")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps (env always runs)")
    args = p.parse_args(argv)
    return check(Path(args.out), args.budget_s, args.smoke, args.only)


def check(out: Path, budget: float, smoke: bool, only: list[str] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1", SEAL_FAST_CACHE=str(scratch / "cache") if smoke
               else os.environ.get("SEAL_FAST_CACHE", str(Path.home() / ".cache" / "seal_fast")))
    # smoke: trial rows go to a scratch folder, never into the committed CSVs
    results_dir = scratch / "results" if smoke else Path(os.environ.get("SEAL_FAST_BENCH_RESULTS")
                                                        or ROOT / "bench" / "results")
    env["SEAL_FAST_BENCH_RESULTS"] = str(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if not smoke:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter, on the GPU
    c = Check(out, smoke, budget, env, results_dir, scratch)
    steps = plan(smoke, out, scratch / "cli-run", scratch / "native")
    if only:
        wanted = {"env", *only} | ({"synth"} if NEEDS_DATA & set(only) else set())
        steps = [s for s in steps if s.name in wanted]
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_steps(c, steps, scratch / "cli-run")
    except Stopped:
        write_report(c, steps)
        return 143
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        shutil.rmtree(scratch, ignore_errors=True)
    print((out / "summary.md").read_text())
    return 1 if any(s.status in ("failed", "timeout") for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
