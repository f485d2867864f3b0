"""`python -m seal_fast fewshot`: episodic few-shot evaluation of a frozen backbone, the BSCD-FSL protocol (Guo et al.
2020) that the SEAL paper's 20-shot table follows (EuroSAT, CropDisease).

The protocol, every choice of it (also written into fewshot.json under "protocol"):
- Data: every image of the dataset (BSCD-FSL uses whole sets as novel classes): EuroSAT through
  torchvision.datasets.EuroSAT (RGB), CropDisease as BSCD-FSL reads it (ImageFolder of dataset/train/), any other
  set as an ImageFolder. A class with fewer than shots + queries images cannot fill an episode and is left out
  (said in the output).
- Episodes: --ways 5 classes drawn uniformly without replacement, then --shots (default 20; 1 and 5 too) support
  and --queries 15 query images per class, without replacement, --episodes 600 of them. They are drawn by numpy's
  PCG64 from SeedSequence([--seed, ways, shots, queries]) and depend only on that seed and the dataset's labels,
  so every checkpoint sees the same episodes (a paired comparison: the table also gives each checkpoint's
  difference to the first one, per episode, with its own interval); their sha1 is in the JSON.
- Images: BSCD-FSL's test transform at --image-size S: both sides resized to int(1.15 S) (--resize), center crop
  S, ImageNet mean / std. Default S = 64 (the pre-training resolution: 73 -> 64); --image-size 224 is BSCD-FSL's
  own (257 -> 224).
- Backbone: frozen, eval mode; features are the global-average-pooled output of the last residual block (fc's
  input), extracted once per checkpoint x dataset x transform and cached (features.py), bf16 autocast where bf16
  is native, else fp32, kept in fp32.
- Head, per episode (--head; fewshot_heads.py). logreg, the default: the transfer probe's head. The episode's
  features are standardized with its support set's per-dimension mean and standard deviation (a dimension constant
  on the support keeps scale 1), then a multinomial logistic regression with a bias per class is fitted on the
  support: objective mean cross-entropy + (l2 / 2) ||W||^2, bias unpenalized, l2 = 1 / (ways * shots) by default
  (--l2). That is scikit-learn's make_pipeline(StandardScaler(), LogisticRegression()) with its defaults (C = 1),
  solved to the optimum (largest gradient entry <= 1e-6) by Newton's method in float64, all episodes of a chunk at
  once (transfer_probe.fit_logreg, exact in an orthonormal basis of each support's span; about 10 iterations):
  deterministic, no learning rate, epochs or batch order, and no hyper-parameter tuned on query labels.
  bscd: BSCD-FSL's own head as their finetune.py trains it (IBM/cdfsl-benchmark @5cfa669): a fresh nn.Linear with
  PyTorch's default init per episode on the raw features, SGD lr 0.01 / momentum 0.9 / dampening 0.9 / weight decay
  0.001, 100 epochs of batches of 4 in np.random.permutation order, cross-entropy; --head-seed (default 10, their
  np.random.seed(10)) seeds the batch orders and the inits.
- Reported: mean query accuracy over episodes (%) and the 95% confidence interval 1.96 * std / sqrt(episodes),
  with numpy's population std (ddof 0), exactly as BSCD-FSL computes it.

Outputs in --out: fewshot.json (protocol + one result per checkpoint x dataset x shots, with every episode's
accuracy), fewshot.csv and table.md (checkpoints x dataset / shots, "mean +- interval", the paper's numbers
beside it). Earlier results in --out for other checkpoints / datasets / shots are kept.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..files import write_whole, written_whole
from ..runtime import default_workers
from .command import open_output, report_written, study_main, study_parser
from .features import add_extraction_args
from .fewshot_heads import BSCD, HEADS, bscd_chunk, bscd_episode_accuracies, episode_accuracies, episode_chunk

PRETRAIN_SIZE = 64
PAPER_20SHOT = {"normal": {"EuroSAT": "81.52", "CropDisease": "87.43"},
                "SEAL": {"EuroSAT": "87.70 ± 0.52", "CropDisease": "95.67 ± 0.28"}}


def default_resize(size: int) -> int:
    return int(size * 1.15)  # BSCD-FSL's Scale: [int(image_size * 1.15)] * 2


# ----------------------------------------------------------------------------------------------
# Episodes and their statistics
# ----------------------------------------------------------------------------------------------


def eligible_classes(labels: torch.Tensor, need: int) -> tuple[list[int], list[int]]:
    """(classes with >= need images, classes with fewer), in label order."""
    counts = torch.bincount(labels.cpu()).tolist()
    ok = [c for c, n in enumerate(counts) if n >= need]
    return ok, [c for c, n in enumerate(counts) if 0 < n < need]


def sample_episodes(labels: torch.Tensor, ways: int, shots: int, queries: int, episodes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [E, ways, shots + queries] into the dataset: per class its support then its query images,
    classes [E, ways]). Depends only on (labels, ways, shots, queries, episodes, seed)."""
    labels = labels.cpu().numpy()
    ok, _ = eligible_classes(torch.from_numpy(labels), shots + queries)
    if len(ok) < ways:
        raise DataError(f"only {len(ok)} classes have {shots + queries} images (--shots {shots} + --queries "
                        f"{queries}); a {ways}-way episode needs {ways}: lower --ways, --shots or --queries")
    members = {c: np.flatnonzero(labels == c) for c in ok}
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, ways, shots, queries])))
    idx = np.empty((episodes, ways, shots + queries), dtype=np.int64)
    cls = np.empty((episodes, ways), dtype=np.int64)
    pool = np.asarray(ok)
    for e in range(episodes):
        cls[e] = rng.choice(pool, size=ways, replace=False)
        for w, c in enumerate(cls[e]):
            idx[e, w] = rng.choice(members[int(c)], size=shots + queries, replace=False)
    return torch.from_numpy(idx), torch.from_numpy(cls)


