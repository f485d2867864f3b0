"""`python -m seal_fast transfer`: linear probe of a frozen backbone on other datasets (the SEAL paper's Table 1).

The protocol, every choice of it (also written into transfer.json under "protocol"):
- Backbone: the checkpoint's network in eval mode, frozen; features are the global-average-pooled output of its
  last residual block (fc's input: 2,048 values for ResNet-50), extracted once per checkpoint x dataset split x
  transform and cached (features.py: `$SEAL_FAST_CACHE/features`, default ~/.cache/seal_fast/features,
  `--cache-dir`, `--no-cache`). bf16 autocast where bf16 is native (GPU; CPU with AVX512_BF16 / AMX), else fp32;
  features kept in fp32.
- Images: the shorter side resized to --resize, then a center crop of --image-size. Default: 64 px (the
  pre-training resolution: shorter side 64, center crop 64); `--image-size 224` gives the LLF-style transform
  (shorter side 256, center crop 224): --resize defaults to round(size * 256 / 224) for any size but 64.
  ImageNet mean / std, as in training. No augmentation.
- Head: multinomial logistic regression (softmax cross-entropy, a bias per class) on the features standardized
  with the fitting set's per-dimension mean and standard deviation (a dimension constant there is left unscaled).
  Objective: mean cross-entropy + (l2 / 2) * ||W||^2 (the bias is not penalized). Solver: full-batch L-BFGS
  (torch.optim.LBFGS, strong-Wolfe line search, history 20) in float64 on the study's device (the GPU when there
  is one), from zero, until the largest gradient entry is below 1e-6 or 1,000 iterations; when there are fewer
  fitting images than feature dimensions the problem is solved, exactly, in an orthonormal basis of the images'
  span (the optimal W lies there). A small problem (at most 2,048 variables: (span + 1) x classes, e.g. a tiny
  test set) is solved by Newton's method instead, to the same optimum; transfer.json says which per fit.
- L2 strength: chosen from --l2-grid (default Kornblith et al. 2019's: 45 values log-spaced from 10^-6 to 10^5,
  every quarter decade; --l2-grid narrow: the earlier 10^-6 .. 10^1 every half decade, 15 values) by top-1 on the
  dataset's val split (the official one; DIR/val of a folder), or, when it has none, on a held-out 10% of train
  (stratified: round(10%) of each class, at least one from a class of 2+ images, drawn from --seed). The grid is
  walked from the largest value down, each fit warm-started from the previous one; ties go to the larger l2.
  Then the head is refit with that l2 on train + val (the dataset's val), or on the whole train (held-out val),
  and scored once on test.
- Reported: top-1 and mean per-class accuracy on test, in percent (Kornblith et al. report the latter for
  FGVC-Aircraft and Flowers102, whose test sets are imbalanced; the SEAL paper's Table 1 says top-1). Seeds fixed (--seed: the held-out split; everything else is
  deterministic).

The probe itself (the head, the grid walk, the scores) is transfer_probe.py. Outputs in --out: transfer.json
(protocol + one result per checkpoint x dataset, with the l2 grid's val accuracies), transfer.csv (one row per
checkpoint x dataset) and table.md (checkpoints x datasets, top-1 as the paper's Table 1 with the paper's numbers
beside it, then mean per-class accuracy). docs/transfer.md has the protocol's sources and measured figures. Results already in --out's transfer.json for other checkpoints /
datasets are kept, so several runs into one --out build one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from ..files import write_whole, written_whole
from ..runtime import default_workers, pick_device
from .command import open_output, report_written, require_checkpoints, study_main, study_parser
from .features import add_extraction_args
from .transfer_probe import MAX_ITER, NARROW_GRID, NEWTON_MAX_VARS, PAPER_GRID, TOL, linear_probe

PRETRAIN_SIZE = 64
GRIDS = {"paper": PAPER_GRID, "narrow": NARROW_GRID}  # --l2-grid by name

# The SEAL paper's Table 1 (Tiny-ImageNet ResNet-50, linear probe), for the table's reference rows.
PAPER_COLUMNS = ["Flower102", "CUB-200", "FGVC-Aircraft", "MIT-67", "Stanford Dogs"]
PAPER_TABLE1 = {"normal (160 epochs)": [34.31, 6.49, 6.24, 25.67, 8.99],
                "SEAL": [45.68, 8.49, 9.81, 35.37, 12.61]}


def default_resize(size: int) -> int:
    return size if size == PRETRAIN_SIZE else round(size * 256 / 224)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ["checkpoint", "label", "method", "dataset", "image_size", "top1", "mean_per_class", "l2", "val_top1",
               "val_source", "train_images", "val_images", "test_images", "classes", "feature_dim"]
PERCENT = ("top1", "mean_per_class", "val_top1")


def row_key(r: dict) -> tuple:
    return (r["checkpoint"], r["dataset"], r["image_size"], r["resize"])


def merge_rows(old: list[dict], new: list[dict]) -> tuple[list[dict], int]:
    """The earlier rows not redone now, then the new ones; and how many earlier rows were kept."""
    redone = {row_key(r) for r in new}
    kept = [r for r in old if isinstance(r, dict) and "checkpoint" in r and row_key(r) not in redone]
    return kept + new, len(kept)


def read_previous(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("results", []))
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):  # data only; junk is not kept
        return []


def column(r: dict) -> str:
    return r["dataset"] if r["image_size"] == PRETRAIN_SIZE else f"{r['dataset']} ({r['image_size']} px)"


def metric_table(rows: list[dict], metric: str) -> list[str]:
    """Checkpoints x dataset columns of one metric (a row without it, from an earlier version, leaves its cell
    empty)."""
    cols = list(dict.fromkeys(column(r) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], column(r)): r.get(metric) for r in rows}
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for lab in labels:
        vals = [f"{cell[(lab, c)]:.2f}" if cell.get((lab, c)) is not None else "" for c in cols]
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
    return lines


def table_md(rows: list[dict]) -> str:
    lines = ["# Linear probe of the frozen backbone: test top-1 (%)", ""] + metric_table(rows, "top1")
    lines += ["", "Mean per-class accuracy (%) on the same test sets (Kornblith et al. 2019's metric for "
              "FGVC-Aircraft and Flowers102):", ""] + metric_table(rows, "mean_per_class")
    lines += ["", "The paper's Table 1 (ResNet-50 trained on Tiny-ImageNet, linear probe, top-1 %), for comparison:",
              "", "| method | " + " | ".join(PAPER_COLUMNS) + " |", "|---|" + "---:|" * len(PAPER_COLUMNS)]
    for method, vals in PAPER_TABLE1.items():
        lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    sizes = sorted({(r["image_size"], r["resize"]) for r in rows})
    lines += ["", "Protocol: " + "; ".join(f"{s} px images (shorter side {rz}, center crop {s})" for s, rz in sizes)
              + "; multinomial logistic regression on standardized pooled features, full-batch L-BFGS, l2 chosen "
              "on val (the dataset's, else a held-out 10% of train), refit on train + val, scored once on test. "
              "Details: transfer.json.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], protocol: dict) -> list[Path]:
    write_whole(out / "transfer.json", json.dumps({"created": datetime.now().isoformat(timespec="seconds"),
                                                   "protocol": protocol, "results": rows}, indent=2))
    with written_whole(out / "transfer.csv") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else f"{r[c]:.2f}" if c in PERCENT else f"{r[c]:g}" if c == "l2"
                        else r[c] for c in CSV_COLUMNS])
    write_whole(out / "table.md", table_md(rows))
    return [out / n for n in ("transfer.json", "transfer.csv", "table.md")]


def grid_source(grid: list[float]) -> str:
    grid = sorted(grid, reverse=True)
    if grid == PAPER_GRID:
        return "Kornblith et al. 2019: 45 values log-spaced from 1e-6 to 1e5 (np.logspace(-6, 5, 45))"
    if grid == NARROW_GRID:
        return "the earlier narrow grid: 1e-6 .. 1e1, every half decade (15 values)"
    return f"given on the command line ({len(grid)} values)"


def protocol_dict(args, transform, dtype, device, cache) -> dict:
    return {"features": "global-average-pooled output of the last residual block (fc's input), frozen network in "
                        "eval mode",
            "precision": f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp16 autocast' if dtype else 'fp32'} "
                         "forward; features stored in fp32",
            "transform": transform.describe(), "image_size": args.image_size, "resize": transform.resize,
            "head": "multinomial logistic regression with a bias per class on standardized features (fitting set's "
                    "per-dimension mean / std); objective mean cross-entropy + l2/2 ||W||^2, bias unpenalized",
            "solver": f"full-batch L-BFGS (strong Wolfe, history 20), float64 on {device.type}, until the largest "
                      f"gradient entry <= {args.tol:g} or {args.max_iter} iterations (a fit is reported converged "
                      f"when it ends below {10 * args.tol:g}); warm-started along the l2 grid; "
                      f"Newton's method instead for a problem of at most {NEWTON_MAX_VARS} variables ((span + 1) x "
                      "classes), to the same optimum",
            "l2_grid": sorted(args.l2_grid, reverse=True),
            "l2_grid_source": grid_source(args.l2_grid),
            "l2_selection": "best top-1 on the dataset's val split (the official one of Flowers102 / FGVC-Aircraft, "
                            "DIR/val of a folder), else on a held-out 10% of train (stratified); "
                            "ties to the larger l2",
            "refit": "with the chosen l2 on train + val (a dataset's val split) or the whole train (held-out val)",
            "score": "top-1 (%) and mean per-class accuracy (%: each class's accuracy, averaged over the test "
                     "set's classes) on the test split, once", "seed": args.seed,
            "feature_cache": str(cache.folder) if cache.folder is not None else None}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..data.folders import TRANSFER_DATASETS

    p = study_parser("transfer", "Linear probe of frozen checkpoints on other datasets (the SEAL paper's "
                                            "Table 1).")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PT", help="last.pt / best.pt / gen<G>.pt files")
    p.add_argument("--dataset", nargs="+", required=True, metavar="NAME",
                   help=f"one or more of {', '.join(TRANSFER_DATASETS)}, synthetic (a built-in demo set)")
    p.add_argument("--root", nargs="+", metavar="DIR",
                   help="each dataset's folder (one for all, or one per --dataset, in order)")
    p.add_argument("--name", nargs="+", metavar="NAME",
                   help="column names for the datasets (default: the paper's names; a folder's own name)")
    p.add_argument("--download", action="store_true", help="let torchvision download flowers102 / fgvc-aircraft")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/transfer-<timestamp>)")
    p.add_argument("--image-size", type=int, default=PRETRAIN_SIZE,
                   help="center-crop size (default 64, the pre-training resolution; 224: shorter side 256, center "
                        "crop 224, the resolution of Kornblith et al. 2019's ResNet-50 features)")
    p.add_argument("--resize", type=int, help="shorter side before the crop (default: 64 at 64, else size*256/224)")
    p.add_argument("--l2-grid", type=grid_value, nargs="+", default=["paper"], metavar="L2",
                   help="l2 strengths to choose from on val: values, or one name: paper (the default: Kornblith et "
                        "al. 2019's 45 values log-spaced from 1e-6 to 1e5) or narrow (1e-6 .. 1e1 every half decade, "
                        "15 values: this study's earlier default)")
    p.add_argument("--seed", type=int, default=0, help="the held-out val split when a dataset has no val (default 0)")
    p.add_argument("--max-iter", type=int, default=MAX_ITER, help="L-BFGS iterations per fit at most (default 1000)")
    p.add_argument("--tol", type=float, default=TOL, help="stop when the largest gradient entry is below this "
                                                          "(default 1e-6)")
    add_extraction_args(p)
    return p


def grid_value(text: str):
    """--l2-grid's items: a grid's name or a number (checked for sign and finiteness in resolve_grid)."""
    if text in GRIDS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or one of {', '.join(GRIDS)}") from None


def resolve_grid(items: list) -> list[float]:
    names = [x for x in items if isinstance(x, str)]
    if names:
        if len(items) != 1:
            raise ConfigError(f"--l2-grid {names[0]}: a grid's name stands alone (or give the values)")
        return list(GRIDS[names[0]])
    if any(not (x > 0 and math.isfinite(x)) for x in items):
        raise ConfigError("--l2-grid: every value must be positive and finite")
    return list(items)


def pair_roots(kinds: list[str], roots: list[str] | None, names: list[str] | None, flag: str = "--root"):
    roots = roots or []
    if len(roots) not in (0, 1, len(kinds)):
        raise ConfigError(f"{flag}: give one folder for all {len(kinds)} datasets or one per --dataset, in order "
                          f"(got {len(roots)})")
    if names and len(names) != len(kinds):
        raise ConfigError(f"--name: give one name per --dataset ({len(kinds)}), got {len(names)}")
    per = roots if len(roots) == len(kinds) else roots * len(kinds) if roots else [None] * len(kinds)
    return list(zip(kinds, per, names or [None] * len(kinds)))


def check_common(args) -> None:
    if args.image_size < 8:
        raise ConfigError(f"--image-size {args.image_size}: use 8 pixels or more (64 = the pre-training resolution)")
    if args.resize is not None and args.resize < args.image_size:
        raise ConfigError(f"--resize {args.resize}: must be at least --image-size {args.image_size} (it is the size "
                          "before the center crop)")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    require_checkpoints(args.checkpoint)


def setup(args, say):
    """device, autocast dtype, the models [(model, cfg, label, path)], the feature cache."""
    from .features import FeatureCache, default_cache_dir, load_model, precision

    device = pick_device(args.device)
    dtype, why = precision(device, args.amp)
    if args.amp or device.type == "cuda":
        say(why)
    models = []
    for path in args.checkpoint:
        model, cfg, label = load_model(path, device, channels_last=device.type == "cuda", trust=args.trust_checkpoint)
        models.append((model, cfg, label, path))
    cache = FeatureCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    return device, dtype, models, cache


def open_datasets(args, say) -> list:
    """The --dataset entries opened (a bad folder is refused here, before any network runs), named, each with a
    test split."""
    from ..data.folders import open_transfer, synthetic_dataset

    datasets = []
    for kind, root, name in pair_roots(args.dataset, args.root, args.name):
        ds = synthetic_dataset("transfer", root) if kind == "synthetic" else open_transfer(kind, root, args.download)
        if name:
            ds.name = name
        datasets.append(ds)
    if len({d.name for d in datasets}) != len(datasets):
        raise ConfigError("two --dataset entries have the same name; tell them apart with --name")
    for ds in datasets:
        sizes = ", ".join(f"{len(s.files)} {n}" for n, s in ds.splits.items())
        say(f"{ds.name}: {len(ds.classes)} classes, {sizes} images ({ds.source})")
        if "test" not in ds.splits:
            raise DataError(f"{ds.name}: has no test split")
    return datasets


def probe_one(args, model, cfg, label, path, ds, ctx) -> dict:
    """One checkpoint x dataset: its features (cached), the probe, the result's row (and its console line)."""
    device, dtype, cache, transform, workers, say = ctx
    t0 = time.perf_counter()
    feats, sources = {}, []
    for split, s in ds.splits.items():
        f, y, src = cache.features(model, path, ds.name, split, s.files, s.labels, transform, device, dtype,
                                   args.batch_size, workers, f"{ds.name} {split}", channels_last=device.type == "cuda")
        feats[split] = (f, y)
        sources.append(f"{split}: {src}")
    t1 = time.perf_counter()
    r = linear_probe(feats["train"], feats["test"], len(ds.classes), feats.get("val"), args.l2_grid, args.seed,
                     device, max_iter=args.max_iter, tol=args.tol)
    row = {"checkpoint": str(Path(path).resolve()), "label": label, "method": cfg.get("method"),
           "arch": cfg.get("arch", "resnet50"), "dataset": ds.name, "dataset_kind": ds.kind, "root": ds.root,
           "source": ds.source, "image_size": args.image_size, "resize": transform.resize, "top1": r["top1"],
           "mean_per_class": r["mean_per_class"], "l2": r["l2"], "val_top1": r["val_top1"],
           "val_source": r["val_source"], "train_images": len(ds.splits["train"].files),
           "val_images": len(ds.splits["val"].files) if ds.has_val else r["val_images"],
           "test_images": r["test_images"], "classes": len(ds.classes),
           "feature_dim": int(feats["train"][0].shape[1]), "train_top1": r["train_top1"], "l2_grid_size":
           len(args.l2_grid), "grid": r["grid"], "solver": r["solver"], "features": sources,
           "probe_seconds": round(time.perf_counter() - t1, 2), "seconds": round(time.perf_counter() - t0, 2)}
    note = "" if r["solver"]["converged"] else \
        f" (L-BFGS stopped at {args.max_iter} iterations, gradient {r['solver']['grad_max']:.1e})"
    say(f"{label} -> {ds.name}: top-1 {r['top1']:.2f}%, mean per-class {r['mean_per_class']:.2f}% (l2 {r['l2']:g}, "
        f"val top-1 {r['val_top1']:.2f}% on {r['val_source']}; {r['refit_images']} train, {r['test_images']} test "
        f"images, {len(ds.classes)} classes){note}, {row['seconds']:.1f} s ({row['probe_seconds']:.1f} s probe)")
    return row


