"""The few-shot study's two heads, fitted per episode on the frozen features (`python -m seal_fast fewshot --head`,
docs/fewshot.md), and the episode batching both share.

- "logreg" (the default): the exact convex head. Each episode's features standardized on its support, then
  multinomial logistic regression (mean cross-entropy + l2/2 ||W||^2, bias unpenalized) solved to the optimum by
  transfer_probe.fit_logreg (Newton, float64): deterministic, no learning rate, epochs or batch order.
- "bscd": BSCD-FSL's own linear classifier as its published code trains it (IBM/cdfsl-benchmark, finetune.py at
  5cfa669, lines 25-33, 77, 85-139): a fresh nn.Linear(dim, ways) with PyTorch's default init per episode, on the raw
  (unstandardized) features of the frozen backbone in eval mode; torch.optim.SGD(lr 0.01, momentum 0.9, dampening
  0.9, weight_decay 0.001, every parameter, the bias included); nn.CrossEntropyLoss (mean over the batch); 100
  epochs, each over np.random.permutation(support size) in batches of 4 (the last one smaller), zero_grad / step per
  batch; then the argmax of the query logits. Their np.random.seed(10) (line 164) is --head-seed's default.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import free_memory

HEADS = ("logreg", "bscd")
# finetune.py @5cfa669: line 95 (the optimizer), 105 (epochs), 85 (batch size), 164 (the seed)
BSCD = {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 0.001, "epochs": 100, "batch_size": 4,
        "seed": 10}


def episode_accuracies(feats: torch.Tensor, idx: torch.Tensor, shots: int, l2: float, device: torch.device,
                       chunk: int, max_iter: int = 100, tol: float = 1e-6,
                       progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(query accuracy (%) of each episode [E], solver stats): a logistic-regression head fitted on each episode's
    standardized support (label = the class's position in the episode), chunk episodes at a time."""
    from tqdm import tqdm

    from .transfer_probe import NEWTON_MAX_VARS, fit_logreg

    e, ways, per = idx.shape
    if (min(ways * shots, feats.shape[1]) + 1) * ways > NEWTON_MAX_VARS:
        max_iter = None  # the L-BFGS fallback keeps its own limit
    queries = per - shots
    ys = torch.arange(ways, device=device).repeat_interleave(shots)
    yq = torch.arange(ways, device=device).repeat_interleave(queries)
    out, stats = [], {"fits": 0, "iterations_max": 0, "grad_max": 0.0, "converged": True}
    feats = feats.to(device)
    for lo in tqdm(range(0, e, chunk), desc="episodes", leave=False, disable=None if progress else True,
                   dynamic_ncols=True, file=sys.stderr):
        block = idx[lo:lo + chunk].to(device)
        n = len(block)
        xs = feats[block[:, :, :shots].reshape(n, -1)].double()
        xq = feats[block[:, :, shots:].reshape(n, -1)].double()
        mean, scale = support_standardizer(xs)
        xs, xq = (xs - mean) / scale, (xq - mean) / scale
        head = fit_logreg(xs, ys.expand(n, -1), ways, l2, max_iter=max_iter, tol=tol)
        pred = head.logits(xq).argmax(-1)
        out.append(100.0 * (pred == yq).double().mean(1).cpu())
        stats["fits"] += 1
        stats["iterations_max"] = max(stats["iterations_max"], head.iterations)
        stats["grad_max"] = max(stats["grad_max"], head.grad_max)
        stats["converged"] &= head.converged
    return torch.cat(out), stats