def episodes_sha1(idx: torch.Tensor) -> str:
    return hashlib.sha1(idx.numpy().astype("<i8").tobytes()).hexdigest()


def ci95(acc) -> float:
    """BSCD-FSL's interval: 1.96 * np.std(acc) / sqrt(len(acc)) (population std, ddof 0)."""
    acc = np.asarray(acc, dtype=np.float64)
    return float(1.96 * acc.std() / math.sqrt(len(acc)))


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ["checkpoint", "label", "method", "dataset", "image_size", "head", "ways", "shots", "queries", "episodes",
               "accuracy", "ci95", "paired_vs", "paired_diff", "paired_ci95"]


def row_key(r: dict) -> tuple:
    return (r["checkpoint"], r["dataset"], r["image_size"], r["resize"], r["ways"], r["shots"], r["queries"],
            r["episodes"], r["seed"], r.get("head", "logreg"), r.get("head_seed"))


def add_paired(rows: list[dict]) -> None:
    """Each row's per-episode difference to the first row of the same dataset / setting over the same episodes."""
    first = {}
    for r in rows:
        group = (r["dataset"], r["image_size"], r["resize"], r["episodes_sha1"], r.get("head", "logreg"),
                 r.get("head_seed"))
        if group not in first:
            first[group] = r
            r["paired"] = None
            continue
        ref = first[group]
        diff = np.asarray(r["accuracies"]) - np.asarray(ref["accuracies"])
        r["paired"] = {"vs": ref["label"], "diff": float(diff.mean()), "ci95": ci95(diff)}


def column(r: dict) -> str:
    size = "" if r["image_size"] == PRETRAIN_SIZE else f", {r['image_size']} px"
    head = "" if r.get("head", "logreg") == "logreg" else f", {r['head']} head"
    return f"{r['dataset']} {r['ways']}-way {r['shots']}-shot{size}{head}"


