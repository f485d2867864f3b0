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
Choices the slides and the paper leave open, and ours (docs/pof.md gives the sources, line by line):
- The loss (--loss): by default the one the checkpoint was trained with, the cross-entropy with the label
  smoothing its config records (0.1 for our runs), so that theta0 is near a minimum of the searched loss; --loss ce
  is the plain cross-entropy of the official code (train.py L637). The same loss serves the search and the update.
- B's BatchNorm (--bn-mode): train (the official code: its search runs inside train(), after .train(), L402-416),
  so B's features use B's own batch statistics, like the B~ update, and B's forward also moves the running
  statistics (as in the official code; they are not restored); eval: the running statistics, untouched. B's
  features are computed once per step under no_grad; the search only re-evaluates the classifier on them.
- Line search: L at xi = 0, then xi = xi0 * 2^k (xi0 = --xi0, 1e-3 x |theta0|) while 2^k < --search-cap (100, the
  official code's ceiling, L372: points 1..64 x xi0) until the loss rises above the previous point; the minimum is
  bracketed by the two points before the rise, where --refine evenly spaced points are evaluated and the smallest
  loss wins (xi* = 0 when the first step already raises the loss). When the loss still falls at the last point
  below the cap, the step is skipped (phi is not updated on that B~) and counted ("skipped" per epoch).
- The slides' "x n" beside the normalized gradient is not explained there; we take one B per step.
- Defaults: 50 epochs (the paper); lr 1.6e-4 = 0.1 x 0.2^4: the official schedule (init_lr 0.1, lr_drop_rate 0.2
  at epochs 60/120/160/200, train.py L51-53, L221-228) post-trains from start_epoch 200 (L82), after the fourth
  drop; our cosine runs end near 0, so give --lr for your schedule. The training set and augmentation of the run,
  B and B~ drawn from two independently seeded epoch orders.
The output folder holds a seal_fast checkpoint (last.pt, schema 2: depth / transfer / fewshot / hessian read
it; its config is the source run's with method "<method>+pof" and the PoF settings, loss and BN mode included),
metrics.jsonl (per epoch: loss, xi*, skipped steps), curves.png; `--resume` continues exactly after a kill.
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
from ..files import write_whole
from ..plots import plot_curves
from ..rundir import rewrite_metrics
from ..runtime import default_workers, lock_folder, pick_device
from .command import open_output, require_checkpoints, study_main, study_parser


@dataclass
class PofConfig:
    checkpoint: str
    data: str | None = None
    out: str | None = None
    epochs: int = 50              # the paper's post-training length
    lr: float = 1.6e-4            # 0.1 x 0.2^4: the official schedule after its 4th drop (module docstring)
    momentum: float = 0.9         # Nesterov
    weight_decay: float = 5e-4    # on phi only
    batch_size: int = 64          # B~, the training batch
    search_batch: int = 256       # B, the line-search batch
    scale: float = 2.0            # s: the update goes through theta0 - s xi* g_hat
    xi0: float = 1e-3             # first search step, times |theta0|
    search_cap: float = 100.0     # the search tries xi0 * 2^k while 2^k < search_cap (official: 100)
    refine: int = 8
    loss: str = "checkpoint"      # checkpoint: the label smoothing the run trained with; ce: plain cross-entropy
    bn_mode: str = "train"        # BatchNorm of batch B: train (official; batch statistics) or eval
    seed: int = 0
    device: str = "auto"
    workers: int = -1
    loader: str = "auto"


# ---- the algorithm, as pure functions (tested one by one) -------------------------------------------


def classifier_loss(feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(F.linear(feats, weight, bias), y, label_smoothing=label_smoothing)


def normalized_gradient(feats, y, weight, bias, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """g_hat at theta0 = (weight, bias): dL_B/dtheta over its norm (one norm for weight and bias together)."""
    w, b = weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    gw, gb = torch.autograd.grad(classifier_loss(feats.detach(), y, w, b, label_smoothing), (w, b))
    norm = torch.sqrt((gw * gw).sum() + (gb * gb).sum()).clamp_min(1e-12)
    return gw / norm, gb / norm


@torch.no_grad()
def line_search(loss_at, xi0: float, cap: float = 100.0, refine: int = 8) -> float | None:
    """argmin over xi >= 0 of loss_at(xi): grow xi0 * 2^k (k = 0, 1, ... while 2^k < cap) until the loss rises above
    the previous point, then take the smallest of `refine` evenly spaced points over the bracket [xi_{k-2}, xi_k]
    (0 when the first step already rises). None when the loss still has not risen at the last point below the cap:
    the caller skips the step (the official code's ceiling, lr_search >= 100)."""
    points = [0.0]
    losses = [float(loss_at(0.0))]
    k = 0
    while 2.0 ** k < cap:
        points.append(xi0 * 2.0 ** k)
        losses.append(float(loss_at(points[-1])))
        if losses[-1] > losses[-2]:
            break
        k += 1
    else:
        return None
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


def search_features(model, x: torch.Tensor, bn_mode: str) -> torch.Tensor:
    """B's features under no_grad, BatchNorm in `bn_mode`: train (B's batch statistics; the running statistics
    move, as in the official code) or eval (the running statistics, untouched)."""
    model.train(bn_mode == "train")
    with torch.no_grad():
        return backbone(model, x)


def pof_step(model, theta0: tuple[torch.Tensor, torch.Tensor], optimizer, batch_b, batch_bt, cfg: PofConfig,
             label_smoothing: float = 0.0) -> dict:
    """One PoF step: search on B, update phi on B~ through theta0 - s xi* g_hat. fc is never written. When the
    search reaches its cap the step is skipped ({"loss": None, "xi": None}): phi, its optimizer and B~ untouched."""
    w0, b0 = theta0
    x, y = batch_b
    feats = search_features(model, x, cfg.bn_mode)
    gw, gb = normalized_gradient(feats, y, w0, b0, label_smoothing)
    size = math.sqrt(float((w0 * w0).sum() + (b0 * b0).sum()))
    xi = line_search(lambda v: classifier_loss(feats, y, w0 - v * gw, b0 - v * gb, label_smoothing), cfg.xi0 * size,
                     cfg.search_cap, cfg.refine)
    model.train()
    if xi is None:
        return {"loss": None, "xi": None}
    xt, yt = batch_bt
    optimizer.zero_grad(set_to_none=True)
    loss = classifier_loss(backbone(model, xt), yt, w0 - cfg.scale * xi * gw, b0 - cfg.scale * xi * gb,
                           label_smoothing)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "xi": xi}


def resolve_loss(cfg: PofConfig, src_cfg: dict, path: str) -> tuple[float, str]:
    """(label smoothing, a phrase naming the loss): --loss checkpoint reads label_smoothing from the run's config."""
    if cfg.loss == "ce":
        return 0.0, "plain cross-entropy (--loss ce)"
    smoothing = src_cfg.get("label_smoothing")
    if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ConfigError(f"--loss checkpoint: {path}'s config records no label_smoothing (found {smoothing!r}); "
                          "pass --loss ce for the plain cross-entropy")
    return float(smoothing), f"cross-entropy with label smoothing {smoothing:g} (the checkpoint's, --loss checkpoint)"


# ---- the command ------------------------------------------------------------------------------------


def feature_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("fc.")]


@torch.no_grad()
def evaluate(model, loader, label_smoothing: float = 0.0) -> tuple[float, float]:
    model.eval()
    loss, right, n = 0.0, 0, 0
    for x, y in loader.epoch(0):
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing))
        right += int((logits.argmax(1) == y).sum())
        n += y.shape[0]
    return loss / n, right / n


