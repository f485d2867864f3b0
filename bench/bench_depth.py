"""End-to-end prediction-depth study: every probe of one ResNet-50 checkpoint, Tiny-ImageNet's sizes.

    python bench/bench_depth.py [--checkpoint PT] [--train 100000] [--val 10000] [--k 30] [--features pooled]

Times seal_fast.studies.depth.Study.run (forward passes for the queries and the streamed training set, the fused
KNN per probe, votes, depths) on images held in device memory like the cache loader's (random pixels in
the real shapes, so decoding is out of the figure and the time is the study's). Without --checkpoint the
network has the recipe's random init: the time does not depend on the weights. Target on an H100: all
probes of 10,000 val x 100,000 train in under a minute. Rows go to bench/results/depth.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.utils import append_rows, environment, print_table  # noqa: E402
from seal_fast.data.images import normalize  # noqa: E402
from seal_fast.studies.depth import Study  # noqa: E402
from seal_fast.studies.features import load_model  # noqa: E402
from seal_fast.models import build_model, probe_names  # noqa: E402


class DeviceImages:
    """`epoch(e)` yields (normalized images, labels) from uint8 images held on the device, in order."""

    def __init__(self, n: int, classes: int, batch: int, device: torch.device, channels_last: bool, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, device=device, generator=g)
        self.labels = torch.randint(0, classes, (n,), device=device, generator=g)
        self.batch, self.device, self.channels_last = batch, device, channels_last

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def epoch(self, e: int):
        for lo in range(0, len(self.labels), self.batch):
            yield (normalize(self.images[lo:lo + self.batch], self.device, self.channels_last),
                   self.labels[lo:lo + self.batch])


class Loaders:
    def __init__(self, train, val, classes):
        self.train, self.val, self.classes = train, val, classes


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a last.pt / best.pt (default: ResNet-50 with the recipe's random init)")
    p.add_argument("--train", type=int, default=100_000 if cuda else 2_000)
    p.add_argument("--val", type=int, default=10_000 if cuda else 200)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--features", choices=("pooled", "flat"), default="pooled")
    p.add_argument("--batch", type=int, default=512 if cuda else 100)
    p.add_argument("--arch", default="resnet50" if cuda else "resnet10", help="when no --checkpoint is given")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    env = environment()
    if args.checkpoint:
        model, _, label = load_model(args.checkpoint, device, channels_last=cuda)
    else:
        torch.manual_seed(0)
        model = build_model(args.arch, args.classes).to(device).eval()
        model = model.to(memory_format=torch.channels_last) if cuda else model
        label = f"{args.arch} (random init)"
    classes = [str(i) for i in range(model.fc.out_features)]
    loaders = Loaders(DeviceImages(args.train, len(classes), args.batch, device, cuda, 0),
                      DeviceImages(args.val, len(classes), args.batch, device, cuda, 1), classes)
    budget = int(0.4 * torch.cuda.mem_get_info()[0]) if cuda else 2 * 10**9
    study = Study(loaders, device, args.k, args.features == "pooled", "val", "l2", amp=cuda, budget=budget,
                  say=print)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    r = study.run(args.checkpoint or "random", model, label)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    row = dict(env, bench="depth", model=label, probes=len(probe_names(model)), train=args.train, val=args.val,
               k=args.k, features=args.features, seconds=seconds,
               peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else "",
               note="" if cuda else "CPU, reduced sizes; the PyTorch KNN reference (no Triton without CUDA)")
    print_table([row], ["model", "probes", "train", "val", "k", "features", "seconds", "peak_mem_gb", "note"])
    path = append_rows("depth", [row])
    print(f"appended 1 row to {path}")
    del r


if __name__ == "__main__":
    main()