def support_standardizer(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per episode (xs [E, N, D]): the support's per-dimension mean and std [E, 1, D]; a dimension (near-)constant on
    the support keeps scale 1 (transfer.standardizer, batched)."""
    mean = xs.mean(1, keepdim=True)
    std = xs.std(1, keepdim=True, unbiased=False)
    big = std > 1e-6 * std.amax(2, keepdim=True).clamp_min(1e-30)
    return mean, torch.where(big, std, torch.ones_like(std))


def episode_chunk(ways: int, shots: int, queries: int, dim: int, device: torch.device, episodes: int) -> int:
    """Episodes per batched fit: their float64 features, span basis, Newton Hessian (3 copies) and work space in a
    quarter of the free memory (at most 1 GB on a CPU, where bigger blocks only cost page faults)."""
    span = min(ways * shots, dim)
    m = (span + 1) * ways
    return episodes_that_fit(8 * (ways * (shots + queries) * dim * 3 + dim * span + 3 * m * m), device, episodes)


def episodes_that_fit(per_episode: int, device: torch.device, episodes: int) -> int:
    """How many episodes of `per_episode` bytes fit in a quarter of the free memory (at most 1 GB on a CPU, where
    bigger blocks only cost page faults): at least 1, at most `episodes`."""
    budget = 0.25 * free_memory(device)
    if device.type != "cuda":
        budget = min(budget, 1e9)
    return int(max(1, min(episodes, budget // per_episode)))


# ----------------------------------------------------------------------------------------------
# BSCD-FSL's head: a linear layer trained by SGD, batched over episodes
# ----------------------------------------------------------------------------------------------


def bscd_chunk(ways: int, shots: int, queries: int, dim: int, device: torch.device, episodes: int,
               settings: dict = BSCD) -> int:
    """Episodes trained together by bscd_train: their float32 support and query features, parameters, gradients and
    momentum buffers, and batch orders in a quarter of the free memory (at most 1 GB on a CPU)."""
    support = ways * shots
    per_episode = 4 * (support * dim + ways * queries * dim + 8 * ways * dim) + 8 * settings["epochs"] * support
    return episodes_that_fit(per_episode, device, episodes)


def bscd_init(episodes: int, dim: int, ways: int, generator: torch.Generator,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [E, ways, dim], bias [E, ways]): nn.Linear(dim, ways)'s default init (its reset_parameters: kaiming
    uniform with a = sqrt(5) for the weight, U(-1/sqrt(dim), 1/sqrt(dim)) for the bias), drawn episode after episode
    from `generator` in that order (weight then bias), as E successive nn.Linear(dim, ways) would draw them: in
    float32, PyTorch's default dtype (the draws differ by dtype), then cast to `dtype`."""
    w = torch.empty(episodes, ways, dim, dtype=torch.float32)
    b = torch.empty(episodes, ways, dtype=torch.float32)
    bound = 1 / math.sqrt(dim)
    for e in range(episodes):
        torch.nn.init.kaiming_uniform_(w[e], a=math.sqrt(5), generator=generator)
        torch.nn.init.uniform_(b[e], -bound, bound, generator=generator)
    return w.to(dtype), b.to(dtype)


def bscd_permutations(rng: np.random.RandomState, episodes: int, support: int, epochs: int) -> np.ndarray:
    """[E, epochs, support]: each episode's np.random.permutation(support) per epoch, drawn episode after episode
    (all epochs of one, then the next) from `rng`, as finetune.py's loop draws them from numpy's global state."""
    return np.stack([np.stack([rng.permutation(support) for _ in range(epochs)]) for _ in range(episodes)])


def bscd_train(xs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, perms: np.ndarray,
               settings: dict = BSCD) -> tuple[torch.Tensor, torch.Tensor]:
    """Train E independent linear heads as finetune.py trains one: xs [E, S, D] support features, ys [S] their
    labels, weight / bias the initial parameters (left untouched), perms [E, epochs, S]. The E episodes step together;
    their losses are summed, so each one's gradient is its own batch-mean cross-entropy's, and torch.optim.SGD's
    update is elementwise, so each episode gets exactly the update its own optimizer would. Returns the final
    (weight, bias)."""
    e, s, _ = xs.shape
    w = weight.clone().to(xs.device).requires_grad_(True)
    b = bias.clone().to(xs.device).requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=settings["lr"], momentum=settings["momentum"], dampening=settings["dampening"],
                          weight_decay=settings["weight_decay"])
    order = torch.from_numpy(perms).to(xs.device)
    rows = torch.arange(e, device=xs.device)[:, None]
    with torch.enable_grad():
        for epoch in range(perms.shape[1]):
            for j in range(0, s, settings["batch_size"]):
                sel = order[:, epoch, j:j + settings["batch_size"]]                  # [E, B]
                opt.zero_grad()
                logits = torch.baddbmm(b[:, None, :], xs[rows, sel], w.transpose(1, 2))
                loss = F.cross_entropy(logits.flatten(0, 1), ys[sel].flatten(), reduction="none")
                loss.view(e, -1).mean(1).sum().backward()
                opt.step()
    return w.detach(), b.detach()


def bscd_episode_accuracies(feats: torch.Tensor, idx: torch.Tensor, shots: int, device: torch.device, chunk: int,
                            seed: int = BSCD["seed"], settings: dict = BSCD, dtype: torch.dtype = torch.float32,
                            progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(query accuracy (%) of each episode [E], stats): BSCD-FSL's linear head trained on each episode's raw support
    features. The inits (torch.Generator seeded `seed`) and the batch orders (np.random.RandomState(seed)) are drawn
    episode after episode, so they do not depend on `chunk`, and every checkpoint gets the same ones."""
    from tqdm import tqdm

    e, ways, per = idx.shape
    queries, support = per - shots, ways * shots
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.RandomState(seed)
    ys = torch.arange(ways, device=device).repeat_interleave(shots)
    yq = torch.arange(ways, device=device).repeat_interleave(queries)
    feats = feats.to(device, dtype)
    out = []
    for lo in tqdm(range(0, e, chunk), desc="episodes (SGD)", leave=False, disable=None if progress else True,
                   dynamic_ncols=True, file=sys.stderr):
        block = idx[lo:lo + chunk].to(device)
        n = len(block)
        w0, b0 = bscd_init(n, feats.shape[1], ways, gen, dtype)
        perms = bscd_permutations(rng, n, support, settings["epochs"])
        xs = feats[block[:, :, :shots].reshape(n, -1)]
        w, b = bscd_train(xs, ys, w0.to(device), b0.to(device), perms, settings)
        logits = torch.baddbmm(b[:, None, :], feats[block[:, :, shots:].reshape(n, -1)], w.transpose(1, 2))
        out.append(100.0 * (logits.argmax(-1) == yq).double().mean(1).cpu())
    steps = settings["epochs"] * math.ceil(support / settings["batch_size"])
    return torch.cat(out), {"head": "bscd", "sgd_steps": steps, "dtype": str(dtype).removeprefix("torch."),
                            "seed": seed, **{k: v for k, v in settings.items() if k != "seed"}}