FLAGS = (("epochs", int, "post-training epochs (the paper's 50)"),
         ("batch_size", int, "B~, the batch phi is updated on"),
         ("search_batch", int, "B, the batch of the line search (official: 256)"),
         ("refine", int, "evenly spaced points evaluated inside the search's bracket"),
         ("seed", int, "the epoch orders of B~ and B"),
         ("workers", int, "data-loader workers (-1: the machine's default)"),
         ("lr", float, "SGD learning rate of phi: 0.1 x 0.2^4, the official schedule after its 4th drop"),
         ("momentum", float, "Nesterov momentum"), ("weight_decay", float, "weight decay on phi"),
         ("scale", float, "s: phi is trained through theta0 - s xi* g_hat"),
         ("xi0", float, "the search's first step, times |theta0|"))


def parse(argv: list[str] | None) -> tuple[PofConfig, bool, bool]:
    d = PofConfig(checkpoint="")
    p = study_parser("pof", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a seal_fast last.pt / best.pt / gen<G>.pt to post-train")
    p.add_argument("--data", help="tiny-imagenet-200 folder (default: the one the checkpoint trained on)")
    p.add_argument("--out", help="output folder (default runs/pof-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the post-training in --out exactly")
    for name, kind, what in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{what} (default {getattr(d, name):g})")
    p.add_argument("--search-cap", type=float, default=d.search_cap,
                   help="the line search tries xi0 x 2^k while 2^k < this; a loss still falling there skips the "
                        "step (default 100, the official code's)")
    p.add_argument("--loss", choices=("checkpoint", "ce"), default=d.loss,
                   help="checkpoint: the cross-entropy with the label smoothing the checkpoint trained with "
                        "(default); ce: plain cross-entropy (the official code's)")
    p.add_argument("--bn-mode", choices=("train", "eval"), default=d.bn_mode,
                   help="BatchNorm of the search batch B: train (batch statistics, running statistics updated; "
                        "the official code's, default) or eval (running statistics)")
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
    if not cfg.search_cap > 1:
        raise ConfigError(f"--search-cap {cfg.search_cap}: must be above 1 (the search tries xi0 x 2^k while "
                          "2^k < the cap)")
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out DIR: the post-training folder to continue")
    return cfg, resume, trust


def check_resume(cfg: PofConfig, out, resume: bool, trust: bool):
    """The saved state to continue (None for a fresh start); refuses changed settings or an occupied --out."""
    if not resume:
        if (out / "last.pt").exists():
            raise ConfigError(f"--out {out} already holds a post-training (last.pt): add --resume, or choose "
                              "another --out")
        return None
    state = checkpoint.read(out / "last.pt", resumable=True, trust=trust)
    saved = state.config["pof"]
    differ = [k for k, v in asdict(cfg).items() if k not in ("out", "device", "workers", "loader")
              and saved.get(k) != v]
    if differ:
        raise ConfigError(f"--resume {out}: settings differ from the saved post-training ({', '.join(differ)}); "
                          "resume with the same command")
    return state


def setup(cfg: PofConfig, device, trust: bool):
    """(model with fc frozen, its config, label, data root, main loaders, search loaders)."""
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
    for p in model.fc.parameters():
        p.requires_grad_(False)
    return model, src_cfg, label, root, main, search


def run_epoch(model, theta0, optimizer, main, search, cfg: PofConfig, epoch: int, smoothing: float) -> dict:
    """One epoch over B~ (the training loader), B cycling through the search loader's own epoch orders: the
    losses and xi* of the steps done, and the count of steps skipped at the search cap."""
    b_iter = iter(())
    cycle = 0
    losses, xis, skipped = [], [], 0
    bar = tqdm(main.train.epoch(epoch), total=len(main.train), desc=f"PoF epoch {epoch + 1}/{cfg.epochs}",
               leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)
    for xt, yt in bar:
        batch_b = next(b_iter, None)
        if batch_b is None:  # B cycles through its own epoch orders: (epoch, cycle) fixes each one
            b_iter = iter(search.train.epoch(epoch * 1000 + cycle))
            cycle += 1
            batch_b = next(b_iter)
        r = pof_step(model, theta0, optimizer, batch_b, (xt, yt), cfg, smoothing)
        if r["xi"] is None:
            skipped += 1
            continue
        losses.append(r["loss"])
        xis.append(r["xi"])
    bar.close()
    nan = float("nan")
    return {"train_loss": float(torch.stack(losses).mean()) if losses else nan, "xi_mean": sum(xis) / len(xis)
            if xis else nan, "xi_max": max(xis) if xis else nan, "steps": len(xis), "skipped": skipped}


def run(argv: list[str] | None = None) -> int:
    cfg, resume, trust = parse(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    require_checkpoints([cfg.checkpoint])
    device = pick_device(cfg.device)
    out = open_output(cfg.out, "pof")
    lock = lock_folder(out)  # noqa: F841 - held until the process ends
    state = check_resume(cfg, out, resume, trust)
    model, src_cfg, label, root, main, search = setup(cfg, device, trust)
    smoothing, loss_name = resolve_loss(cfg, src_cfg, cfg.checkpoint)
    theta0 = (model.fc.weight.detach().clone(), model.fc.bias.detach().clone())
    optimizer = torch.optim.SGD(feature_params(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    run_cfg = dict(src_cfg, method=f"{src_cfg.get('method', '?')}+pof", data=root,
                   pof=dict(asdict(cfg), source=str(cfg.checkpoint), source_label=label, label_smoothing=smoothing,
                            loss_used=loss_name))
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
        write_whole(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")
        val_loss, val_acc = evaluate(model, main.val, smoothing)
        say(f"before PoF: {label}: val loss {val_loss:.3f}, val top-1 {100 * val_acc:.2f}%")
    rewrite_metrics(out, history)
    say(f"PoF on {root}: {cfg.epochs} epochs x {len(main.train)} steps (B~ {cfg.batch_size}, B {cfg.search_batch}), "
        f"lr {cfg.lr:g}, s {cfg.scale}; loss: {loss_name}; B's BatchNorm in {cfg.bn_mode} mode; search cap "
        f"{cfg.search_cap:g} x xi0; fc fixed, {sum(p.numel() for p in feature_params(model)):,} feature-extractor "
        f"parameters move; device {device.type}; writing to {out}")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        ep = run_epoch(model, theta0, optimizer, main, search, cfg, epoch, smoothing)
        if ep["steps"] and not math.isfinite(ep["train_loss"]):
            raise DataError(f"the PoF loss became {ep['train_loss']} in epoch {epoch + 1}; lower --lr or --scale "
                            f"(last.pt still holds epoch {epoch})")
        val_loss, val_acc = evaluate(model, main.val, smoothing)
        row = {"generation": 0, "epoch": epoch, "global_epoch": epoch, "phase": "pof", **ep, "train_acc": float("nan"),
               "val_loss": val_loss, "val_acc": val_acc, "loss": loss_name, "label_smoothing": smoothing,
               "bn_mode": cfg.bn_mode, "seconds": time.perf_counter() - t0}
        history.append(row)
        st = checkpoint.RunState(model=model.state_dict(), config=run_cfg, next_epoch=epoch + 1,
                                 optimizer=optimizer.state_dict(), scaler=None, rng=checkpoint.rng_state(),
                                 best_val=max(r["val_acc"] for r in history), metrics=history)
        checkpoint.write_last(st, out)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        say(f"PoF epoch {epoch + 1}/{cfg.epochs}: loss through the moved classifier {ep['train_loss']:.3f}, "
            f"mean xi* {ep['xi_mean']:.4g} (max {ep['xi_max']:.4g}), {ep['skipped']} of "
            f"{ep['skipped'] + ep['steps']} steps skipped at the search cap | val loss {val_loss:.3f} top-1 "
            f"{100 * val_acc:.2f}% | {row['seconds']:.1f} s")
    finish(history, out, label, say)
    return 0


def finish(history: list[dict], out, label: str, say) -> None:
    plot_curves(history, out / "curves.png", title=f"PoF of {label}")
    if history:
        skipped = sum(r.get("skipped", 0) for r in history)
        steps = skipped + sum(r.get("steps", 0) for r in history)
        say(f"done: val top-1 {100 * history[-1]['val_acc']:.2f}% after {len(history)} PoF epochs; {skipped} of "
            f"{steps} steps skipped at the search cap; outputs: {out}/last.pt (a seal_fast checkpoint: depth / "
            "transfer / fewshot / hessian read it), metrics.jsonl, curves.png")


def main(argv: list[str] | None = None) -> int:
    return study_main(run, argv, "interrupted; the last finished epoch is in last.pt: continue with --resume --out DIR")


if __name__ == "__main__":
    sys.exit(main())
