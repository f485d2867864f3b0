"""The transfer study's linear probe (`python -m seal_fast transfer`, docs/transfer.md): the logistic-regression head
(batched over independent problems; Newton for small problems, full-batch L-BFGS otherwise), the held-out split,
the standardizer, the l2 grid walk and the scores (top-1 and mean per-class accuracy). The few-shot study's convex
head is the same fit_logreg."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import DataError

# Kornblith, Shlens & Le 2019 ("Do Better ImageNet Models Transfer Better?", section 3 / appendix): the L2 strength
# is chosen from 45 logarithmically spaced values between 1e-6 and 1e5, i.e. np.logspace(-6, 5, 45): every quarter
# decade. Largest first (the order the grid is walked in, warm-starting each fit from the previous one).
PAPER_GRID = [10.0 ** (e / 4) for e in range(20, -25, -1)]          # 1e5 .. 1e-6, 45 values
NARROW_GRID = [10.0 ** (e / 2) for e in range(2, -13, -1)]          # 1e1 .. 1e-6, every half decade: 15 values
DEFAULT_GRID = PAPER_GRID
HOLDOUT = 0.1
TOL = 1e-6
MAX_ITER = 1000  # L-BFGS iterations per fit at most


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


def mean_per_class(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean per-class accuracy in percent (Kornblith et al. 2019's metric for FGVC-Aircraft, Flowers102, Pets,
    Caltech-101): each class's share of its images predicted right, averaged over the classes that have an image in
    y (a class absent from the test set has no accuracy and is not counted)."""
    y = y.to(pred.device)
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    right = torch.zeros(len(classes), dtype=torch.float64, device=y.device)
    right.index_add_(0, inverse, (pred == y).double())
    return 100.0 * float((right / counts.double()).mean())


def scores(head: Head, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1, mean per-class accuracy), both in percent, of one problem's head on (x [M, D], y [M])."""
    pred = head.logits(x).argmax(-1)
    return 100.0 * float((pred == y.to(pred.device)).double().mean()), mean_per_class(pred, y)


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
    """The transfer study's protocol (transfer.py's docstring) on (features, labels) pairs; returns the result's
    fields. The l2 is chosen by top-1 on val; test top-1 and mean per-class accuracy are both reported."""
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
        acc, acc_mpc = scores(head, zval, yval)
        curve.append({"l2": l2, "val_top1": acc, "val_mean_per_class": acc_mpc, "solver": head.solver,
                      "iterations": head.iterations, "converged": head.converged})
        if best is None or acc > best[1]:
            best = (l2, acc, head)
    l2, val_acc, selected = best
    mean, scale = standardizer(xall)
    final = fit_logreg((xall - mean) / scale, yall, num_classes, l2, init=selected, max_iter=max_iter, tol=tol)
    xte, yte = test[0].to(device, dtype), test[1].to(device)
    test_top1, test_mpc = scores(final, (xte - mean) / scale, yte)
    return {"top1": test_top1, "mean_per_class": test_mpc, "l2": l2, "val_top1": val_acc, "val_source": val_source,
            "fit_images": len(yfit), "val_images": len(yval), "refit_images": len(yall), "test_images": len(yte),
            "grid": curve, "solver": {"method": final.solver, "iterations": final.iterations,
                                      "evaluations": final.evaluations, "grad_max": final.grad_max,
                                      "converged": final.converged},
            "train_top1": top1(final, (xall - mean) / scale, yall)}


