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
- L2 strength: chosen from --l2-grid (default 10^-6 .. 10^1, every half decade: 15 values) by top-1 on the
  dataset's val split (the official one; DIR/val of a folder), or, when it has none, on a held-out 10% of train
  (stratified: round(10%) of each class, at least one from a class of 2+ images, drawn from --seed). The grid is
  walked from the largest value down, each fit warm-started from the previous one; ties go to the larger l2.
  Then the head is refit with that l2 on train + val (the dataset's val), or on the whole train (held-out val),
  and scored once on test.
- Reported: top-1 on test, in percent. Seeds fixed (--seed: the held-out split; everything else is
  deterministic).

Outputs in --out: transfer.json (protocol + one result per checkpoint x dataset, with the l2 grid's val
accuracies), transfer.csv (one row per checkpoint x dataset) and table.md (checkpoints x datasets, as the paper's
Table 1, with the paper's numbers beside it). Results already in --out's transfer.json for other checkpoints /
datasets are kept, so several runs into one --out build one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .features import add_extraction_args
from ..runtime import default_workers, pick_device
from .command import open_output, report_written, require_checkpoints, study_main, study_parser

PRETRAIN_SIZE = 64
DEFAULT_GRID = [10.0 ** (e / 2) for e in range(2, -13, -1)]  # 10^1 .. 10^-6, every half decade, largest first
HOLDOUT = 0.1
TOL = 1e-6
MAX_ITER = 1000  # L-BFGS iterations per fit at most

# The SEAL paper's Table 1 (Tiny-ImageNet ResNet-50, linear probe), for the table's reference rows.
PAPER_COLUMNS = ["Flower102", "CUB-200", "FGVC-Aircraft", "MIT-67", "Stanford Dogs"]
PAPER_TABLE1 = {"normal (160 epochs)": [34.31, 6.49, 6.24, 25.67, 8.99],
                "SEAL": [45.68, 8.49, 9.81, 35.37, 12.61]}


def default_resize(size: int) -> int:
    return size if size == PRETRAIN_SIZE else round(size * 256 / 224)


# ----------------------------------------------------------------------------------------------
# The head: multinomial logistic regression, batched over independent problems, full-batch L-BFGS
# ----------------------------------------------------------------------------------------------


@dataclass
class Head:
    weight: torch.Tensor   # [E, D, C]
    bias: torch.Tensor     # [E, C]
    iterations: int
    evaluations: int
    grad_max: float        # largest |gradient entry| at the end (over every problem)
    converged: bool        # grad_max <= 10 x tol (L-BFGS may stop on a stalled line search just above tol)
    solver: str = "lbfgs"  # "newton" or "lbfgs"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [E, M, D] (or [M, D] for E = 1) -> logits [E, M, C] (or [M, C])."""
        single = x.dim() == 2
        x = x[None] if single else x
        out = torch.baddbmm(self.bias[:, None, :], x.to(self.weight.dtype), self.weight)
        return out[0] if single else out


NEWTON_MAX_VARS = 2048  # problems with at most this many variables ((span + 1) x classes) are solved by Newton


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2, *, init: Head | None = None,
               max_iter: int | None = None, tol: float = TOL, solver: str = "auto") -> Head:
    """Minimize, for each of E independent problems, mean_i CE(x_i W + b, y_i) + l2/2 ||W||^2 (b unpenalized).

    x [E, N, D] (or [N, D]), y [E, N] int64 in 0..num_classes-1, l2 a float or [E]; computed in x's dtype and
    device. When N < D each problem is solved in an orthonormal basis Q of its rows' span (x = R^T Q^T): the
    penalty only grows off that span, so the optimum is W = Q V, V found from the N-dimensional coordinates R^T.

    solver "newton" (auto when (span + 1) x classes <= NEWTON_MAX_VARS: few-shot episodes): batched Newton with a
    Cholesky solve and a backtracking (Armijo) line search per problem. The objective does not change when every
    bias moves together (u, a null direction of the Hessian, orthogonal to the gradient), so u u^T is added to
    the Hessian: the step is then the pseudo-inverse step, which keeps the biases' sum.
    solver "lbfgs" (auto otherwise: the transfer probe): the E objectives summed and minimized by one full-batch
    L-BFGS (strong Wolfe, history 20); they share no variable, so the sum's minimum is each one's.
    Either stops when every gradient entry is at most tol (or after max_iter iterations: 100 Newton, 1000
    L-BFGS). The biases are returned centred (sum 0), as L-BFGS from zero keeps them."""
    if x.dim() == 2:
        x, y = x[None], y[None]
        if init is not None and init.weight.shape[0] != 1:
            raise ValueError("init holds several problems but x one")
    e, n, d = x.shape
    l2 = torch.as_tensor(l2, dtype=x.dtype, device=x.device).reshape(-1).expand(e)
    basis = None
    if n < d:
        basis, r = torch.linalg.qr(x.transpose(1, 2))   # basis [E, D, N] orthonormal columns, r [E, N, N]
        xf = r.transpose(1, 2)                            # x @ basis
    else:
        xf = x
    if init is not None:
        w0 = init.weight.to(x.dtype)
        w0 = basis.transpose(1, 2) @ w0 if basis is not None else w0
        b0 = init.bias.to(x.dtype)
    else:
        w0 = torch.zeros(e, xf.shape[2], num_classes, dtype=x.dtype, device=x.device)
        b0 = torch.zeros(e, num_classes, dtype=x.dtype, device=x.device)
    if solver == "auto":
        solver = "newton" if (xf.shape[2] + 1) * num_classes <= NEWTON_MAX_VARS else "lbfgs"
    if solver == "newton":
        w, b, iterations, evals, grad_max = _newton(xf, y, num_classes, l2, w0, b0, max_iter or 100, tol)
    elif solver == "lbfgs":
        w, b, iterations, evals, grad_max = _lbfgs(xf, y, num_classes, l2, w0, b0, max_iter or MAX_ITER, tol)
    else:
        raise ValueError(f"solver {solver!r}: auto, newton or lbfgs")
    if basis is not None:
        w = basis @ w
    b = b - b.mean(1, keepdim=True)
    return Head(w, b, iterations, evals, grad_max, grad_max <= 10 * tol, solver)


def _objective(xf, onehot, l2, w, b) -> torch.Tensor:
    """Each problem's objective [E]."""
    logits = torch.baddbmm(b[:, None, :], xf, w)
    ce = (torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)).mean(1)
    return ce + 0.5 * l2 * w.square().sum((1, 2))


