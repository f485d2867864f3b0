"""`python -m seal_fast depth`: KNN probes after every ResNet block and each sample's prediction depth.

Probes (Baldock et al. 2021, as the SEAL paper uses them): k-NN classifiers (k = 30) fitted on the
training set's embeddings after the input, the stem and every residual block ("block.X.Y" = output of
block Y of stage X; 16 for ResNet-50), plus the network's own final prediction as the last probe.
A sample's prediction depth is the smallest probe index l such that the probes at l and at every
later probe agree with the network's final prediction (not the label); it lies in 0..P, where P is
the number of KNN probes (depth P: only the final layer predicts it).

Streaming: the query embeddings of a group of probes are held (their size is bounded by --memory-gb);
the training set then streams through the network in chunks, each chunk is searched with the fused
KNN kernel (kernels/knn.py) and merged into every query's running k nearest. No probe ever needs all
of the training embeddings, nor all layers at once. The network only runs up to the deepest probe of a group.

Outputs in --out: depth.json (per checkpoint: probes with KNN accuracy, network accuracy, depth
histogram), probe_accuracy.csv, depth_per_sample.csv, probe_accuracy.png (the paper's Figure 2: one
line per checkpoint) and depth_histogram.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from seal_fast.kernels.knn import empty_topk, knn_topk, merge_topk, vote

from .. import checkpoint
from ..errors import ConfigError, DataError
from .features import load_model
from ..models import forward_probes, probe_names
from ..precision import amp_dtype
from ..files import write_whole, written_whole
from ..runtime import default_workers, free_memory, pick_device
from .command import open_output, report_written, require_checkpoints, study_main, study_parser

# ----------------------------------------------------------------------------------------------
# Probes on the model
# ----------------------------------------------------------------------------------------------


def prediction_depth(knn_preds: torch.Tensor, final_pred: torch.Tensor) -> torch.Tensor:
    """knn_preds [P, S] (probe by probe, input first), final_pred [S] -> depth [S] in 0..P: the smallest l such that
    probes l..P-1 all predict final_pred (P when the last probe already disagrees)."""
    agree = (knn_preds == final_pred[None, :]).to(torch.int64)
    all_after = agree.flip(0).cumprod(0).flip(0)  # all_after[l] = 1 iff probes l..P-1 all agree
    return knn_preds.shape[0] - all_after.sum(0)


# ----------------------------------------------------------------------------------------------
# Planning: which probes share a pass, how many support rows per KNN call
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    probes: list[str]
    lo: int                # query rows [lo, hi) of this job
    hi: int
    chunk: int = 0         # support rows per KNN call


def plan_jobs(dims: dict[str, int], probes: list[str], queries: int, support: int, elt: int, budget: int,
              batch: int) -> list[Job]:
    """Group probes so that one group's query embeddings fit in half the budget; a probe too large alone is split
    into query slices. The other half holds one chunk of support embeddings per probe of the group."""
    half = budget // 2
    jobs: list[Job] = []
    group: list[str] = []
    used = 0
    for name in probes:
        size = queries * dims[name] * elt
        if size > half:
            if group:
                jobs.append(Job(group, 0, queries))
                group, used = [], 0
            rows = max(1, half // (dims[name] * elt))
            jobs += [Job([name], lo, min(queries, lo + rows)) for lo in range(0, queries, rows)]
        elif used + size > half:
            jobs.append(Job(group, 0, queries))
            group, used = [name], size
        else:
            group.append(name)
            used += size
    if group:
        jobs.append(Job(group, 0, queries))
    for job in jobs:
        per_row = sum(dims[n] for n in job.probes) * elt
        job.chunk = int(min(support, max(batch, half // per_row)))
    return jobs


# ----------------------------------------------------------------------------------------------
# One checkpoint
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    path: str
    label: str
    probes: list[str]
    knn_acc: dict[str, float]
    final_acc: float
    depth: torch.Tensor
    final_pred: torch.Tensor
    labels: torch.Tensor
    knn_preds: torch.Tensor  # [P, S]: each probe's KNN class per sample
    dims: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Study:
    def __init__(self, loaders, device: torch.device, k: int, pooled: bool, split: str, metric: str, amp: bool,
                 budget: int, say):
        self.loaders, self.device, self.k, self.pooled, self.split = loaders, device, k, pooled, split
        self.metric, self.amp, self.budget, self.say = metric, amp, budget, say
        self.num_classes = len(loaders.classes)
        self.support_labels = None
        self._nonfinite: dict[str, torch.Tensor] = {}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _batches(self, loader, desc: str):
        total = len(loader)
        return tqdm(loader.epoch(0), total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True,
                    file=sys.stderr)

    def _forward(self, model, x, wanted):
        """Embeddings of a batch; non-finite values are flagged on the device (read once per pass, not per batch)."""
        with self._autocast():
            feats = forward_probes(model, x, wanted, self.pooled)
        for name, t in feats.items():
            bad = (~torch.isfinite(t)).any()
            self._nonfinite[name] = self._nonfinite[name] | bad if name in self._nonfinite else bad
        return feats

    def _check_finite(self) -> None:
        bad = [name for name, flag in self._nonfinite.items() if bool(flag)]
        self._nonfinite = {}
        if bad:
            raise DataError(f"the {', '.join(bad)} embeddings hold NaN or inf values: the checkpoint has diverged "
                            "weights; probe an earlier checkpoint")

    def run(self, path: str, model, label: str) -> Result:
        t0 = time.perf_counter()
        query_loader = self.loaders.val if self.split == "val" else self.loaders.train
        support_loader = self.loaders.train
        q_count, n_count = query_loader.num_images, support_loader.num_images
        if self.k > n_count - (self.split == "train"):
            raise ConfigError(f"--k {self.k}: the training set has only {n_count} images"
                              f"{' (each query leaves itself out)' if self.split == 'train' else ''}; lower --k")
        probes = probe_names(model)
        x0, _ = next(iter(query_loader.epoch(0)))
        dims = {n: t.shape[1] for n, t in self._forward(model, x0[:2], set(probes)).items()}
        elt = 2 if self.amp else 4
        jobs = plan_jobs(dims, probes, q_count, n_count, elt, self.budget, batch=len(x0))
        self.say(f"{label}: {len(probes)} probes ({'pooled' if self.pooled else 'flattened'} embeddings, "
                 f"{min(dims.values())}-{max(dims.values())} dims), {q_count} {self.split} queries vs {n_count} train "
                 f"images, k = {self.k}, {len(jobs)} pass(es) over the training set")

        # the network's own prediction and the labels of the queries
        final, labels = [], []
        for x, y in self._batches(query_loader, "final predictions"):
            final.append(self._forward(model, x, {"output"})["output"].argmax(1))
            labels.append(y)
        final_pred, labels_q = torch.cat(final), torch.cat(labels)
        self._check_finite()

        preds = {}
        for j, job in enumerate(jobs):
            for n, part in self._job(model, job, query_loader, support_loader, dims, f"pass {j + 1}/{len(jobs)}"):
                preds.setdefault(n, []).append((job.lo, part))
        knn_preds = torch.stack([torch.cat([p for _, p in sorted(preds[n], key=lambda t: t[0])]) for n in probes])
        knn_acc = {n: float((knn_preds[i] == labels_q).float().mean()) for i, n in enumerate(probes)}
        depth = prediction_depth(knn_preds, final_pred)
        return Result(path, label, probes, knn_acc, float((final_pred == labels_q).float().mean()), depth.cpu(),
                      final_pred.cpu(), labels_q.cpu(), knn_preds.cpu(), dims, time.perf_counter() - t0)

    def _job(self, model, job: Job, query_loader, support_loader, dims, desc) -> list[tuple[str, torch.Tensor]]:
        """The KNN class of queries [job.lo, job.hi) at each of the job's probes: [(probe, int64 [hi - lo])]."""
        wanted = set(job.probes)
        rows = job.hi - job.lo
        fdtype = torch.bfloat16 if self.amp else torch.float32
        qfeat = {n: torch.empty(rows, dims[n], dtype=fdtype, device=self.device) for n in job.probes}
        pos = 0
        for x, _ in query_loader.epoch(0):
            a, b = pos, pos + len(x)
            pos = b
            if b <= job.lo or a >= job.hi:
                continue
            feats = self._forward(model, x, wanted)
            lo, hi = max(a, job.lo), min(b, job.hi)
            for n in job.probes:
                qfeat[n][lo - job.lo:hi - job.lo] = feats[n][lo - a:hi - a]

        best = {n: empty_topk(rows, self.k, self.device) for n in job.probes}
        buf = {n: torch.empty(job.chunk, dims[n], dtype=fdtype, device=self.device) for n in job.probes}
        own = torch.arange(job.lo, job.hi, device=self.device)  # global index of each query (train split)
        state = {"fill": 0, "start": 0}
        labels = []

        def flush():
            fill, start = state["fill"], state["start"]
            if fill == 0:
                return
            exclude = (own - start) if self.split == "train" else None
            for n in job.probes:
                # pad: a short last chunk (or one holding the query itself) may have fewer than k candidates
                d, i = knn_topk(qfeat[n], buf[n][:fill], self.k, self.metric, exclude, pad=True)
                best[n] = merge_topk(best[n], (d, torch.where(i >= 0, i + start, i)), self.k)
            state["start"], state["fill"] = start + fill, 0

        for x, y in self._batches(support_loader, f"{desc}: {', '.join(job.probes[:3])}"
                                                  f"{'...' if len(job.probes) > 3 else ''}"):
            labels.append(y)
            feats = self._forward(model, x, wanted)
            at = 0
            while at < len(x):
                take = min(len(x) - at, job.chunk - state["fill"])
                for n in job.probes:
                    buf[n][state["fill"]:state["fill"] + take] = feats[n][at:at + take]
                state["fill"] += take
                at += take
                if state["fill"] == job.chunk:
                    flush()
        flush()
        self._check_finite()
        if self.support_labels is None:
            self.support_labels = torch.cat(labels)
        out = []
        for n in job.probes:
            idx = best[n][1]
            if (idx < 0).any():
                raise RuntimeError(f"probe {n}: fewer than k = {self.k} neighbours found")  # excluded by the k check
            out.append((n, vote(self.support_labels[idx], self.num_classes)))
        return out


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def summary(r: Result, k: int, split: str, features: str) -> dict:
    p = len(r.probes)
    hist = torch.bincount(r.depth, minlength=p + 1).tolist()
    return {"checkpoint": r.path, "label": r.label, "split": split, "k": k, "features": features,
            "probes": [{"name": n, "index": i, "dim": r.dims.get(n), "knn_acc": r.knn_acc[n]}
                       for i, n in enumerate(r.probes)] + [{"name": "output", "index": p, "dim": None,
                                                            "knn_acc": None, "network_acc": r.final_acc}],
            "network_acc": r.final_acc, "samples": len(r.depth), "mean_depth": float(r.depth.float().mean()),
            "depth_histogram": hist, "seconds": r.seconds}