def table_md(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(column(r) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], column(r)): r for r in rows}
    title = ("# Few-shot (BSCD-FSL protocol, frozen backbone, a linear head per episode): query accuracy (%) "
             "± 95% interval")
    lines = [title, "", "| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for lab in labels:
        vals = [f"{cell[(lab, c)]['accuracy']:.2f} ± {cell[(lab, c)]['ci95']:.2f}" if (lab, c) in cell else ""
                for c in cols]
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
    paired = [r for r in rows if r.get("paired")]
    if paired:
        lines += ["", "Paired differences over the same episodes (this checkpoint minus the first one listed):", "",
                  "| checkpoint | setting | minus | difference ± 95% interval |", "|---|---|---|---:|"]
        for r in paired:
            lines.append(f"| {r['label']} | {column(r)} | {r['paired']['vs']} | "
                         f"{r['paired']['diff']:+.2f} ± {r['paired']['ci95']:.2f} |")
    lines += ["", "The paper's 20-shot table (5-way, 600 episodes, ResNet-50 trained on Tiny-ImageNet), for "
                  "comparison:", "", "| method | EuroSAT | CropDisease |", "|---|---:|---:|"]
    for method, vals in PAPER_20SHOT.items():
        lines.append(f"| {method} | {vals['EuroSAT']} | {vals['CropDisease']} |")
    lines += ["", ("Protocol: episodes drawn from a seed (the same for every checkpoint), BSCD-FSL's test transform; "
                   "head logreg (the default): pooled features standardized on each episode's support, logistic "
                   "regression (l2 = 1 / support size unless --l2) solved to the optimum per episode; head bscd: "
                   "BSCD-FSL's nn.Linear trained by 100 epochs of SGD on the raw features, as their finetune.py; "
                   "interval 1.96 * std / sqrt(episodes). Details: fewshot.json."), ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], protocol: dict) -> list[Path]:
    add_paired(rows)
    write_whole(out / "fewshot.json", json.dumps({"created": datetime.now().isoformat(timespec="seconds"),
                                                   "protocol": protocol, "results": rows}, indent=2))
    with written_whole(out / "fewshot.csv") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            p = r.get("paired") or {}
            w.writerow([r["checkpoint"], r["label"], r["method"], r["dataset"], r["image_size"],
                        r.get("head", "logreg"), r["ways"], r["shots"],
                        r["queries"], r["episodes"], f"{r['accuracy']:.2f}", f"{r['ci95']:.2f}", p.get("vs", ""),
                        f"{p['diff']:+.2f}" if p else "", f"{p['ci95']:.2f}" if p else ""])
    write_whole(out / "table.md", table_md(rows))
    return [out / n for n in ("fewshot.json", "fewshot.csv", "table.md")]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..data.folders import FEWSHOT_DATASETS

    p = study_parser("fewshot", "Episodic few-shot evaluation of frozen checkpoints (BSCD-FSL protocol).")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PT", help="last.pt / best.pt / gen<G>.pt files")
    p.add_argument("--dataset", nargs="+", required=True, metavar="NAME",
                   help=f"one or more of {', '.join(FEWSHOT_DATASETS)}, synthetic (a built-in demo set)")
    p.add_argument("--root", nargs="+", metavar="DIR",
                   help="each dataset's folder (one for all, or one per --dataset, in order)")
    p.add_argument("--name", nargs="+", metavar="NAME", help="column names for the datasets")
    p.add_argument("--download", action="store_true", help="let torchvision download eurosat")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/fewshot-<timestamp>)")
    p.add_argument("--ways", type=int, default=5, help="classes per episode (default 5)")
    p.add_argument("--shots", type=int, nargs="+", default=[20], help="support images per class (default 20; "
                                                                      "several: --shots 1 5 20)")
    p.add_argument("--queries", type=int, default=15, help="query images per class (default 15)")
    p.add_argument("--episodes", type=int, default=600, help="episodes (default 600)")
    p.add_argument("--seed", type=int, default=0, help="the episodes' seed (default 0)")
    p.add_argument("--head", choices=HEADS, default="logreg",
                   help="the linear head fitted per episode: logreg (the default: standardized features, logistic "
                        "regression solved exactly, no learning rate) or bscd (BSCD-FSL's own: nn.Linear trained "
                        "by 100 epochs of SGD, lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001, batches of "
                        "4, on the raw features, as their finetune.py)")
    p.add_argument("--head-seed", type=int, default=BSCD["seed"],
                   help="--head bscd: seeds the batch orders (numpy RandomState) and nn.Linear's init (a torch "
                        "Generator) (default 10, BSCD-FSL's np.random.seed(10))")
    p.add_argument("--l2", type=float, help="--head logreg: the l2 strength (default 1 / (ways * shots), i.e. "
                                            "scikit-learn's C = 1)")
    p.add_argument("--image-size", type=int, default=PRETRAIN_SIZE,
                   help="center-crop size (default 64, the pre-training resolution; BSCD-FSL's own is 224)")
    p.add_argument("--resize", type=int, help="both sides resized to this before the crop (default int(1.15 * size))")
    p.add_argument("--max-iter", type=int, default=100, help="--head logreg: Newton iterations per batch of "
                                                              "episodes at most (default 100; about 10 are needed)")
    p.add_argument("--tol", type=float, default=1e-6, help="--head logreg: stop when the largest gradient entry is "
                                                            "below this (default 1e-6)")
    add_extraction_args(p)
    return p


