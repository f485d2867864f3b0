"""Everything a lent GPU must tell this project, in one call that stops itself within a budget.

    PYTHONPATH=. python3 bench/gpu_check.py --out DIR [--budget-s 420] [--only sgd knn ...]
    PYTHONPATH=. python3 bench/gpu_check.py --smoke --out DIR      # every step at tiny sizes, on a CPU too

Steps, in order of value, each a subprocess with its own time box (a hang or a failure costs that step
only; what it printed stays in log.txt):
  env      GPU name, driver, clocks, memory, versions
  native   build the native CUDA backend (CMakeLists.txt, sm_90) into a scratch folder; later steps use it
           ($SEAL_FAST_CUDA_LIB): its GPU tests in `pytest`, its rows in `sgd`
  pytest   `pytest -m gpu`: every GPU test of the project
  sgd      bench/bench_sgd.py: ResNet-50's 161 shapes, fp32 and the fp16-scaling case, copy roofline
  knn      bench/bench_knn.py: Q=10,000, N=100,000, D 256 and 2048, k=30, bf16 and fp32, vs torch
  train    bench/bench_train.py: reference vs ours at batch 32 and 256, projected SEAL hours, --profile
  data     bench/bench_data.py: the loaders there (cache, torch; DALI only if importable), b32 / b256
  depth    bench/bench_depth.py: all probes of ResNet-50, 10,000 val x 100,000 train
  cli      python -m seal_fast.train --device cuda --amp --channels-last, a few epochs, 200 classes
The bench scripts append to their own CSVs as always (bench/results/, or $SEAL_FAST_BENCH_RESULTS; --smoke
uses a scratch folder so trial rows never reach the committed CSVs). Into --out go at most 5 files:
  summary.md   one line per performance target: measured, target, met / missed / not run, and why
  results.csv  every row any step produced, device and versions on each
  log.txt      every step's output, with its command, exit status and seconds
  pytest.txt   the GPU tests' report
  profile.txt  the top kernels of one graphed training step (train --profile)
"""

from __future__ import annotations

import argparse
import csv
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

STEPS = ("env", "native", "pytest", "sgd", "knn", "train", "data", "depth", "cli")


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: float            # this step's own time box (scaled with --budget-s)
    csv: str | None = None  # the bench CSV whose new rows are this step's results
    status: str = "not run"
    seconds: float = 0.0
    why: str = ""
    rows: list[dict] = field(default_factory=list)
    output: str = ""        # what the step printed (also in log.txt)


def plan(smoke: bool, data_dir: Path, run_dir: Path, native_dir: Path) -> list[Step]:
    py = sys.executable
    b = str(ROOT / "bench")
    if smoke:  # tiny sizes: proves every command line and parser works, on a CPU (Triton interpreter)
        return [
            Step("env", [py, __file__, "--env-only"], 30),
            Step("native", [py, __file__, "--build-native", str(native_dir)], 120),
            Step("pytest", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")], 90),
            Step("sgd", [py, f"{b}/bench_sgd.py", "--reps", "2"], 110, "sgd"),
            Step("knn", [py, f"{b}/bench_knn.py", "--q", "64", "--n", "700", "--d", "32", "--k", "5", "--reps", "1"],
                 40, "knn"),
            Step("train", [py, f"{b}/bench_train.py", "--data", str(data_dir), "--batch", "16", "--epochs", "1",
                           "--workers", "0", "--profile"], 90, "train"),
            Step("data", [py, f"{b}/bench_data.py", "--data", str(data_dir), "--seconds", "0.2", "--workers", "1",
                          "--loaders", "cache,torch,dali"], 40, "data"),
            Step("depth", [py, f"{b}/bench_depth.py", "--train", "96", "--val", "32", "--classes", "10",
                           "--batch", "32", "--arch", "resnet10", "--k", "5"], 40, "depth"),
            Step("cli", [py, "-m", "seal_fast.train", "--data", str(data_dir), "--out", str(run_dir), "--arch",
                         "resnet10", "--generations", "2", "--epochs", "2", "--ascent-epochs", "1", "--warmup", "1",
                         "--eval-every", "1", "--batch-size", "16", "--workers", "0", "--amp", "--channels-last"], 60),
        ]
    return [
        Step("env", [py, __file__, "--env-only"], 30),
        Step("native", [py, __file__, "--build-native", str(native_dir)], 60),
        Step("pytest", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfE",
                        str(ROOT / "tests")], 110),
        Step("sgd", [py, f"{b}/bench_sgd.py"], 50, "sgd"),
        Step("knn", [py, f"{b}/bench_knn.py", "--q", "10000", "--n", "100000", "--d", "256", "2048", "--k", "30",
                     "--dtypes", "bf16", "fp32"], 70, "knn"),
        Step("train", [py, f"{b}/bench_train.py", "--data", str(data_dir), "--batch", "32", "256", "--epochs", "2",
                       "--profile"], 170, "train"),  # 3 epochs did not fit 130 s on an H200 (2026-12-04)
        Step("data", [py, f"{b}/bench_data.py", "--data", str(data_dir), "--seconds", "2",
                      "--loaders", "cache,torch,dali"], 45, "data"),
        Step("depth", [py, f"{b}/bench_depth.py", "--train", "100000", "--val", "10000"], 90, "depth"),
        Step("cli", [py, "-m", "seal_fast.train", "--data", str(data_dir), "--out", str(run_dir), "--device", "cuda",
                     "--amp", "--channels-last", "--generations", "2", "--epochs", "3", "--ascent-epochs", "1",
                     "--warmup", "1", "--eval-every", "1"], 70),
    ]


