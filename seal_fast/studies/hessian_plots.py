"""spectrum.png of `python -m seal_fast hessian`: the Hessian eigenvalue density of each checkpoint, smoothed from the
SLQ nodes and weights as PyHessian does (density_curve). hessian.py imports this module, never the other way."""

from __future__ import annotations

import math
import os

import numpy as np


def _support(nodes: list[list[float]], overhead: float = 0.01) -> tuple[float, float]:
    """PyHessian's density range: the mean over runs of the smallest / largest node, widened by `overhead`."""
    return (float(np.mean([min(n) for n in nodes])) - overhead, float(np.mean([max(n) for n in nodes])) + overhead)


def smoothing_variance(nodes: list[list[float]], sigma_squared: float = 1e-5, overhead: float = 0.01) -> float:
    """The variance of PyHessian's Gaussian kernel: sigma_squared x max(1, the density's range)."""
    lam_min, lam_max = _support(nodes, overhead)
    return sigma_squared * max(1.0, lam_max - lam_min)


def density_curve(nodes: list[list[float]], weights: list[list[float]], grid: np.ndarray | None = None,
                  num_bins: int = 10000, sigma_squared: float = 1e-5, overhead: float = 0.01):
    """PyHessian's density_generate: each node a Gaussian of variance sigma_squared x max(1, width) (width: the mean
    over runs of max node - min node, plus 2 x overhead), weighted, averaged over runs, normalized to integrate to
    1 over PyHessian's uniform grid of num_bins points. Evaluated on `grid` (default: that uniform grid).
    Returns (grid, density)."""
    lam_min, lam_max = _support(nodes, overhead)
    variance = smoothing_variance(nodes, sigma_squared, overhead)
    uniform = np.linspace(lam_min, lam_max, num=num_bins)

    def evaluate(x: np.ndarray) -> np.ndarray:
        total = np.zeros_like(x, dtype=np.float64)
        for nd, wt in zip(nodes, weights):
            nd, wt = np.asarray(nd, dtype=np.float64), np.asarray(wt, dtype=np.float64)
            for lo in range(0, len(x), 2048):
                xs = x[lo:lo + 2048, None]
                total[lo:lo + 2048] += (np.exp(-(xs - nd[None]) ** 2 / (2 * variance)) * wt[None]).sum(1)
        return total / (len(nodes) * math.sqrt(2 * math.pi * variance))

    norm = float(evaluate(uniform).sum() * (uniform[1] - uniform[0]))
    grid = uniform if grid is None else np.asarray(grid, dtype=np.float64)
    return grid, evaluate(grid) / norm


def _linthresh(rows: list[dict]) -> float:
    """The symmetric-log axis is linear within +-linthresh: the power of ten at or below the smoothing kernel's
    standard deviation (the density has no detail finer than that)."""
    sigma = min(np.sqrt(smoothing_variance(r["density"]["nodes"])) for r in rows if r["density"]["nodes"])
    return float(10.0 ** np.floor(np.log10(sigma)))


def _grid(lo: float, hi: float, linthresh: float, points: int = 2000) -> np.ndarray:
    """Points evenly spaced on the symmetric-log axis between lo and hi (the density's peaks come from the nodes)."""
    parts = [np.linspace(max(lo, -linthresh), min(hi, linthresh), 200)]
    if hi > linthresh:
        parts.append(np.logspace(np.log10(linthresh), np.log10(hi), points))
    if lo < -linthresh:
        parts.append(-np.logspace(np.log10(linthresh), np.log10(-lo), points))
    return np.concatenate(parts)


def plot_spectrum(rows: list[dict], path: str | os.PathLike) -> None:
    """One line per checkpoint: PyHessian's smoothed SLQ density (density_curve above) on a symmetric-log
    eigenvalue axis and a log density axis (+1e-7, as PyHessian plots it); the top eigenvalue dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import _save

    linthresh = _linthresh(rows)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in rows:
        nodes, weights = r["density"]["nodes"], r["density"]["weights"]
        if not nodes:
            continue
        uniform, _ = density_curve(nodes, weights)
        flat = np.concatenate([np.asarray(n, dtype=np.float64) for n in nodes])
        grid = np.unique(np.concatenate([uniform, _grid(uniform[0], uniform[-1], linthresh), flat]))
        grid, density = density_curve(nodes, weights, grid=grid)
        top, trace = r["top_eigenvalues"][0], r["trace"]["mean"]
        (line,) = ax.plot(grid, density + 1e-7, lw=1.2, label=f"{r['label']}: top {top:.4g}, trace {trace:.4g}")
        ax.axvline(top, color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_yscale("log")
    ax.margins(x=0.04)
    ax.set_xlabel(f"eigenvalue (symmetric log axis, linear within ±{linthresh:.0e}: the smoothing's scale; "
                  "dotted: top eigenvalue)", fontsize=9)
    ax.set_ylabel("density (log scale)")
    s = rows[0]["settings"]
    ax.set_title(f"Hessian eigenvalue density (SLQ, {s['slq_runs']} x {s['slq_steps']} steps, "
                 f"{s['samples']} training images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