def _newton(xf, y, c, l2, w, b, max_iter, tol):
    e, n, r = xf.shape
    r1 = r + 1
    xt = torch.cat([xf, torch.ones(e, n, 1, dtype=xf.dtype, device=xf.device)], 2)    # [E, N, R+1]
    onehot = F.one_hot(y, c).to(xf.dtype)
    pen = torch.ones(r1, dtype=xf.dtype, device=xf.device)
    pen[-1] = 0                                                                         # the bias: unpenalized
    theta = torch.cat([w, b[:, None, :]], 1)                                            # [E, R+1, C]
    m = c * r1
    eye = torch.eye(m, dtype=xf.dtype, device=xf.device)
    evals, it, grad_max = 0, 0, float("inf")
    while True:
        p = torch.softmax(xt @ theta, -1)
        grad = xt.transpose(1, 2) @ (p - onehot) / n + l2[:, None, None] * pen[:, None] * theta
        g = grad.transpose(1, 2).reshape(e, m)                                          # class-major: c * (R+1) + d
        evals += 1
        grad_max = float(g.abs().max())
        if grad_max <= tol or it >= max_iter:
            break
        it += 1
        h = torch.empty(e, c, r1, c, r1, dtype=xf.dtype, device=xf.device)
        for i in range(c):                       # Hessian block (i, j) = X~^T diag(p_i (delta_ij - p_j)) X~ / N
            for j in range(i, c):
                a = p[:, :, i] * (float(i == j) - p[:, :, j])
                blk = (xt * a[:, :, None]).transpose(1, 2) @ xt / n
                h[:, i, :, j, :] = blk
                if i != j:
                    h[:, j, :, i, :] = blk.transpose(1, 2)
        h = h.reshape(e, m, m)
        h.diagonal(dim1=1, dim2=2).add_(l2[:, None] * pen.repeat(c))
        h.view(e, c, r1, c, r1)[:, :, r, :, r] += 1.0 / c     # + u u^T, u = the all-biases direction / sqrt(C)
        chol, info = torch.linalg.cholesky_ex(h)
        damp = 1e-10
        while bool((info > 0).any()):                          # not positive definite in float: damp those
            h = h + damp * (info > 0).to(h.dtype)[:, None, None] * eye
            chol, info = torch.linalg.cholesky_ex(h)
            damp *= 100
        step = torch.cholesky_solve(g[:, :, None], chol)[:, :, 0]
        dtheta = step.reshape(e, c, r1).transpose(1, 2)
        f0 = _objective(xf, onehot, l2, theta[:, :r], theta[:, r])
        slope = -(g * step).sum(1)                             # directional derivative along -step (<= 0)
        t = torch.ones(e, dtype=xf.dtype, device=xf.device)
        for _ in range(60):                                    # backtracking, per problem
            cand = theta - t[:, None, None] * dtheta
            f1 = _objective(xf, onehot, l2, cand[:, :r], cand[:, r])
            evals += 1
            ok = f1 <= f0 + 1e-4 * t * slope + 1e-13 * f0.abs()
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        theta = theta - t[:, None, None] * dtheta
    return theta[:, :r].contiguous(), theta[:, r].contiguous(), it, evals, grad_max


