"""`python -m seal_fast pof`: PoF, post-training of the feature extractor (Sato, Yamada et al., ICML 2022).

    python -m seal_fast pof --checkpoint runs/normal/last.pt [--data DIR] --epochs N --out DIR [--resume]

After normal training, only the feature extractor phi (every parameter but `fc`) is trained further, through
a classifier moved past its own mini-batch optimum, so that the loss becomes flat in the classifier's
parameter space. The classifier keeps its trained value theta0 = (fc.weight, fc.bias) throughout. Each step,
as the slides' algorithm states it:
  1. On a mini-batch B (--search-batch, 256) take the gradient of the loss w.r.t. theta at theta0 and
     normalize it (one norm over weight and bias together): g_hat.
  2. Line search xi* = argmin_{xi >= 0} L_B(phi, theta0 - xi g_hat) (see `line_search`).
  3. Update phi on another mini-batch B~ (the training batch, --batch-size 64) with the loss evaluated through
     the classifier theta0 - s xi* g_hat (--scale s = 2: the slides find the test-set optimum at about twice
     the training one), by SGD with Nesterov momentum 0.9 and weight decay 5e-4 on phi only.
Choices the slides and the paper leave open, and ours:
- The loss is the plain cross-entropy (no label smoothing) for the search and the update.
- B's features are computed with the network in eval mode (BN running statistics, no update of them), once
  per step; the search then only re-evaluates the classifier on those features, so it costs one forward.
  B~ runs in train mode (BN statistics update, as in training).
- Line search: L at xi = 0, then xi = xi0 * 2^k (xi0 = --xi0, 1e-3 x |theta0|; k = 0..--max-doublings) until
  the loss rises; the minimum is bracketed by the two points before the rise, where --refine evenly spaced
  points are evaluated and the smallest loss wins (xi* = 0 when the first step already raises the loss).
- The slides' "x n" beside the normalized gradient is not explained there; we take one B per step.
- Defaults: 50 epochs (the paper), lr 0.0008 (the last stage of a 0.1 x 0.2^3 step schedule, the paper's
  "last stage's small learning rate"; our cosine runs end near 0, so give --lr for your schedule), the
  training set and augmentation of the run, B and B~ drawn from two independently seeded epoch orders.
The output folder holds a seal_fast checkpoint (last.pt, schema 2: depth / transfer / fewshot / hessian read
it; its config is the source run's with method "<method>+pof" and the PoF settings), metrics.jsonl,
curves.png; `--resume` continues exactly after a kill.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import checkpoint
from ..data import build_loaders
from ..errors import ConfigError, DataError
from .features import load_model
from ..plots import plot_curves
from ..runtime import default_workers, lock_folder, pick_device
from .command import open_output, require_checkpoints, study_main, study_parser


@dataclass
class PofConfig:
    checkpoint: str
    data: str | None = None
    out: str | None = None
    epochs: int = 50              # the paper's post-training length
    lr: float = 0.0008            # the last stage's small learning rate (see the module docstring)
    momentum: float = 0.9         # Nesterov
    weight_decay: float = 5e-4    # on phi only
    batch_size: int = 64          # B~, the training batch
    search_batch: int = 256       # B, the line-search batch
    scale: float = 2.0            # s: the update goes through theta0 - s xi* g_hat
    xi0: float = 1e-3             # first search step, times |theta0|
    max_doublings: int = 30
    refine: int = 8
    seed: int = 0
    device: str = "auto"
    workers: int = -1
    loader: str = "auto"


# ---- the algorithm, as pure functions (tested one by one) -------------------------------------------


def classifier_loss(feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(feats, weight, bias), y)


def normalized_gradient(feats, y, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """g_hat at theta0 = (weight, bias): dL_B/dtheta over its norm (one norm for weight and bias together)."""
    w, b = weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    gw, gb = torch.autograd.grad(classifier_loss(feats.detach(), y, w, b), (w, b))
    norm = torch.sqrt((gw * gw).sum() + (gb * gb).sum()).clamp_min(1e-12)
    return gw / norm, gb / norm


@torch.no_grad()
def line_search(loss_at, xi0: float, max_doublings: int = 30, refine: int = 8) -> float:
    """argmin over xi >= 0 of loss_at(xi): grow xi0 * 2^k until the loss rises, then take the smallest of `refine`
    evenly spaced points over the bracket [xi_{k-2}, xi_k] (0 when the first step already rises)."""
    points = [0.0]
    losses = [float(loss_at(0.0))]
    for k in range(max_doublings + 1):
        xi = xi0 * 2.0 ** k
        points.append(xi)
        losses.append(float(loss_at(xi)))
        if losses[-1] > losses[-2]:
            break
    if len(points) < 3:       # the first step rose: the minimum lies in [0, xi0]
        lo, hi = 0.0, points[-1]
    else:                     # the loss fell until points[-2] and rose at points[-1]
        lo, hi = points[-3], points[-1]
    best_xi, best_loss = points[-2], losses[-2]
    for i in range(refine + 2):
        xi = lo + (hi - lo) * i / (refine + 1)
        value = float(loss_at(xi))
        if value < best_loss:
            best_xi, best_loss = xi, value
    return best_xi


def backbone(model, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a torchvision ResNet (everything before fc)."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    return torch.flatten(model.avgpool(h), 1)


def pof_step(model, theta0: tuple[torch.Tensor, torch.Tensor], optimizer, batch_b, batch_bt, cfg: PofConfig) -> dict:
    """One PoF step: search on B, update phi on B~ through theta0 - s xi* g_hat. fc is never written."""
    w0, b0 = theta0
    x, y = batch_b
    model.eval()
    with torch.no_grad():
        feats = backbone(model, x)
    gw, gb = normalized_gradient(feats, y, w0, b0)
    size = math.sqrt(float((w0 * w0).sum() + (b0 * b0).sum()))
    xi = line_search(lambda v: classifier_loss(feats, y, w0 - v * gw, b0 - v * gb), cfg.xi0 * size,
                     cfg.max_doublings, cfg.refine)
    model.train()
    xt, yt = batch_bt
    optimizer.zero_grad(set_to_none=True)
    loss = classifier_loss(backbone(model, xt), yt, w0 - cfg.scale * xi * gw, b0 - cfg.scale * xi * gb)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "xi": xi}


# ---- the command ------------------------------------------------------------------------------------


def feature_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("fc.")]


@torch.no_grad()
def evaluate(model, loader) -> tuple[float, float]:
    model.eval()
    loss, right, n = 0.0, 0, 0
    for x, y in loader.epoch(0):
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        right += int((logits.argmax(1) == y).sum())
        n += y.shape[0]
    return loss / n, right / n


def parse(argv: list[str] | None) -> tuple[PofConfig, bool, bool]:
    d = PofConfig(checkpoint="")
    p = study_parser("pof", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a seal_fast last.pt / best.pt / gen<G>.pt to post-train")
    p.add_argument("--data", help="tiny-imagenet-200 folder (default: the one the checkpoint trained on)")
    p.add_argument("--out", help="output folder (default runs/pof-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the post-training in --out exactly")
    for name in ("epochs", "batch_size", "search_batch", "max_doublings", "refine", "seed", "workers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "momentum", "weight_decay", "scale", "xi0"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--loader", choices=("auto", "torch", "cache", "dali"), default=d.loader)
    checkpoint.add_trust_flag(p)
    a = vars(p.parse_args(argv))
    resume, trust = a.pop("resume"), a.pop("trust_checkpoint")
    cfg = PofConfig(**a)
    for name in ("epochs", "batch_size", "search_batch", "refine"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.lr <= 0 or cfg.scale < 0 or cfg.xi0 <= 0 or not 0 <= cfg.momentum < 1 or cfg.weight_decay < 0:
        raise ConfigError("--lr and --xi0 must be positive, --scale and --weight-decay non-negative, "
                          "--momentum in [0, 1)")
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out DIR: the post-training folder to continue")
    return cfg, resume, trust


def run(argv: list[str] | None = None) -> int:
    cfg, resume, trust = parse(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    require_checkpoints([cfg.checkpoint])
    device = pick_device(cfg.device)
    out = open_output(cfg.out, "pof")
    lock = lock_folder(out)  # noqa: F841 - held until the process ends
    state = None
    if resume:
        state = checkpoint.read(out / "last.pt", resumable=True, trust=trust)
        saved = state.config["pof"]
        differ = [k for k, v in asdict(cfg).items() if k not in ("out", "device", "workers", "loader")
                  and saved.get(k) != v]
        if differ:
            raise ConfigError(f"--resume {out}: settings differ from the saved post-training ({', '.join(differ)}); "
                              "resume with the same command")
    elif (out / "last.pt").exists():
        raise ConfigError(f"--out {out} already holds a post-training (last.pt): add --resume, or choose another --out")
    model, src_cfg, label = load_model(cfg.checkpoint, device, trust=trust)
    if "fc" not in dict(model.named_children()):
        raise DataError(f"{cfg.checkpoint}: the model has no fc classifier to keep fixed")
    root = cfg.data or src_cfg.get("data")
    if root is None:
        from ..data.synthetic import ensure_synthetic
        root = str(ensure_synthetic()[0])
    workers = default_workers(cfg.workers)
    main = build_loaders(root, cfg.batch_size, cfg.seed, workers, device, kind=cfg.loader, eval_batch_size=256)
    search = build_loaders(root, cfg.search_batch, cfg.seed + 1_000_003, workers, device, kind=cfg.loader)
    if model.fc.out_features != len(main.classes):
        raise DataError(f"{cfg.checkpoint} predicts {model.fc.out_features} classes but {root} has "
                        f"{len(main.classes)}; pass the --data the checkpoint was trained on")
    theta0 = (model.fc.weight.detach().clone(), model.fc.bias.detach().clone())
    for p in model.fc.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(feature_params(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    run_cfg = dict(src_cfg, method=f"{src_cfg.get('method', '?')}+pof", data=root,
                   pof=dict(asdict(cfg), source=str(cfg.checkpoint), source_label=label))
    history: list[dict] = []
    start = 0
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        checkpoint.set_rng_state(state.rng)
        history, start = list(state.metrics), state.next_epoch
        theta0 = (state.model["fc.weight"].to(device), state.model["fc.bias"].to(device))
        say(f"resumed {out} at epoch {start} of {cfg.epochs}")
    else:
        (out / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n")
        val_loss, val_acc = evaluate(model, main.val)
        say(f"before PoF: {label}: val loss {val_loss:.3f}, val top-1 {100 * val_acc:.2f}%")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    say(f"PoF on {root}: {cfg.epochs} epochs x {len(main.train)} steps (B~ {cfg.batch_size}, B {cfg.search_batch}), "
        f"lr {cfg.lr}, s {cfg.scale}; fc fixed, {sum(p.numel() for p in feature_params(model)):,} feature-extractor "
        f"parameters move; device {device.type}; writing to {out}")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        b_iter = iter(())
        cycle = 0
        losses, xis = [], []
        bar = tqdm(main.train.epoch(epoch), total=len(main.train), desc=f"PoF epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)
        for xt, yt in bar:
            batch_b = next(b_iter, None)
            if batch_b is None:  # B cycles through its own epoch orders: (epoch, cycle) fixes each one
                b_iter = iter(search.train.epoch(epoch * 1000 + cycle))
                cycle += 1
                batch_b = next(b_iter)
            r = pof_step(model, theta0, optimizer, batch_b, (xt, yt), cfg)
            losses.append(r["loss"])
            xis.append(r["xi"])
        bar.close()
        train_loss = float(torch.stack(losses).mean())
        if not math.isfinite(train_loss):
            raise DataError(f"the PoF loss became {train_loss} in epoch {epoch + 1}; lower --lr or --scale "
                            f"(last.pt still holds epoch {epoch})")
        val_loss, val_acc = evaluate(model, main.val)
        row = {"generation": 0, "epoch": epoch, "global_epoch": epoch, "phase": "pof", "train_loss": train_loss,
               "train_acc": float("nan"), "val_loss": val_loss, "val_acc": val_acc, "xi_mean": sum(xis) / len(xis),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        st = checkpoint.RunState(model=model.state_dict(), config=run_cfg, next_epoch=epoch + 1,
                                 optimizer=optimizer.state_dict(), scaler=None, rng=checkpoint.rng_state(),
                                 best_val=max(r["val_acc"] for r in history), metrics=history)
        checkpoint.write_last(st, out)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        say(f"PoF epoch {epoch + 1}/{cfg.epochs}: loss through the moved classifier {train_loss:.3f}, "
            f"mean xi* {row['xi_mean']:.4g} | val loss {val_loss:.3f} top-1 {100 * val_acc:.2f}% | "
            f"{row['seconds']:.1f} s")
    plot_curves(history, out / "curves.png", title=f"PoF of {label}")
    if history:
        say(f"done: val top-1 {100 * history[-1]['val_acc']:.2f}% after {len(history)} PoF epochs; outputs: "
            f"{out}/last.pt (a seal_fast checkpoint: depth / transfer / fewshot / hessian read it), metrics.jsonl, "
            "curves.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv, "interrupted; the last finished epoch is in last.pt: continue with --resume --out DIR")


if __name__ == "__main__":
    sys.exit(main())
