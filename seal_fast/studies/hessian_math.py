"""The mathematics of `python -m seal_fast hessian`, apart from its command: Hessian-vector products of the mean
cross-entropy over a parameter subset (HessianOperator) and PyHessian's algorithms on any symmetric operator given
as v -> H v (power iteration with deflation, Hutchinson's trace, stochastic Lanczos quadrature). hessian.py (the
command) imports this module, never the other way; the definitions are in hessian.py's docstring."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ConfigError

Hvp = Callable[[torch.Tensor], torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Hessian-vector products of the mean cross-entropy, on flat vectors
# ----------------------------------------------------------------------------------------------


def select_params(names: list[str], prefixes: list[str] | None) -> list[str]:
    """The parameter names under any of the module-name `prefixes` (a name equal to one, or starting with it and a
    dot: "fc" selects fc.weight and fc.bias, "layer4.2" the last block of layer4), in `names`' order; all of them
    for None. A prefix that selects nothing is a ConfigError naming the model's top-level names."""
    if prefixes is None:
        return list(names)
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            top = ", ".join(dict.fromkeys(n.split(".")[0] for n in names))
            raise ConfigError(f"--params {prefix}: matches no parameter of the model; its top-level names are {top} "
                              "(a prefix may also go deeper, e.g. layer4.2)")
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


class HessianOperator:
    """v -> H v, H the Hessian of the mean cross-entropy of `model` (as it is: call .eval() first for the study's
    definition) over (inputs, labels) w.r.t. the parameters named in `select` (default: every parameter; the others
    held at their values), for flat vectors v in named_parameters() order of those. Chunks of `batch_size`
    samples; each chunk's product is computed by torch.func and summed into the result."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mode: str = "reverse", select: list[str] | None = None):
        if mode not in ("reverse", "forward"):
            raise ValueError(f"mode {mode!r}: reverse (vjp of grad) or forward (jvp of grad)")
        self.model, self.inputs, self.labels = model, inputs, labels
        self.batch_size, self.mode = batch_size, mode
        every = {n: p.detach() for n, p in model.named_parameters()}
        self.names = list(every) if select is None else [n for n in every if n in set(select)]
        if not self.names:
            raise ValueError("no parameter selected")
        self.params = {n: every[n] for n in self.names}
        self.fixed = {n: p for n, p in every.items() if n not in self.params}  # held constant
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.shapes = [self.params[n].shape for n in self.names]
        self.numels = [self.params[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.count = 0  # products computed so far

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.params)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into v, one per parameter (no copy)."""
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(v, self.numels), self.shapes)}

    def _chunk_loss(self, params, x, y):
        logits = torch.func.functional_call(self.model, (self.fixed, params, self.buffers), (x,))
        return F.cross_entropy(logits, y, reduction="sum") / len(self.labels)

    def chunks(self):
        for lo in range(0, len(self.labels), self.batch_size):
            yield self.inputs[lo:lo + self.batch_size], self.labels[lo:lo + self.batch_size]

    @torch.no_grad()
    def loss(self) -> float:
        """L at the model's parameters (mean cross-entropy over all the samples)."""
        return float(sum(self._chunk_loss(self.params, x, y) for x, y in self.chunks()))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of {self.dim} entries, got {tuple(v.shape)}")
        tangents = self.unflatten(v.to(self.dtype))
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        out_views = self.unflatten(out)
        for x, y in self.chunks():
            grad_fn = torch.func.grad(lambda p: self._chunk_loss(p, x, y))  # noqa: B023 - used at once
            if self.mode == "reverse":
                _, pullback = torch.func.vjp(grad_fn, self.params)
                hv = pullback(tangents)[0]
            else:
                with warnings.catch_warnings():  # torch's forward-AD decompositions still call torch.jit.script
                    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
                    hv = torch.func.jvp(grad_fn, (self.params,), (tangents,))[1]
            for n in self.names:
                out_views[n].add_(hv[n])
            del hv
        self.count += 1
        return out