def _lbfgs(xf, y, num_classes, l2, w0, b0, max_iter, tol):
    n = xf.shape[1]
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    yf = y.reshape(-1)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=tol, tolerance_change=1e-14, line_search_fn="strong_wolfe")
    evals = [0]

    def closure():
        opt.zero_grad()
        evals[0] += 1
        logits = torch.baddbmm(b[:, None, :], xf, w)
        loss = F.cross_entropy(logits.reshape(-1, num_classes), yf, reduction="sum") / n
        loss = loss + 0.5 * (l2[:, None, None] * w.square()).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()  # the gradient at the final point, for the convergence report
    grad_max = float(max(w.grad.abs().max(), b.grad.abs().max()))
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), iterations, evals[0], grad_max


def top1(head: Head, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in percent (x [M, D], y [M]; one problem)."""
    return 100.0 * float((head.logits(x).argmax(-1) == y.to(x.device)).double().mean())


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------


def holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, val indices), stratified: round(fraction * n_c) images of each class c (at least 1 when
    n_c >= 2, none when n_c == 1) go to val, drawn from `seed`; both sorted."""
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = 0 if len(idx) < 2 else max(1, round(fraction * len(idx)))
        perm = idx[torch.randperm(len(idx), generator=g)]
        val.append(perm[:k])
        fit.append(perm[k:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(val)).values


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per dimension; a dimension (near-)constant on x keeps scale 1."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.ones_like(std))


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, grid: list[float] = DEFAULT_GRID,
                 seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                 max_iter: int = MAX_ITER, tol: float = TOL) -> dict:
    """The protocol of the module docstring on (features, labels) pairs; returns the result's fields."""
    device = torch.device(device)
    xtr, ytr = (t.to(device) for t in train)
    xtr = xtr.to(dtype)
    if val is None:
        fit_idx, val_idx = holdout(ytr.cpu(), HOLDOUT, seed)
        if len(val_idx) == 0:
            raise DataError("the train split is too small to hold out a validation set (every class has one image); "
                            "add images or a val/ split")
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        xfit, yfit, xval, yval = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]
        xall, yall = xtr, ytr
        val_source = f"held-out {round(100 * HOLDOUT)}% of train (stratified, seed {seed})"
    else:
        xval, yval = val[0].to(device, dtype), val[1].to(device)
        xfit, yfit = xtr, ytr
        xall, yall = torch.cat([xtr, xval]), torch.cat([ytr, yval])
        val_source = "the dataset's val split"
    missing = sorted(set(range(num_classes)) - set(yfit.unique().tolist()))
    if missing:
        raise DataError(f"class {missing[0]} has no training image ({len(missing)} classes have none): the probe "
                        "cannot fit them")
    mean, scale = standardizer(xfit)
    zfit, zval = (xfit - mean) / scale, (xval - mean) / scale
    curve, head, best = [], None, None
    for l2 in tqdm(sorted(grid, reverse=True), desc="l2 grid", leave=False, disable=None, dynamic_ncols=True,
                   file=sys.stderr):
        head = fit_logreg(zfit, yfit, num_classes, l2, init=head, max_iter=max_iter, tol=tol)
        acc = top1(head, zval, yval)
        curve.append({"l2": l2, "val_top1": acc, "solver": head.solver, "iterations": head.iterations,
                      "converged": head.converged})
        if best is None or acc > best[1]:
            best = (l2, acc, head)
    l2, val_acc, selected = best
    mean, scale = standardizer(xall)
    final = fit_logreg((xall - mean) / scale, yall, num_classes, l2, init=selected, max_iter=max_iter, tol=tol)
    xte, yte = test[0].to(device, dtype), test[1].to(device)
    return {"top1": top1(final, (xte - mean) / scale, yte), "l2": l2, "val_top1": val_acc, "val_source": val_source,
            "fit_images": len(yfit), "val_images": len(yval), "refit_images": len(yall), "test_images": len(yte),
            "grid": curve, "solver": {"method": final.solver, "iterations": final.iterations,
                                      "evaluations": final.evaluations, "grad_max": final.grad_max,
                                      "converged": final.converged},
            "train_top1": top1(final, (xall - mean) / scale, yall)}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ["checkpoint", "label", "method", "dataset", "image_size", "top1", "l2", "val_top1", "val_source",
               "train_images", "val_images", "test_images", "classes", "feature_dim"]


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


