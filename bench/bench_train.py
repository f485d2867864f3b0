"""The whole training step, and what it means for the 1,600-epoch SEAL schedule.

    python bench/bench_train.py [--data DIR] [--batch 32 256] [--epochs 3] [--profile]

Two setups, both through the trainer itself (seal_fast.train.Trainer), on ResNet-50 at 64x64:
  reference  what the published code does: eager fp32, NCHW, torch.optim.SGD (foreach=False), the torch
             DataLoader with PIL decoding
  ours       bf16 autocast, channels-last, the fused SignedSGD, the fastest loader (--loader auto), and the
             step replayed as a CUDA graph on a GPU
Each setup trains one warm-up epoch, then --epochs timed epochs of the generated set (200 classes in the
Tiny-ImageNet layout; --data for the real one); ms per step is the median over the timed epochs of
(epoch wall time / steps), loader included, device synchronized. Evaluation (the val split) and one
checkpoint are timed too (the snapshot the training waits for, and the write that runs on a thread).
Projection for the full SEAL schedule on Tiny-ImageNet (100,000 train / 10,000 val images): 1,600 x
(100,000 / batch steps) + the plan's evaluation epochs x the val pass + 1,600 checkpoint snapshots (plus
any write time beyond an epoch). Rows go to bench/results/train.csv; with --profile (CUDA) the top kernels of a few
steps of `ours` go to bench/results/train_profile_<batch>.txt with the GPU's busy share of the wall time.

Without CUDA the defaults shrink (2 images per class, 1 timed epoch, batch 32): CPU figures say how the
code runs there, nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.utils import RESULTS, append_rows, environment, print_table  # noqa: E402
from seal_fast import checkpoint  # noqa: E402
from seal_fast.config import Config  # noqa: E402
from seal_fast.schedule import build_plan  # noqa: E402
from seal_fast.train import Trainer, apply_entry  # noqa: E402

SETUPS = {
    "reference": dict(amp=False, channels_last=False, optimizer="torch", loader="torch", cuda_graph="off"),
    "ours": dict(amp=True, channels_last=True, optimizer="signed", loader="auto", cuda_graph="auto"),
}
REAL_TRAIN, REAL_VAL = 100_000, 10_000


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(root: str, setup: str, batch: int, epochs: int, workers: int, out: Path) -> dict:
    t0 = time.perf_counter()
    phases = []

    def phase(name):  # where the bench's own time goes, printed as it goes (a killed run still says)
        phases.append(f"{name} {time.perf_counter() - t0:.1f} s")
        print(f"  {setup} batch {batch}: {phases[-1]}", flush=True)

    cfg = Config(data=root, arch="resnet50", batch_size=batch, workers=workers, **SETUPS[setup])
    tr = Trainer(cfg, out, say=lambda m: None)
    phase("built")
    if setup == "reference":  # the published code's optimizer: torch.optim.SGD's default for-loop
        for g in tr.optimizer.param_groups:
            g["foreach"] = False
    plan = tr.plan
    apply_entry(tr.optimizer, plan[0])
    tr.train_epoch(plan[0])                                        # warm-up: cuDNN, graph capture, caches
    sync(tr.device)
    phase("warm-up epoch")
    steps = len(tr.loaders.train)
    per_step = []
    for e in range(1, epochs + 1):
        sync(tr.device)
        t = time.perf_counter()
        tr.train_epoch(plan[e])
        sync(tr.device)
        per_step.append((time.perf_counter() - t) / steps * 1e3)
    phase(f"{epochs} timed epoch(s)")
    tr.evaluate()                                                  # warm-up (the eval graph)
    sync(tr.device)
    t = time.perf_counter()
    tr.evaluate()
    sync(tr.device)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    state = checkpoint.snapshot(tr.state().to_dict())   # the part of a save the training waits for
    snap_s = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint.save(state, out / "last.pt")   # written on a thread behind the next epoch
    write_s = time.perf_counter() - t
    phase("evaluation and checkpoint")
    ms = statistics.median(per_step)
    n_eval = sum(e.evaluate for e in build_plan(Config(method="seal")))
    per_image_eval = eval_s / tr.loaders.val.num_images
    epoch_s = REAL_TRAIN / batch * ms / 1e3
    save_s = snap_s + max(0.0, write_s - epoch_s)  # the write only costs time if it outlasts an epoch
    total_h = (1600 * epoch_s + n_eval * per_image_eval * REAL_VAL + 1600 * save_s) / 3600
    row = dict(setup=setup, batch=batch, loader=tr.loaders.kind, graphed=tr.graphed, steps_timed=steps * epochs,
               ms_per_step=ms, images_per_s=batch / ms * 1e3, tiny_epoch_s=epoch_s,
               tiny_epoch_with_eval_s=epoch_s + per_image_eval * REAL_VAL / 2 + save_s,
               eval_images_per_s=1 / per_image_eval, checkpoint_snapshot_s=snap_s, checkpoint_write_s=write_s,
               seal_schedule_hours=total_h)
    return row, tr


def profile(tr, batch: int, env: dict) -> Path:
    """Top CUDA kernels of 20 training steps and the GPU's busy share of their wall time."""
    from torch.profiler import ProfilerActivity, profile as prof

    batches = [b for _, b in zip(range(20), tr.loaders.train.epoch(99))]
    sync(tr.device)
    t = time.perf_counter()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for x, y in batches:
            tr.train_step(x, y)
        sync(tr.device)
    wall = time.perf_counter() - t
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in p.key_averages())
    table = p.key_averages().table(sort_by="self_device_time_total", row_limit=15)
    path = RESULTS / f"train_profile_{batch}.txt"
    path.write_text(f"# {env['device']} torch {env['torch']} commit {env['commit']} {env['date']}\n"
                    f"# 20 steps of `ours` at batch {batch} (graphed: {tr.graphed}); wall {wall * 1e3:.1f} ms, "
                    f"GPU kernels busy {busy_us / 1e3:.1f} ms = {100 * busy_us / 1e6 / wall:.0f}% of the wall time "
                    f"(with the loader's batches prefetched into a list)\n{table}\n")
    return path


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="tiny-imagenet-200 folder (default: a generated 200-class set)")
    p.add_argument("--per-class", type=int, default=50 if cuda else 2, help="generated train images per class")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 256] if cuda else [32])
    p.add_argument("--epochs", type=int, default=3 if cuda else 1, help="timed epochs per setup")
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--workers", type=int, default=-1, help="loader workers (default: from the CPU count)")
    p.add_argument("--profile", action="store_true", help="(CUDA) profile `ours` and list the top kernels")
    args = p.parse_args()
    env = environment()
    root = args.data
    if root is None:
        from seal_fast.data.synthetic import ensure_synthetic

        root = str(ensure_synthetic(num_classes=200, train_per_class=args.per_class,
                                    val_per_class=max(1, args.per_class // 5), size=64)[0])
    rows, columns = [], ["setup", "batch", "loader", "graphed", "ms_per_step", "images_per_s",
                         "tiny_epoch_with_eval_s", "checkpoint_write_s", "seal_schedule_hours", "speedup_vs_reference"]
    for batch in args.batch:
        by_setup = {}
        for setup in args.setups:
            with tempfile.TemporaryDirectory() as tmp:
                row, tr = measure(root, setup, batch, args.epochs, args.workers, Path(tmp))
                by_setup[setup] = row
                row = dict(env, bench="train", data=root, **row)
                if setup == "ours" and "reference" in by_setup:
                    row["speedup_vs_reference"] = by_setup["reference"]["ms_per_step"] / row["ms_per_step"]
                # each row is written as soon as it is measured: a run stopped later (a time box) keeps it
                path = append_rows("train", [row])
                rows.append(row)
                print_table([row], columns)
                if args.profile and cuda and setup == "ours":
                    print(f"profile: {profile(tr, batch, env)}", flush=True)
                del tr
    print_table(rows, columns)
    print(f"appended {len(rows)} rows to {path} ({env['device']}, torch {env['torch']})")


if __name__ == "__main__":
    main()