def write_outputs(out: Path, results: list[Result], args) -> list[Path]:
    from ..plots import plot_depth_histogram, plot_probe_accuracy

    rows = [summary(r, args.k, args.split, args.features) for r in results]
    write_whole(out / "depth.json", json.dumps({"created": datetime.now().isoformat(timespec="seconds"),
                                                "results": rows}, indent=2))
    with written_whole(out / "probe_accuracy.csv") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "label", "probe_index", "probe", "dim", "knn_acc"])
        for r in results:
            for i, n in enumerate(r.probes):
                w.writerow([r.path, r.label, i, n, r.dims.get(n), f"{r.knn_acc[n]:.6f}"])
            w.writerow([r.path, r.label, len(r.probes), "output", "", f"{r.final_acc:.6f}"])
    with written_whole(out / "depth_per_sample.csv") as f:
        w = csv.writer(f)
        w.writerow(["sample", "label"] + [c for i in range(len(results)) for c in (f"prediction_{i}", f"depth_{i}")])
        for s in range(len(results[0].depth)):
            w.writerow([s, int(results[0].labels[s])] +
                       [v for r in results for v in (int(r.final_pred[s]), int(r.depth[s]))])
    plot_probe_accuracy(rows, out / "probe_accuracy.png")
    plot_depth_histogram(rows, out / "depth_histogram.png")
    return [out / n for n in ("depth.json", "probe_accuracy.csv", "depth_per_sample.csv", "probe_accuracy.png",
                              "depth_histogram.png")]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = study_parser("depth", "Per-layer KNN-probe accuracy and prediction depth of trained checkpoints.")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PT",
                   help="one or more last.pt / best.pt files (one line each in the plot)")
    p.add_argument("--data", metavar="DIR",
                   help="tiny-imagenet-200 folder (default: the checkpoint's own --data, else the built-in synthetic set)")
    p.add_argument("--k", type=int, default=30, help="neighbours per KNN probe (default 30, Baldock et al.)")
    p.add_argument("--features", choices=("pooled", "flat"), default="pooled",
                   help="pooled: global-average-pooled channels (default); flat: the whole flattened map")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="samples to probe; the support is always the training set (train: each leaves itself out)")
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2", help="KNN distance (default l2)")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/depth-<timestamp>)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--memory-gb", type=float,
                   help="memory for embeddings (default: 40%% of free GPU memory, or 25%% of free RAM on the CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run: auto (a GPU when one is visible), cpu or cuda (default auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bf16 forward and embeddings (default: on with CUDA)")
    p.add_argument("--workers", type=int, default=-1, help="data-loader workers (default: from the CPU count)")
    p.add_argument("--loader", choices=("auto", "torch", "cache"), default="auto",
                   help="how images are read: cache (decoded once, held in memory), torch (a DataLoader), "
                        "auto (the cache where it fits; both give the same batches)")
    checkpoint.add_trust_flag(p)
    return p