def table_md(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(column(r) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], column(r)): r["top1"] for r in rows}
    lines = ["# Linear probe of the frozen backbone: test top-1 (%)", "",
             "| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for lab in labels:
        vals = [f"{cell[(lab, c)]:.2f}" if (lab, c) in cell else "" for c in cols]
        lines.append(f"| {lab} | " + " | ".join(vals) + " |")
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
    tmp = out / ".transfer.json.tmp"
    tmp.write_text(json.dumps({"created": datetime.now().isoformat(timespec="seconds"), "protocol": protocol,
                               "results": rows}, indent=2))
    os.replace(tmp, out / "transfer.json")
    with open(out / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([f"{r[c]:.2f}" if c in ("top1", "val_top1") else f"{r[c]:g}" if c == "l2" else r[c]
                        for c in CSV_COLUMNS])
    (out / "table.md").write_text(table_md(rows))
    return [out / n for n in ("transfer.json", "transfer.csv", "table.md")]


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
            "l2_selection": "best top-1 on the dataset's val split (the official one of Flowers102 / FGVC-Aircraft, "
                            "DIR/val of a folder), else on a held-out 10% of train (stratified); "
                            "ties to the larger l2",
            "refit": "with the chosen l2 on train + val (a dataset's val split) or the whole train (held-out val)",
            "score": "top-1 (%) on the test split, once", "seed": args.seed,
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
                   help="center-crop size (default 64, the pre-training resolution; 224 = LLF's transform)")
    p.add_argument("--resize", type=int, help="shorter side before the crop (default: 64 at 64, else size*256/224)")
    p.add_argument("--l2-grid", type=float, nargs="+", default=DEFAULT_GRID, metavar="L2",
                   help="l2 strengths to choose from on val (default 1e1 .. 1e-6, every half decade)")
    p.add_argument("--seed", type=int, default=0, help="the held-out val split when a dataset has no val (default 0)")
    p.add_argument("--max-iter", type=int, default=MAX_ITER, help="L-BFGS iterations per fit at most (default 1000)")
    p.add_argument("--tol", type=float, default=TOL, help="stop when the largest gradient entry is below this")
    add_extraction_args(p)
    return p


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


def run(argv: list[str] | None = None) -> int:
    from ..data.folders import open_transfer, synthetic_dataset
    from .features import Transform

    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    check_common(args)
    if any(not (x > 0 and math.isfinite(x)) for x in args.l2_grid):
        raise ConfigError("--l2-grid: every value must be positive and finite")
    if args.max_iter < 1 or not args.tol > 0:
        raise ConfigError("--max-iter must be at least 1 and --tol positive")
    specs = pair_roots(args.dataset, args.root, args.name)
    datasets = []
    for kind, root, name in specs:
        ds = synthetic_dataset("transfer", root) if kind == "synthetic" else open_transfer(kind, root, args.download)
        if name:
            ds.name = name
        datasets.append(ds)
    if len({d.name for d in datasets}) != len(datasets):
        raise ConfigError("two --dataset entries have the same name; tell them apart with --name")
    out = open_output(args.out, "transfer")
    device, dtype, models, cache = setup(args, say)
    transform = Transform(args.image_size, args.resize or default_resize(args.image_size))
    workers = default_workers(args.workers)
    protocol = protocol_dict(args, transform, dtype, device, cache)
    say(f"linear probe: {transform.describe()}; logistic regression by full-batch L-BFGS (float64, {device.type}), "
        f"l2 from {len(args.l2_grid)} value{'s' if len(args.l2_grid) > 1 else ''} chosen on val; features cached in "
        f"{cache.folder if cache.folder is not None else '(nowhere: --no-cache)'}")
    for ds in datasets:
        sizes = ", ".join(f"{len(s.files)} {n}" for n, s in ds.splits.items())
        say(f"{ds.name}: {len(ds.classes)} classes, {sizes} images ({ds.source})")
        if "test" not in ds.splits:
            raise DataError(f"{ds.name}: has no test split")
    rows = []
    for model, cfg, label, path in models:
        for ds in datasets:
            t0 = time.perf_counter()
            feats, sources = {}, []
            for split, s in ds.splits.items():
                f, y, src = cache.features(model, path, ds.name, split, s.files, s.labels, transform, device, dtype,
                                           args.batch_size, workers, f"{ds.name} {split}",
                                           channels_last=device.type == "cuda")
                feats[split] = (f, y)
                sources.append(f"{split}: {src}")
            r = linear_probe(feats["train"], feats["test"], len(ds.classes), feats.get("val"), args.l2_grid,
                             args.seed, device, max_iter=args.max_iter, tol=args.tol)
            row = {"checkpoint": str(Path(path).resolve()), "label": label, "method": cfg.get("method"),
                   "arch": cfg.get("arch", "resnet50"), "dataset": ds.name, "dataset_kind": ds.kind,
                   "root": ds.root, "source": ds.source, "image_size": args.image_size, "resize": transform.resize,
                   "top1": r["top1"], "l2": r["l2"], "val_top1": r["val_top1"], "val_source": r["val_source"],
                   "train_images": len(ds.splits["train"].files),
                   "val_images": len(ds.splits["val"].files) if ds.has_val else r["val_images"],
                   "test_images": r["test_images"], "classes": len(ds.classes),
                   "feature_dim": int(feats["train"][0].shape[1]), "train_top1": r["train_top1"],
                   "grid": r["grid"], "solver": r["solver"], "features": sources,
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            note = "" if r["solver"]["converged"] else \
                f" (L-BFGS stopped at {args.max_iter} iterations, gradient {r['solver']['grad_max']:.1e})"
            say(f"{label} -> {ds.name}: top-1 {r['top1']:.2f}% (l2 {r['l2']:g}, val top-1 {r['val_top1']:.2f}% on "
                f"{r['val_source']}; {r['refit_images']} train, {r['test_images']} test images, "
                f"{len(ds.classes)} classes){note}, {row['seconds']:.1f} s")
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
