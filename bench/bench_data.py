"""Images per second of each loader (torch, cache, dali), train and val, at batch 32 and 256.

    python bench/bench_data.py [--data /path/to/tiny-imagenet-200] [--seconds 3] [--workers N]

Without --data it uses the built-in synthetic set (64x64 JPEGs in the Tiny-ImageNet layout). Each
figure is the throughput of full passes over the split after one warm-up pass, timed until at least
--seconds have passed, with the device synchronized at the end; at batch 32 the time per batch (us)
is the loader's per-batch overhead, to compare with the trainer's step time. Rows go to
bench/results/data.csv with the CPU count and the device. Targets on an H100 machine (16 CPU cores):
DALI >= 30,000 train images/s at batch 256; the cache >= 1,000,000 images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.utils import append_rows, environment, print_table  # noqa: E402
from seal_fast.data import build_loaders  # noqa: E402
from seal_fast.data.dali_loader import dali_available  # noqa: E402
from seal_fast.data.synthetic import ensure_synthetic  # noqa: E402


def throughput(loader, seconds: float, device: torch.device) -> tuple[float, int]:
    """(images per second, images) over whole epochs, after one warm-up epoch."""
    for _ in loader.epoch(0):
        pass
    images, epoch = 0, 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while True:
        for x, _ in loader.epoch(epoch):
            images += x.shape[0]
        epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return images / elapsed, images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a tiny-imagenet-200 folder (default: the built-in synthetic set)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per figure")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch DataLoader workers / DALI threads / cache decode threads")
    ap.add_argument("--loaders", default="torch,cache,dali", help="comma-separated subset")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = args.data or str(ensure_synthetic()[0])
    env = environment()
    print(f"{env['device']} | {os.cpu_count()} CPU cores | torch {env['torch']} | data {root}")
    rows = []
    for kind in args.loaders.split(","):
        if kind == "dali" and not dali_available():
            print("dali: not installed here; skipped (pip install nvidia-dali-cuda130)")
            continue
        for batch in (32, 256):
            ld = build_loaders(root, batch, seed=0, workers=args.workers, device=device, kind=kind,
                               eval_batch_size=batch)
            for split in ("train", "val"):
                ips, n = throughput(getattr(ld, split), args.seconds, device)
                rows.append(dict(env, bench="data", loader=kind, split=split, batch=batch, images_per_s=ips,
                                 us_per_batch=batch / ips * 1e6, images=n, workers=args.workers,
                                 cpu_cores=os.cpu_count(), data="synthetic" if args.data is None else root))
            del ld
    print_table(rows, ["loader", "split", "batch", "images_per_s", "us_per_batch", "images"])
    if device.type == "cuda":
        print("targets (H100 machine): dali >= 30,000 train images/s at batch 256; cache >= 1,000,000 images/s")
    else:
        print("no CUDA: the targets (H100 machine) are not evaluated here; the GPU figures remain to be measured")
    if not args.no_save and rows:
        print(f"appended {len(rows)} rows to {append_rows('data', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