def check_args(args) -> None:
    from .transfer import check_common

    check_common(args)
    if args.ways < 2:
        raise ConfigError(f"--ways {args.ways}: an episode needs at least 2 classes")
    if min(args.shots) < 1 or args.queries < 1 or args.episodes < 1:
        raise ConfigError("--shots, --queries and --episodes must be at least 1")
    if args.l2 is not None and not (args.l2 > 0 and math.isfinite(args.l2)):
        raise ConfigError(f"--l2 {args.l2}: must be positive and finite")
    if args.l2 is not None and args.head != "logreg":
        raise ConfigError(f"--l2 is the logreg head's; --head {args.head} trains with BSCD-FSL's weight decay")
    if args.max_iter < 1 or not args.tol > 0:
        raise ConfigError("--max-iter must be at least 1 and --tol positive")
    if not 0 <= args.head_seed < 2 ** 32:
        raise ConfigError(f"--head-seed {args.head_seed}: 0 .. 2^32 - 1 (numpy's RandomState)")


def open_datasets(args, shots: list[int], say) -> tuple[list, dict]:
    """The datasets, and their episodes drawn first: a dataset that cannot fill them is refused before any network
    runs."""
    from ..data.folders import open_fewshot, synthetic_dataset
    from .transfer import pair_roots

    datasets = []
    for kind, root, name in pair_roots(args.dataset, args.root, args.name):
        ds = synthetic_dataset("fewshot", root) if kind == "synthetic" else open_fewshot(kind, root, args.download)
        if name:
            ds.name = name
        datasets.append(ds)
    if len({d.name for d in datasets}) != len(datasets):
        raise ConfigError("two --dataset entries have the same name; tell them apart with --name")
    episodes = {}
    for ds in datasets:
        labels = torch.tensor(ds.splits["all"].labels)
        for s in shots:
            episodes[(ds.name, s)] = sample_episodes(labels, args.ways, s, args.queries, args.episodes, args.seed)[0]
        _, short = eligible_classes(labels, max(shots) + args.queries)
        say(f"{ds.name}: {len(ds.classes)} classes, {len(labels)} images ({ds.source})"
            + (f"; {len(short)} classes with fewer than {max(shots) + args.queries} images sit out the "
               f"{max(shots)}-shot episodes" if short else ""))
    return datasets, episodes