def _budget(args, device: torch.device) -> int:
    if args.memory_gb is not None:
        if args.memory_gb <= 0:
            raise ConfigError("--memory-gb must be positive")
        return int(args.memory_gb * 1e9)
    return int((0.4 if device.type == "cuda" else 0.25) * free_memory(device))


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    if not 1 <= args.k <= 256:
        raise ConfigError(f"--k {args.k}: choose 1 to 256 neighbours")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    device = pick_device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    if amp and device.type == "cpu":  # bf16 on a CPU only where it is native (precision.py)
        dtype, why = amp_dtype(device, True)
        if dtype is None:
            amp = False
            say(why)
    require_checkpoints(args.checkpoint)
    out = open_output(args.out, "depth")

    models = [load_model(p, device, channels_last=device.type == "cuda", trust=args.trust_checkpoint)
              for p in args.checkpoint]
    root = args.data or models[0][1].get("data")
    if root is None:
        from ..data.synthetic import ensure_synthetic

        root = str(ensure_synthetic()[0])
        say(f"no --data given and the checkpoint trained on the built-in synthetic set: probing it ({root})")
    from ..data import build_eval_loaders

    workers = default_workers(args.workers)
    loaders = build_eval_loaders(root, args.batch_size, workers, device, channels_last=device.type == "cuda",
                                 kind=args.loader, progress=True)
    for (model, _, label), path in zip(models, args.checkpoint):
        if model.fc.out_features != len(loaders.classes):
            raise DataError(f"{path} predicts {model.fc.out_features} classes but {root} has {len(loaders.classes)}; "
                            "pass the --data the checkpoint was trained on")
    study = Study(loaders, device, args.k, args.features == "pooled", args.split, args.metric, amp,
                  _budget(args, device), say)
    results = []
    for (model, _, label), path in zip(models, args.checkpoint):
        r = study.run(path, model, label)
        results.append(r)
        best = max(r.knn_acc, key=r.knn_acc.get)
        say(f"{label}: network top-1 {100 * r.final_acc:.1f}%, best probe {best} {100 * r.knn_acc[best]:.1f}%, "
            f"mean prediction depth {r.depth.float().mean():.2f} of {len(r.probes)}, {r.seconds:.1f} s")
    written = write_outputs(out, results, args)
    report_written(written)
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
