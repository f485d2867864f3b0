"""`python -m seal_fast hessian`: the curvature of trained checkpoints (the SEAL paper's "flatter minima" claim).

What is measured, exactly (so anyone can check it): the Hessian H of
    L(theta) = mean over the sampled images of cross_entropy(model(x; theta), y)   (no label smoothing)
with respect to every parameter of the model (BatchNorm weights and biases included), or with --params PREFIX ...
only to the parameters under those module names (`--params fc`: the classifier's weight and bias, the space in
which PoF claims a flatter loss; the other parameters held at their values), the model in eval mode
(BatchNorm uses its running statistics, so L is a deterministic function of theta). The images are --samples
training images, at indices i * n // samples (i = 0 .. samples-1) of the training set in the layout's order
(classes in wnids.txt order, files sorted by name; seal_fast/data/layout.py), decoded and normalized as
validation images are (no crop, no flip; seal_fast/data/images.py).

H is never formed: every algorithm sees only v -> H v, a Hessian-vector product computed with torch.func by
double backward through the model (vjp of grad, "reverse"; --hvp forward: jvp of grad), over chunks of
--batch-size images whose products are summed (each chunk's loss is its summed cross-entropy / samples), so
memory is bounded by one chunk. The algorithms are PyHessian's (Yao et al. 2020, github amirgholami/PyHessian,
the version 0.1 the SEAL authors pinned), with its defaults:
  top eigenvalues  power iteration, deflated by orthonormalizing against the eigenvectors already found, stopped
                   when two consecutive Rayleigh quotients differ by less than --tol (relative) or after
                   --max-iter products (defaults 1e-3, 100); --top N eigenvalues, found largest magnitude first
                   and reported largest first (the same order for a Hessian at a minimum)
  trace            Hutchinson: the mean of z^T H z over Rademacher vectors z, stopped when the running mean
                   changes by less than --trace-tol (relative) or after --trace-max-iter vectors (1e-3, 100);
                   relative to |previous mean| (PyHessian 0.1 omits the abs(), so a negative running mean stops it
                   at the second vector; its later versions take abs() as here)
  density          stochastic Lanczos quadrature: --slq-runs runs (1) of --slq-steps Lanczos steps (100) from a
                   normalized Rademacher vector, with full reorthogonalization; the nodes are the eigenvalues of
                   the tridiagonal matrix and the weights the squared first components of its eigenvectors. For
                   the plot the nodes are smoothed by PyHessian's Gaussian kernel (variance 1e-5 x the spectrum's
                   width, at least 1e-5), normalized as PyHessian's density_generate does.
Every checkpoint is measured with the same random vectors (a generator seeded with --seed for each one).

The products and the algorithms are in hessian_math.py; this module is the command (samples, checkpoints, outputs).
Outputs in --out: hessian.json (a list, one object per checkpoint: checkpoint, parameters (the count),
parameter_names (those differentiated), top_eigenvalues, trace {mean, std, stderr, samples, estimates}, density
{nodes, weights}, loss, settings (params: the --params prefixes, null for the whole network)), spectrum.png (the
density, symmetric-log eigenvalue axis, one line per checkpoint) and table.md (top eigenvalue and trace per
checkpoint). docs/hessian.md has the flags, the sources and measured figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..errors import ConfigError, DataError
from ..files import write_whole
from ..runtime import free_memory, pick_device
from .command import open_output, report_written, require_checkpoints, study_main, study_parser
from .hessian_math import (
    Density,
    Eigen,
    HessianOperator,
    Trace,
    hutchinson_trace,
    select_params,
    slq_density,
    top_eigenvalues,
)


# ----------------------------------------------------------------------------------------------
# The images: a fixed, evenly spaced subset of the training set, as validation images
# ----------------------------------------------------------------------------------------------


def sample_indices(n: int, samples: int) -> list[int]:
    """Indices i * n // samples, i = 0 .. samples-1: evenly spread over the layout's order (so over classes)."""
    return [i * n // samples for i in range(samples)]


def load_samples(root: str | os.PathLike, samples: int) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """(uint8 images [S,3,H,W], int64 labels [S], training-set size n, classes) of the sampled training images."""
    from ..data.images import load_rgb
    from ..data.layout import scan_train

    split = scan_train(root)
    n = len(split.files)
    if samples > n:
        raise ConfigError(f"--samples {samples}: the training set of {root} has only {n} images; lower --samples")
    idx = sample_indices(n, samples)
    arrays = [load_rgb(split.files[i]) for i in idx]
    for i, a in zip(idx, arrays):
        if a.shape != arrays[0].shape:
            raise DataError(f"{split.files[i]}: is {a.shape[1]}x{a.shape[0]} but {split.files[idx[0]]} is "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; the study needs images of one size "
                            "(Tiny-ImageNet's are all 64x64)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([split.labels[i] for i in idx], dtype=torch.int64)
    return images, labels, n, split.classes


# ----------------------------------------------------------------------------------------------
# One checkpoint
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    path: str
    label: str
    loss: float
    params: int
    names: list[str]
    eigen: Eigen
    trace: Trace
    density: Density
    products: int
    seconds: float

    def to_dict(self, settings: dict) -> dict:
        return {"checkpoint": self.path, "label": self.label, "loss": self.loss, "parameters": self.params,
                "parameter_names": self.names,
                "top_eigenvalues": self.eigen.values, "eigenvalue_iterations": self.eigen.iterations,
                "eigenvalue_converged": self.eigen.converged,
                "trace": {"mean": self.trace.mean, "std": self.trace.std, "stderr": self.trace.stderr,
                          "samples": len(self.trace.estimates),
                          "converged": self.trace.converged, "estimates": self.trace.estimates},
                "density": {"nodes": self.density.nodes, "weights": self.density.weights,
                            "steps": self.density.steps},
                "hessian_vector_products": self.products, "seconds": self.seconds, "settings": settings}


def study(op: HessianOperator, args, path: str, label: str) -> Result:
    """Top eigenvalues, trace and density of one checkpoint's Hessian, random vectors from a generator seeded
    with --seed (the same vectors for every checkpoint)."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=op.device)
    gen.manual_seed(args.seed)
    kw = {"gen": gen, "dtype": op.dtype, "device": op.device, "desc": f"{label}: "}
    loss = op.loss()
    if not math.isfinite(loss):
        raise DataError(f"{path}: the loss over the samples is {loss}: the checkpoint has diverged weights; study "
                        "an earlier checkpoint")
    eigen = top_eigenvalues(op, op.dim, args.top, args.max_iter, args.tol, **kw)
    order = sorted(range(len(eigen.values)), key=lambda i: -eigen.values[i])  # largest first (found: by magnitude)
    eigen = Eigen([eigen.values[i] for i in order], [eigen.iterations[i] for i in order],
                  [eigen.converged[i] for i in order], eigen.vectors[order])
    trace = hutchinson_trace(op, op.dim, args.trace_max_iter, args.trace_tol, **kw)
    density = slq_density(op, op.dim, args.slq_runs, args.slq_steps, **kw) if args.slq_runs else Density()
    values = eigen.values + [trace.mean] + [x for n in density.nodes for x in n]
    if not all(math.isfinite(x) for x in values):
        raise DataError(f"{path}: Hessian-vector products hold NaN or inf values; study an earlier checkpoint "
                        "or use --dtype float64")
    return Result(path, label, loss, op.dim, op.names, eigen, trace, density, op.count, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def write_table(rows: list[dict], path: Path) -> None:
    top = max(len(r["top_eigenvalues"]) for r in rows)
    s = rows[0]["settings"]
    space = "every parameter" if s.get("params") is None else f"the parameters under {' '.join(s['params'])}"
    lines = [(f"Hessian of the mean cross-entropy over {s['samples']} training images ({s['data']}) w.r.t. {space} "
              f"({rows[0]['parameters']:,} of them), eval mode, "
              f"{s['dtype']}; trace by Hutchinson: the mean of z^T H z over Rademacher vectors z, their standard "
              "deviation and count, and the mean's standard error."), "",
             "| checkpoint | run | loss | top eigenvalue | " + ("top eigenvalues | " if top > 1 else "") +
             "trace | std (vectors) | std error | products | seconds |",
             "|---|---|---|---|" + ("---|" if top > 1 else "") + "---|---|---|---|---|"]
    for r in rows:
        ev = r["top_eigenvalues"]
        t = r["trace"]
        lines.append(f"| {r['checkpoint']} | {r['label']} | {r['loss']:.4f} | {ev[0]:.6g} | " +
                     (", ".join(f"{x:.4g}" for x in ev) + " | " if top > 1 else "") +
                     f"{t['mean']:.6g} | {t['std']:.3g} ({t['samples']}) | {t['stderr']:.3g} | {r['hessian_vector_products']} | "
                     f"{r['seconds']:.1f} |")
    write_whole(path, "\n".join(lines) + "\n")


def write_outputs(out: Path, results: list[Result], settings: dict) -> list[Path]:
    from .hessian_plots import plot_spectrum

    rows = [r.to_dict(settings) for r in results]
    write_whole(out / "hessian.json", json.dumps(rows, indent=2))
    write_table(rows, out / "table.md")
    written = [out / "hessian.json", out / "table.md"]
    if any(r["density"]["nodes"] for r in rows):
        plot_spectrum(rows, out / "spectrum.png")
        written.append(out / "spectrum.png")
    return written


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = study_parser("hessian", "Top Hessian eigenvalues, trace and eigenvalue density (PyHessian's "
                                "algorithms) of trained checkpoints.")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="PT",
                   help="one or more last.pt / best.pt / gen<G>.pt files (one line each in the plot)")
    p.add_argument("--data", metavar="DIR",
                   help="tiny-imagenet-200 folder (default: the checkpoint's own --data, else the built-in synthetic set)")
    p.add_argument("--samples", type=int, default=200,
                   help="training images, at indices i * n // samples (default 200)")
    p.add_argument("--params", nargs="+", metavar="PREFIX",
                   help="the Hessian w.r.t. only the parameters under these module names (e.g. fc, layer4, "
                        "layer4.2), the others held fixed (default: every parameter)")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/hessian-<timestamp>)")
    p.add_argument("--top", type=int, default=1, help="top eigenvalues by power iteration (default 1)")
    p.add_argument("--max-iter", type=int, default=100, help="power-iteration products per eigenvalue (default 100)")
    p.add_argument("--tol", type=float, default=1e-3, help="power iteration's relative tolerance (default 1e-3)")
    p.add_argument("--trace-max-iter", type=int, default=100, help="Hutchinson vectors at most (default 100)")
    p.add_argument("--trace-tol", type=float, default=1e-3, help="Hutchinson's relative tolerance (default 1e-3)")
    p.add_argument("--slq-runs", type=int, default=1, help="stochastic Lanczos quadrature runs (default 1; 0: none)")
    p.add_argument("--slq-steps", type=int, default=100, help="Lanczos steps per run (default 100)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per chunk of a Hessian-vector product (memory; not the result) (default 100)")
    p.add_argument("--hvp", choices=("reverse", "forward"), default="reverse",
                   help="reverse: vjp of grad (double backward, default); forward: jvp of grad")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model, images and vectors (default float32; TF32 is off on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="the random vectors (the same for every checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    checkpoint.add_trust_flag(p)
    return p


def check_args(args) -> None:
    for name in ("samples", "top", "max_iter", "trace_max_iter", "slq_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.slq_runs < 0:
        raise ConfigError(f"--slq-runs {args.slq_runs}: must be 0 or more")
    for name in ("tol", "trace_tol"):
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    require_checkpoints(args.checkpoint)


def load_checkpoint(path: str, device: torch.device, trust: bool = False):
    """features.load_model: a wrong-architecture or junk checkpoint is already one DataError line there, a
    code-carrying one is refused unless `trust` (--trust-checkpoint)."""
    from .features import load_model

    return load_model(path, device, trust=trust)


def data_root(args, config: dict, say) -> str:
    """--data, else the folder the first checkpoint trained on, else the built-in synthetic set."""
    root = args.data or config.get("data")
    if args.data is None and root is not None and not Path(root).is_dir():
        raise DataError(f"{root}: the data folder {args.checkpoint[0]} was trained on is not there any more; pass "
                        "--data DIR (the tiny-imagenet-200 folder)")
    if root is None:
        from ..data.synthetic import ensure_synthetic

        root = str(ensure_synthetic()[0])
        say(f"no --data given and the checkpoint trained on the built-in synthetic set: using it ({root})")
    return root


def settings_of(args, root: str, n: int, device) -> dict:
    return {"data": str(root), "samples": args.samples, "train_images": n, "sample_indices": "i * n // samples",
            "loss": "mean cross-entropy, no label smoothing, model in eval mode", "params": args.params,
            "top": args.top, "max_iter": args.max_iter, "tol": args.tol, "trace_max_iter": args.trace_max_iter,
            "trace_tol": args.trace_tol, "slq_runs": args.slq_runs, "slq_steps": args.slq_steps,
            "batch_size": args.batch_size, "hvp": args.hvp, "dtype": args.dtype, "seed": args.seed,
            "device": str(device), "torch": torch.__version__}


def summary(r: Result, top: int) -> str:
    ev = ", ".join(f"{x:.5g}" for x in r.eigen.values)
    its = "/".join(str(i) for i in r.eigen.iterations)
    dens = (f", density: {sum(r.density.steps)} Lanczos steps, nodes {min(min(x) for x in r.density.nodes):.4g} "
            f"to {max(max(x) for x in r.density.nodes):.4g}") if r.density.nodes else ""
    late = "" if all(r.eigen.converged) else ", not all within --tol"
    return (f"{r.label}: loss {r.loss:.4f}, top eigenvalue{'s' if top > 1 else ''} {ev} ({its} iterations{late}), "
            f"trace {r.trace.mean:.5g} (std {r.trace.std:.3g} over {len(r.trace.estimates)} vectors, standard error "
            f"{r.trace.stderr:.2g}{'' if r.trace.converged else ', not within --trace-tol'}){dens}; "
            f"{r.products} Hessian-vector products, {r.seconds:.1f} s")


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    check_args(args)
    device = pick_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    if device.type == "cuda":  # full fp32 products: TF32 convolutions / matmuls would blur small eigenvalues
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    out = open_output(args.out, "hessian")

    models = [load_checkpoint(p, device, trust=args.trust_checkpoint) for p in args.checkpoint]
    selected = [select_params([n for n, _ in m.named_parameters()], args.params) for m, _, _ in models]
    root = data_root(args, models[0][1], say)
    images, labels, n, classes = load_samples(root, args.samples)
    for (model, _, _), path in zip(models, args.checkpoint):
        if model.fc.out_features != len(classes):
            raise DataError(f"{path} predicts {model.fc.out_features} classes but {root} has {len(classes)}; "
                            "pass the --data the checkpoint was trained on")
    from ..data.images import normalize

    inputs = normalize(images, device, channels_last=False, dtype=dtype)
    labels = labels.to(device)
    sizes = [dict(m.named_parameters()) for m, _, _ in models]
    dim = max(sum(p[name].numel() for name in names) for p, names in zip(sizes, selected))
    total = max(sum(q.numel() for q in p.values()) for p in sizes)
    need = args.slq_steps * dim * (8 if dtype == torch.float64 else 4) if args.slq_runs else 0
    if need > 0.8 * free_memory(device):
        raise ConfigError(f"--slq-steps {args.slq_steps}: the Lanczos basis needs {need / 1e9:.1f} GB but "
                          f"{free_memory(device) / 1e9:.1f} GB are free on {device}; lower --slq-steps")
    settings = settings_of(args, root, n, device)
    space = ("every parameter" if args.params is None else
             f"the parameters under {' '.join(args.params)} ({len(selected[0])} tensors, {dim:,} of {total:,})")
    say(f"Hessian of the mean cross-entropy over {args.samples} of {n} training images (indices i * {n} // "
        f"{args.samples}) of {root}, {dim / 1e6:.2f}M parameters ({space}), {args.dtype} on {device}; products by "
        f"{'double backward' if args.hvp == 'reverse' else 'forward-over-reverse'} in chunks of "
        f"{min(args.batch_size, args.samples)}")
    results = []
    for (model, _, label), path, names in zip(models, args.checkpoint, selected):
        model = model.to(dtype).eval()
        op = HessianOperator(model, inputs, labels, args.batch_size, args.hvp, select=names)
        results.append(study(op, args, path, label))
        say(summary(results[-1], args.top))
        del op, model
    report_written(write_outputs(out, results, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