def head_protocol(args, device) -> dict:
    if args.head == "bscd":
        return {"head": "BSCD-FSL's (IBM/cdfsl-benchmark finetune.py @5cfa669, lines 25-33, 77, 85-139): a fresh "
                        "nn.Linear(dim, ways) per episode with PyTorch's default init, on the raw pooled features "
                        "(not standardized); nn.CrossEntropyLoss (batch mean)",
                "solver": f"torch.optim.SGD(lr {BSCD['lr']}, momentum {BSCD['momentum']}, dampening "
                          f"{BSCD['dampening']}, weight_decay {BSCD['weight_decay']}, the bias included), "
                          f"{BSCD['epochs']} epochs over np.random.permutation(support) in batches of "
                          f"{BSCD['batch_size']}, float32 on {device.type}, episodes batched (each its own "
                          "optimizer state: the update is elementwise)",
                "head_seed": f"{args.head_seed}: numpy RandomState({args.head_seed}) for the batch orders "
                             f"(BSCD-FSL: np.random.seed(10)), torch.Generator().manual_seed({args.head_seed}) for "
                             "the inits (BSCD-FSL leaves torch unseeded), both drawn episode after episode and "
                             "restarted for every checkpoint x dataset x shots"}
    from .transfer_probe import NEWTON_MAX_VARS

    return {"head": "multinomial logistic regression with a bias per class on the support set, features "
                    "standardized with the support's per-dimension mean / std; objective mean cross-entropy + "
                    "l2/2 ||W||^2, bias unpenalized; l2 = "
                    + (f"{args.l2:g}" if args.l2 is not None else "1 / (ways * shots) (scikit-learn's StandardScaler "
                                                                  "+ LogisticRegression(C=1))"),
            "solver": f"Newton's method (batched Cholesky solves, Armijo backtracking per episode; L-BFGS above "
                      f"{NEWTON_MAX_VARS} variables an episode), float64 on {device.type}, episodes batched, in an "
                      f"orthonormal basis of each support's span, until the largest gradient entry <= {args.tol:g} "
                      f"or {args.max_iter} iterations"}


def protocol_dict(args, shots, transform, dtype, device, cache) -> dict:
    return {
        "episodes": f"{args.ways}-way, shots {shots}, {args.queries} queries per class, {args.episodes} episodes, "
                    f"classes then images drawn without replacement from numpy PCG64(SeedSequence([seed, ways, shots, "
                    f"queries])), seed {args.seed}; identical for every checkpoint",
        "transform": transform.describe(), "image_size": args.image_size, "resize": transform.resize,
        "features": "global-average-pooled output of the last residual block (fc's input), frozen network in eval "
                    "mode" + ("" if args.head == "bscd" else "; standardized per episode with the support set's "
                                                              "per-dimension mean / std"),
        "precision": f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp16 autocast' if dtype else 'fp32'} "
                     "forward; features stored in fp32",
        **head_protocol(args, device),
        "score": "mean query accuracy (%) over episodes; 95% interval 1.96 * std(ddof=0) / sqrt(episodes) (BSCD-FSL)",
        "seed": args.seed, "feature_cache": str(cache.folder) if cache.folder is not None else None}


def evaluate(args, feats, idx, s, device) -> tuple[torch.Tensor, dict, float | None]:
    """One checkpoint x dataset x shots: (per-episode accuracy, solver stats, the l2 or None)."""
    if args.head == "bscd":
        chunk = bscd_chunk(args.ways, s, args.queries, feats.shape[1], device, args.episodes)
        acc, stats = bscd_episode_accuracies(feats, idx, s, device, chunk, seed=args.head_seed)
        return acc, stats, None
    l2 = args.l2 if args.l2 is not None else 1.0 / (args.ways * s)
    chunk = episode_chunk(args.ways, s, args.queries, feats.shape[1], device, args.episodes)
    acc, stats = episode_accuracies(feats, idx, s, l2, device, chunk, args.max_iter, args.tol)
    return acc, stats, l2