def run(argv: list[str] | None = None) -> int:
    from .features import Transform

    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    check_common(args)
    args.l2_grid = resolve_grid(args.l2_grid)
    if args.max_iter < 1 or not args.tol > 0:
        raise ConfigError("--max-iter must be at least 1 and --tol positive")
    datasets = open_datasets(args, say)
    out = open_output(args.out, "transfer")
    device, dtype, models, cache = setup(args, say)
    transform = Transform(args.image_size, args.resize or default_resize(args.image_size))
    workers = default_workers(args.workers)
    protocol = protocol_dict(args, transform, dtype, device, cache)
    say(f"linear probe: {transform.describe()}; logistic regression by full-batch L-BFGS (float64, {device.type}), "
        f"l2 from {len(args.l2_grid)} value{'s' if len(args.l2_grid) > 1 else ''} ({grid_source(args.l2_grid)}) "
        f"chosen on val; features cached in {cache.folder if cache.folder is not None else '(nowhere: --no-cache)'}")
    ctx = (device, dtype, cache, transform, workers, say)
    rows = [probe_one(args, model, cfg, label, path, ds, ctx) for model, cfg, label, path in models
            for ds in datasets]
    rows, kept = merge_rows(read_previous(out / "transfer.json"), rows)
    if kept:
        say(f"kept {kept} result(s) of an earlier run in {out} (other checkpoints, datasets or sizes)")
    written = write_outputs(out, rows, protocol)
    report_written(written)
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
