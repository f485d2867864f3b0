"""Packed runs on one GPU: aggregate and per-run images/s of K training processes sharing it, and the paper's table.

    python bench/bench_pack.py --k 1 2 4 8 --mps off on --seconds S [--csv PATH] [--batch 32]

For each K and MPS mode, K processes each train ResNet-50 at 64x64 (200 classes, bf16 autocast, channels-last,
the fused SignedSGD, the step replayed as a CUDA graph: the trainer's own TrainStep) on synthetic batches that
live on the GPU, each capped at 0.95/K of its memory as `sweep --runs-per-gpu K` caps them. Each warms up, waits
until all K are warm, then counts steps for S seconds. A row per (K, mode): the aggregate images/s (summed over
the K runs), each run's, the gain over K = 1 of the same mode, and the hours of the paper's table this implies
(14,880 epochs x 100,000 images, training steps only). `--mps on` runs NVIDIA's MPS daemon for the K processes
(its folders in a temporary folder, stopped after); where it is absent or refuses, one line and that mode is
skipped. Rows are appended to bench/results/pack.csv (or --csv); `sweep --dry-run --runs-per-gpu K` reads them.
Without CUDA: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.utils import RESULTS, append_rows, environment, print_table  # noqa: E402

TABLE_IMAGES = 14_880 * 100_000  # the paper's Table 2, 3 seeds: 4 run kinds x 3 seeds = 14,880 epochs
WARMUP_STEPS = 30


def worker(batch: int, k: int, seconds: float, ready: Path) -> None:
    """One packed run: build, warm up (graph captured), say ready, wait for the others, count steps."""
    from seal_fast.config import Config
    from seal_fast.models import build_model
    from seal_fast.schedule import build_plan
    from seal_fast.step import TrainStep
    from seal_fast.train import apply_entry, make_optimizer

    torch.cuda.set_per_process_memory_fraction(round(0.95 / k, 4))
    torch.manual_seed(0)
    model = build_model("resnet50", 200).cuda().to(memory_format=torch.channels_last)
    cfg = Config(method="seal")
    plan = build_plan(cfg, [n for n, _ in model.named_parameters()])
    opt = make_optimizer(model, plan[0], cfg)
    apply_entry(opt, plan[0])
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, torch.bfloat16, graphed=True)
    x = torch.randn(batch, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (batch,), device="cuda")
    for _ in range(WARMUP_STEPS):
        step(x, y)
    torch.cuda.synchronize()
    (ready / f"{os.getpid()}").touch()
    while len(list(ready.iterdir())) < k:
        time.sleep(0.01)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            step(x, y)
        n += 10
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"images_per_s": n * batch / dt, "graphed": bool(step.enabled)}), flush=True)


def measure(k: int, mps_env: dict, batch: int, seconds: float) -> list[dict] | str:
    """K workers at once: each one's result, or why they failed."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp)
        cmd = [sys.executable, __file__, "--worker", "--batch", str(batch), "--k", str(k), "--seconds",
               str(seconds), "--ready", str(ready)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), **mps_env)
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(k)]
        outs = [p.communicate() for p in procs]
    bad = [err.strip().splitlines()[-1:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    if bad:
        return f"{len(bad)} of {k} runs failed: {(bad[0] or ['?'])[0]}"
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def mps_context(mode: str, folder: Path):
    from seal_fast.runs.packing import MPS

    mps = MPS(folder)
    if mode == "on" and not mps.start():
        return None
    return mps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="runs packed on the GPU (default 1 2 4 8)")
    p.add_argument("--mps", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="without and / or with NVIDIA's MPS daemon (default: both)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per K, after warm-up (default 20)")
    p.add_argument("--batch", type=int, default=32, help="batch size of each run (default 32, the paper's)")
    p.add_argument("--csv", type=Path, help="CSV the rows are appended to (default bench/results/pack.csv)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.batch, args.k[0], args.seconds, args.ready)
        return 0
    if not torch.cuda.is_available():
        print("bench_pack: no CUDA device here; packed runs are measured on a GPU", file=sys.stderr)
        return 2
    if min(args.k) < 1 or args.seconds <= 0 or args.batch < 1:
        print("bench_pack: --k, --seconds and --batch must be positive", file=sys.stderr)
        return 2
    env = environment()
    rows = []
    columns = ["k", "mps", "aggregate_images_per_s", "per_run_images_per_s", "gain_vs_k1", "table_hours"]
    for mode in args.mps:
        with tempfile.TemporaryDirectory() as tmp:
            mps = mps_context(mode, Path(tmp))
            if mps is None:
                continue  # its one line is printed
            try:
                base = None
                for k in sorted(args.k):
                    res = measure(k, mps.env, args.batch, args.seconds)
                    if isinstance(res, str):
                        print(f"K={k} mps {mode}: {res}", flush=True)
                        continue
                    agg = sum(r["images_per_s"] for r in res)
                    base = agg if k == 1 else base
                    row = dict(env, bench="pack", batch=args.batch, k=k, mps=mode, seconds=args.seconds,
                               graphed=all(r["graphed"] for r in res), aggregate_images_per_s=agg,
                               per_run_images_per_s=" ".join(f"{r['images_per_s']:.0f}" for r in res),
                               gain_vs_k1=agg / base if base else "", table_hours=TABLE_IMAGES / agg / 3600)
                    rows.append(row)
                    write(args.csv, row)  # each row as soon as measured: a time-boxed run keeps it
                    print_table([row], columns)
            finally:
                mps.stop()
    if rows:
        print_table(rows, columns)
    print(f"{len(rows)} rows to {args.csv or RESULTS / 'pack.csv'} ({env['device']})")
    return 0


def write(csv_path: Path | None, row: dict) -> None:
    if csv_path is None:
        append_rows("pack", [row])
        return
    import bench.utils as u

    old, u.RESULTS = u.RESULTS, csv_path.parent
    try:
        u.append_rows(csv_path.stem, [row])
    finally:
        u.RESULTS = old


if __name__ == "__main__":
    sys.exit(main())