# ---- the environment step (run in its own process like every other) ------------------------------


def environment_report() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version()), "cpu_cores": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"missing ({exc})"
    try:
        from seal_fast.data.dali_loader import dali_available
        info["dali"] = "yes" if dali_available() else "no"
    except Exception as exc:  # noqa: BLE001
        info["dali"] = f"error ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(total / 1e9, 1), free_gb=round(free / 1e9, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
            r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=20)
            info["nvidia_smi"] = (r.stdout or r.stderr).strip()
    else:
        info["gpu"] = "none (CPU only)"
    return info


# ---- running the steps ---------------------------------------------------------------------------


def csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_step(step: Step, timeout: float, log, env: dict, results_dir: Path) -> None:
    before = len(csv_rows(results_dir / f"{step.csv}.csv")) if step.csv else 0
    log.write(f"\n===== {step.name}: {' '.join(step.cmd)}\n===== time box {timeout:.0f} s\n")
    log.flush()
    offset = log.tell()
    t = time.perf_counter()
    proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole step, its workers included
        proc.wait()
        code = None
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
        step.rows = csv_rows(results_dir / f"{step.csv}.csv")[before:]
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
        if s is None or s.status == "not run":
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


def write_summary(out: Path, steps: list[Step], env_info: dict, budget: float, spent: float, smoke: bool) -> None:
    by = {s.name: s for s in steps}
    cuda = "gpu" in env_info and not str(env_info["gpu"]).startswith("none")
    lines = [f"# gpu_check {'(smoke: tiny sizes, not performance figures)' if smoke else ''}".rstrip(), "",
             f"- device: {env_info.get('gpu', 'unknown')}; {env_info.get('nvidia_smi', '')}".rstrip("; "),
             f"- torch {env_info.get('torch')} (CUDA {env_info.get('cuda')}), triton {env_info.get('triton')}, "
             f"python {env_info.get('python')}, DALI {env_info.get('dali')}, {env_info.get('cpu_cores')} CPU cores",
             f"- commit {env_info.get('commit', 'unknown')}, {env_info.get('date', '')}; "
             f"{spent:.0f} s of a {budget:.0f} s budget", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.why} |")
    lines += ["", "| performance target | measured | target | verdict |", "|---|---|---|---|"]
    for name, measured, goal, v in targets(by, cuda):
        lines.append(f"| {name} | {measured} | {goal} | {v} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_results(out: Path, steps: list[Step], env_info: dict) -> None:
    rows = []
    base = {"date": env_info.get("date", ""), "commit": env_info.get("commit", ""),
            "device": env_info.get("gpu", ""), "torch": env_info.get("torch", ""),
            "triton": env_info.get("triton", ""), "cuda": env_info.get("cuda", "")}
    rows.append(dict(base, step="env", bench="env", **{k: v for k, v in env_info.items() if k not in base}))
    for s in steps:
        rows.append(dict(base, step=s.name, bench="step", status=s.status, seconds=round(s.seconds, 2), note=s.why))
        rows += [dict(base, **r, step=s.name) for r in s.rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for summary.md, results.csv, log.txt, pytest.txt, profile.txt")
    p.add_argument("--budget-s", type=float, default=420, help="stop within this many seconds (default 420)")
    p.add_argument("--smoke", action="store_true", help="every step at tiny sizes (CPU: Triton interpreter)")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps (env always runs)")
    p.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-native", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.env_only:
        print(json.dumps(environment_report()))
        return 0
    if args.build_native:
        from seal_fast.kernels import cuda

        t = time.perf_counter()
        print(f"built {cuda.build(Path(args.build_native), architectures='90')} in {time.perf_counter() - t:.1f} s")
        return 0
    if not args.out:
        p.error("--out DIR is required")
    start, started_at = time.perf_counter(), time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1", SEAL_FAST_CACHE=str(scratch / "cache") if args.smoke
               else os.environ.get("SEAL_FAST_CACHE", str(Path.home() / ".cache" / "seal_fast")))
    results_dir = Path(os.environ.get("SEAL_FAST_BENCH_RESULTS") or ROOT / "bench" / "results")
    if args.smoke:  # trial rows go to a scratch folder, never into the committed CSVs
        results_dir = scratch / "results"
    env["SEAL_FAST_BENCH_RESULTS"] = str(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.smoke:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter, on the GPU
    budget = args.budget_s
    scale = budget / 420.0

    def left() -> float:
        return budget - (time.perf_counter() - start)

    with open(out / "log.txt", "w") as log:
        log.write(f"gpu_check {'--smoke ' if args.smoke else ''}budget {budget:.0f} s, {time.ctime()}\n")
        # the generated 200-class set shared by train, data and cli (made once; its time counts)
        from seal_fast.data.synthetic import ensure_synthetic  # noqa: E402  (light: numpy + PIL)

        os.environ["SEAL_FAST_CACHE"] = env["SEAL_FAST_CACHE"]
        t = time.perf_counter()
        classes, per_class, val_per_class = (10, 8, 2) if args.smoke else (200, 50, 10)  # = bench_train's set
        data_dir = ensure_synthetic(num_classes=classes, train_per_class=per_class, val_per_class=val_per_class,
                                    size=64)[0]
        log.write(f"data: {data_dir} ({time.perf_counter() - t:.1f} s)\n")
        native_dir = scratch / "native"
        steps = plan(args.smoke, data_dir, scratch / "cli-run", native_dir)
        if args.only:
            steps = [s for s in steps if s.name == "env" or s.name in args.only]
        for s in steps:
            remaining = left()
            if remaining < 10:
                s.why = f"budget spent ({budget:.0f} s)"
                continue
            run_step(s, min(s.cap_s * max(scale, 1.0) if not args.smoke else s.cap_s, remaining - 5), log, env,
                     results_dir)
            if s.name == "native":  # the later steps load this build (and, if it failed, skip, never rebuild)
                env["SEAL_FAST_CUDA_LIB"] = str(native_dir / "lib" / "libseal_fast_cuda.so")
    env_info: dict = {}
    for line in steps[0].output.splitlines():  # the env step's one JSON line
        if line.startswith("{"):
            env_info = json.loads(line)
            break
    from bench.utils import environment

    e = environment()
    env_info.update(date=e["date"], commit=os.environ.get("SEAL_FAST_COMMIT") or e["commit"])
    if "gpu" not in env_info:
        env_info["gpu"] = e["device"]
    for s in steps:
        if s.name == "cli" and s.status == "ok":
            s.rows = cli_rows(scratch / "cli-run")
    pytest_step = next((s for s in steps if s.name == "pytest"), None)
    if pytest_step and pytest_step.status != "not run":
        (out / "pytest.txt").write_text(pytest_step.output)
        pytest_step.why = (pytest_step.why + "; " if pytest_step.why else "") + pytest_counts(pytest_step.output)
    profiles = sorted(p for p in results_dir.glob("train_profile_*.txt") if p.stat().st_mtime >= started_at)
    if profiles:
        (out / "profile.txt").write_text("\n\n".join(p.read_text() for p in profiles))
    write_results(out, steps, env_info)
    write_summary(out, steps, env_info, budget, time.perf_counter() - start, args.smoke)
    shutil.rmtree(scratch, ignore_errors=True)
    print((out / "summary.md").read_text())
    bad = [s.name for s in steps if s.status in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