def run(argv: list[str] | None = None) -> int:
    from .features import Transform
    from .transfer import read_previous, setup

    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    check_args(args)
    shots = list(dict.fromkeys(args.shots))
    datasets, episodes = open_datasets(args, shots, say)
    out = open_output(args.out, "fewshot")
    device, dtype, models, cache = setup(args, say)
    transform = Transform(args.image_size, args.resize or default_resize(args.image_size), square=True)
    workers = default_workers(args.workers)
    protocol = protocol_dict(args, shots, transform, dtype, device, cache)
    head = (f"BSCD-FSL's linear head by SGD (float32, {device.type}, head seed {args.head_seed})" if args.head == "bscd"
            else f"logistic regression per episode by Newton's method (float64, {device.type})")
    say(f"few-shot: {args.ways}-way {'/'.join(map(str, shots))}-shot, {args.queries} queries, {args.episodes} episodes "
        f"(seed {args.seed}, the same for every checkpoint); {transform.describe()}; {head}; features cached in "
        f"{cache.folder if cache.folder is not None else '(nowhere: --no-cache)'}")
    rows = []
    for model, cfg, label, path in models:
        for ds in datasets:
            t0 = time.perf_counter()
            split = ds.splits["all"]
            feats, _, src = cache.features(model, path, ds.name, "all", split.files, split.labels, transform, device,
                                           dtype, args.batch_size, workers, ds.name,
                                           channels_last=device.type == "cuda")
            t_feat = time.perf_counter() - t0
            for s in shots:
                t1 = time.perf_counter()
                acc, solver, l2 = evaluate(args, feats, episodes[(ds.name, s)], s, device)
                row = result_row(args, cfg, label, path, ds, transform, s, l2, acc, solver, feats.shape[1], src,
                                 episodes[(ds.name, s)], time.perf_counter() - t1 + t_feat)
                rows.append(row)
                say_row(say, args, row, time.perf_counter() - t1, t_feat if s == shots[0] else None)
    old = read_previous(out / "fewshot.json")
    redone = {row_key(r) for r in rows}
    kept = [r for r in old if isinstance(r, dict) and "episodes_sha1" in r and row_key(r) not in redone]
    if kept:
        say(f"kept {len(kept)} result(s) of an earlier run in {out} (other checkpoints, datasets or settings)")
    written = write_outputs(out, kept + rows, protocol)
    for r in rows:
        if r.get("paired"):
            say(f"{r['label']} minus {r['paired']['vs']} on {column(r)}: {r['paired']['diff']:+.2f} ± "
                f"{r['paired']['ci95']:.2f} (paired, same episodes)")
    report_written(written)
    return 0


def result_row(args, cfg, label, path, ds, transform, s, l2, acc, solver, dim, src, idx, seconds) -> dict:
    return {"checkpoint": str(Path(path).resolve()), "label": label, "method": cfg.get("method"),
            "arch": cfg.get("arch", "resnet50"), "dataset": ds.name, "dataset_kind": ds.kind, "root": ds.root,
            "source": ds.source, "image_size": args.image_size, "resize": transform.resize, "head": args.head,
            "head_seed": args.head_seed if args.head == "bscd" else None, "ways": args.ways, "shots": s,
            "queries": args.queries, "episodes": args.episodes, "seed": args.seed, "l2": l2,
            "accuracy": float(acc.double().mean()), "ci95": ci95(acc.numpy()),
            "std": float(acc.double().std(unbiased=False)), "episodes_sha1": episodes_sha1(idx), "feature_dim": int(dim),
            "features": src, "solver": solver, "seconds": round(seconds, 2), "accuracies": acc.tolist()}


def say_row(say, args, row, seconds: float, t_feat: float | None) -> None:
    how = f"l2 {row['l2']:g}" if row["l2"] is not None else f"bscd head, {row['solver']['sgd_steps']} SGD steps"
    stopped = args.head == "logreg" and not row["solver"]["converged"]
    say(f"{row['label']} -> {row['dataset']} {args.ways}-way {row['shots']}-shot: {row['accuracy']:.2f} ± "
        f"{row['ci95']:.2f}% over {args.episodes} episodes ({how}), {seconds:.1f} s"
        + (f" (the solver stopped at {args.max_iter} iterations, gradient {row['solver']['grad_max']:.1e})"
           if stopped else "")
        + (f" + {t_feat:.1f} s features" if t_feat is not None else ""))


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