# ----------------------------------------------------------------------------------------------
# The algorithms (PyHessian's), on any symmetric operator given as v -> H v
# ----------------------------------------------------------------------------------------------


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _orthonormalize(v: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """v made orthogonal to the rows of `basis` (orthonormal), then normalized; Gram-Schmidt twice ("twice is
    enough"), which in exact arithmetic is PyHessian's single pass."""
    if basis is not None and len(basis):
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
    return _normalize(v)


def _rademacher(dim: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    return torch.randint(0, 2, (dim,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)


@dataclass
class Eigen:
    values: list[float]       # in the order found (largest magnitude first)
    iterations: list[int]     # products used for each
    converged: list[bool]     # relative change < tol before max_iter
    vectors: torch.Tensor     # [top, dim], orthonormal rows


def top_eigenvalues(hvp: Hvp, dim: int, top: int = 1, max_iter: int = 100, tol: float = 1e-3,
                    gen: torch.Generator | None = None, dtype=torch.float32, device="cpu", desc: str = "") -> Eigen:
    """PyHessian's hessian.eigenvalues: for each of the top eigenvalues, power iteration from a normalized Gaussian
    vector, orthonormalized against the eigenvectors found before every product; the estimate is the Rayleigh
    quotient v^T H v, stopped when |previous - estimate| / (|previous| + 1e-6) < tol. (PyHessian returns the
    estimate before the last; this returns the last, which differs from it by less than tol.)"""
    if not 1 <= top <= dim:
        raise ConfigError(f"--top {top}: choose 1 to {dim} (the number of parameters)")
    values, iters, conv = [], [], []
    basis = torch.empty(0, dim, dtype=dtype, device=device)
    for k in range(top):
        v = _normalize(torch.randn(dim, generator=gen, dtype=dtype, device=device))
        estimate, done, used = None, False, 0
        with _bar(max_iter, f"{desc}eigenvalue {k + 1}/{top}") as bar:
            for _ in range(max_iter):
                v = _orthonormalize(v, basis)
                hv = hvp(v)
                current = float(torch.dot(hv, v))
                used += 1
                bar.update()
                bar.set_postfix(eigenvalue=f"{current:.5g}", refresh=False)
                v = _normalize(hv)
                if estimate is not None and abs(estimate - current) / (abs(estimate) + 1e-6) < tol:
                    estimate, done = current, True
                    break
                estimate = current
        values.append(estimate)
        iters.append(used)
        conv.append(done)
        basis = torch.cat([basis, _orthonormalize(v, basis)[None]])
    return Eigen(values, iters, conv, basis)


@dataclass
class Trace:
    estimates: list[float]    # z^T H z, one per Rademacher vector
    converged: bool

    @property
    def mean(self) -> float:
        return float(np.mean(self.estimates))

    @property
    def std(self) -> float:
        return float(np.std(self.estimates, ddof=1)) if len(self.estimates) > 1 else 0.0

    @property
    def stderr(self) -> float:
        """The standard error of the mean: std / sqrt(vectors)."""
        return self.std / math.sqrt(len(self.estimates))


def hutchinson_trace(hvp: Hvp, dim: int, max_iter: int = 100, tol: float = 1e-3, gen: torch.Generator | None = None,
                     dtype=torch.float32, device="cpu", desc: str = "") -> Trace:
    """PyHessian's hessian.trace: z^T H z over Rademacher vectors z until the running mean changes by less than tol
    (relative: |mean - previous mean| / (|previous mean| + 1e-6), the first previous mean being 0)."""
    estimates, previous = [], 0.0
    with _bar(max_iter, f"{desc}trace") as bar:
        for _ in range(max_iter):
            z = _rademacher(dim, gen, dtype, device)
            estimates.append(float(torch.dot(hvp(z), z)))
            mean = float(np.mean(estimates))
            bar.update()
            bar.set_postfix(trace=f"{mean:.5g}", refresh=False)
            if abs(mean - previous) / (abs(previous) + 1e-6) < tol:
                return Trace(estimates, True)
            previous = mean
    return Trace(estimates, False)


def lanczos(hvp: Hvp, v0: torch.Tensor, steps: int, bar=None) -> tuple[list[float], list[float]]:
    """Lanczos with full reorthogonalization from v0 (normalized here): (alphas [m], betas [m-1]), m <= steps. Stops
    early when the Krylov space is invariant (beta below 100 x machine epsilon x the largest |alpha| or beta so
    far), where the quadrature is already exact; PyHessian would restart from a random vector there, which only
    adds nodes of weight 0."""
    dim = v0.numel()
    steps = min(steps, dim)
    basis = torch.empty(steps, dim, dtype=v0.dtype, device=v0.device)
    basis[0] = _normalize(v0)
    alphas, betas = [], []
    eps = torch.finfo(v0.dtype).eps
    w = None
    for j in range(steps):
        if j > 0:
            beta = float(w.norm())
            scale = max([abs(a) for a in alphas] + betas)
            if beta <= 100 * eps * scale:
                break
            basis[j] = _orthonormalize(w / beta, basis[:j])
            betas.append(beta)
        v = basis[j]
        hv = hvp(v)
        alpha = float(torch.dot(hv, v))
        alphas.append(alpha)
        w = hv - alpha * v
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        if bar is not None:
            bar.update()
    return alphas, betas


def tridiagonal_quadrature(alphas: list[float], betas: list[float]) -> tuple[list[float], list[float]]:
    """(nodes, weights): the eigenvalues of the Lanczos tridiagonal matrix and the squared first components of its
    eigenvectors (weights sum to 1), ascending nodes, in float64."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        b = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(b, 1) + torch.diag(b, -1)
    nodes, vectors = torch.linalg.eigh(t)
    return nodes.tolist(), (vectors[0] ** 2).tolist()


@dataclass
class Density:
    nodes: list[list[float]] = field(default_factory=list)    # one list per SLQ run
    weights: list[list[float]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)            # Lanczos steps done in each run


def slq_density(hvp: Hvp, dim: int, runs: int = 1, steps: int = 100, gen: torch.Generator | None = None,
                dtype=torch.float32, device="cpu", desc: str = "") -> Density:
    """PyHessian's hessian.density: `runs` Lanczos runs of `steps` steps from normalized Rademacher vectors."""
    out = Density()
    for r in range(runs):
        v0 = _rademacher(dim, gen, dtype, device)
        with _bar(min(steps, dim), f"{desc}density run {r + 1}/{runs}") as bar:
            alphas, betas = lanczos(hvp, v0, steps, bar)
        nodes, weights = tridiagonal_quadrature(alphas, betas)
        out.nodes.append(nodes)
        out.weights.append(weights)
        out.steps.append(len(alphas))
    return out


