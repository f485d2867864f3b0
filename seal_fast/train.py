"""`python -m seal_fast.train`: the SEAL / LLF / normal trainer. Read top to bottom:

1. command line -> Config (config.py) -> plan (schedule.py)
2. setup: output folder, device, data, model, optimizer, resume
3. the optimizer seam: one place builds the optimizer and applies a plan entry to it
4. one training epoch, evaluation: the step itself is step.training_step (graphed on CUDA)
5. Trainer.fit: plan entry by plan entry, atomic checkpoint after every epoch; run() is the entry point

Data-parallel on one node: `torchrun --nproc_per_node N -m seal_fast.train ...` (distributed.py): the
global --batch-size is kept (N ranks x batch/N), BatchNorm is synchronized, rank 0 writes the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .config import DEMO_OVERRIDES, Config
from .data import build_loaders
from .data.synthetic import ensure_synthetic
from .errors import ConfigError, NonFiniteLossError, SealError, cli_main, one_line
from .models import build_model, reinit_in_place
from .optim import SignedSGD
from .plots import plot_curves
# build_parser: the trainer's parser, also importable from here
from .preflight import build_parser, check, check_batch, data_shortfall  # noqa: F401
from .precision import amp_dtype
from .rundir import Console, append_line, release_locks, rewrite_metrics, setup_out
from .runtime import apply_memory_fraction, default_workers, pick_device, provenance
from .schedule import Entry, build_plan, describe, plan_json, summary_lines
from .step import EvalStep, TrainStep, graph_support
from .tblog import TensorBoardLog

# ----------------------------------------------------------------------------------------------
# 1. Command line
# ----------------------------------------------------------------------------------------------


def dry_run(cfg: Config, plan_file: str | None) -> int:
    """--dry-run: the readable plan on stdout; with --plan-json FILE the per-epoch plan as JSON in FILE too."""
    plan = build_plan(cfg)
    print("\n".join(summary_lines(cfg, plan)))
    if plan_file:
        try:
            Path(plan_file).write_text(plan_json(cfg, plan))
        except OSError as exc:
            raise ConfigError(f"--plan-json {plan_file}: cannot write there ({exc.strerror or exc}); choose a file "
                              "in a folder you can write to") from None
        print(f"wrote the per-epoch plan to {plan_file}")
    return 0


# ----------------------------------------------------------------------------------------------
# 2. Setup
# ----------------------------------------------------------------------------------------------


def warn_if_partial(root: str, say) -> None:
    """A folder that is not the whole Tiny-ImageNet trains (the paper's full recipe only with --partial-data), but
    says so first: one line, classes and images found vs expected."""
    short = data_shortfall(root, detail=True)
    if short:
        say(f"warning: {short} (python -m seal_fast.data verify {root})")


def resolve_dataset(cfg: Config, say) -> str:
    if cfg.data is not None:
        return cfg.data
    t = time.time()
    root, created = ensure_synthetic()
    if created:
        say(f"wrote the built-in synthetic dataset to {root} in {time.time() - t:.1f} s")
    return str(root)


# ----------------------------------------------------------------------------------------------
# 3. The optimizer seam
# ----------------------------------------------------------------------------------------------


def make_optimizer(model, entry: Entry, cfg: Config):
    """The optimizer for the plan's two groups (early, later), in plan order.

    Default: SignedSGD (seal_fast/optim.py), torch.optim.SGD's update for every group in one fused pass
    (Triton on CUDA, the PyTorch reference on the CPU). `--optimizer torch` uses torch.optim.SGD itself,
    as the published code did; it refuses a negative lr only in its constructor, so its groups start at
    +lr and `apply_entry` sets the plan's signed values, as the authors' code does. Both keep their
    momentum in torch.optim.SGD's state_dict format, so a checkpoint resumes with either."""
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in g.params], "name": g.name} for g in entry.groups]
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, weight_decay=cfg.weight_decay, nesterov=False)
    if cfg.optimizer == "torch":
        return torch.optim.SGD(groups, **kw)
    try:
        return SignedSGD(groups, backend=cfg.sgd_backend, **kw)
    except RuntimeError as exc:  # backend "cuda" without the built library, or without a GPU
        raise ConfigError(f"--sgd-backend {cfg.sgd_backend}: {exc}") from None


def apply_entry(optimizer, entry: Entry) -> None:
    """Apply a plan entry at the start of its epoch: momentum reset, then signed lr and weight decay."""
    if entry.reset_momentum:
        if isinstance(optimizer, SignedSGD):
            optimizer.reset_momentum()  # in place: buffers keep their storage
        else:
            optimizer.state.clear()  # == a new torch.optim.SGD: the next step starts each buffer at d_p
    for group, planned in zip(optimizer.param_groups, entry.groups):
        group["lr"] = planned.lr
        group["weight_decay"] = planned.weight_decay


# ----------------------------------------------------------------------------------------------
# 4. One epoch
# ----------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: Config, out: Path, say, dist: distributed.Dist = distributed.Dist()):
        self.cfg, self.out, self.say, self.dist = cfg, out, say, dist
        self.device = pick_device(cfg.device, dist.local_rank, dist.world)
        apply_memory_fraction(self.device)  # SEAL_FAST_CUDA_MEMORY_FRACTION: several runs packed on one GPU
        cuda = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        root = distributed.broadcast(resolve_dataset(cfg, say) if dist.main else None, dist)  # rank 0 writes it once
        workers = default_workers(cfg.workers)
        self.loaders = build_loaders(root, cfg.batch_size // dist.world, cfg.seed, workers, self.device,
                                     cfg.channels_last, kind=cfg.loader, eval_batch_size=max(256, cfg.batch_size),
                                     rank=dist.rank, world=dist.world, progress=dist.main)
        self.data_root = root
        check_batch(cfg, self.loaders.train.num_images * dist.world)  # the synthetic set, once it exists
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.arch, num_classes=len(self.loaders.classes))
        if dist.world > 1:
            self.model = distributed.sync_batchnorm(self.model, self.device)
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model  # what the training step calls: the model, or its DistributedDataParallel wrapper
        if dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)
        self.plan = build_plan(cfg, [n for n, _ in self.model.named_parameters()])
        self.optimizer = make_optimizer(self.model, self.plan[0], cfg)
        self.amp_dtype, self.amp_why = amp_dtype(self.device, cfg.amp)  # bf16 on a CPU only where it is native
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = make_criterion(cfg)
        ok, self.graph_why = graph_support(self.device, self.optimizer, self.amp_dtype, dist.world)
        if cfg.cuda_graph == "on" and not ok:
            raise ConfigError(f"--cuda-graph on: {self.graph_why.split(';')[0]}; use --cuda-graph auto or off")
        self.graphed = ok and cfg.cuda_graph != "off"
        if cfg.cuda_graph == "off":
            self.graph_why = "--cuda-graph off: eager steps"
        # the step itself: step.training_step (zero_grad, forward, loss, backward, update), graphed on CUDA
        self.train_step = TrainStep(self.net, self.criterion, self.optimizer, self.amp_dtype, self.graphed,
                                    scaler=self.scaler)
        self.eval_step = EvalStep(self.model, self.criterion, self.amp_dtype, self.graphed)
        self.next_epoch, self.best_val, self.history = 0, None, []
        self.tensorboard = TensorBoardLog(out / "tb") if cfg.tensorboard and dist.main else None

    # -- checkpoint ----------------------------------------------------------------------------
    def state(self) -> checkpoint.RunState:
        return checkpoint.RunState(model=self.model.state_dict(), config=self.cfg.to_dict(),
                                   next_epoch=self.next_epoch, optimizer=self.optimizer.state_dict(),
                                   scaler=self.scaler.state_dict(), rng=checkpoint.rng_state(),
                                   best_val=self.best_val, metrics=self.history)

    def load(self, ckpt: checkpoint.RunState) -> None:
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scaler is not None:
            self.scaler.load_state_dict(ckpt.scaler)
        checkpoint.set_rng_state(ckpt.rng)
        self.next_epoch, self.best_val, self.history = ckpt.next_epoch, ckpt.best_val, list(ckpt.metrics)

    # -- steps ---------------------------------------------------------------------------------
    def train_epoch(self, entry: Entry) -> dict:
        """One epoch. The host reads the device only at the end of the epoch (and when a progress bar on a
        terminal refreshes): the loss of every step stays in a device buffer until then."""
        self.net.train()
        loader = self.loaders.train
        steps = len(loader)
        losses = torch.zeros(steps, device=self.device)   # per-step loss, read at the end of the epoch
        sizes = torch.zeros(steps, device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        bar = tqdm(total=steps, disable=None if self.dist.main else True, leave=False, dynamic_ncols=True,
                   file=sys.stderr, desc=f"gen {entry.generation} ep {entry.epoch} {entry.phase}")
        start, every = time.perf_counter(), self.cfg.log_every
        for step, (images, labels) in enumerate(loader.epoch(entry.global_epoch)):
            loss, right = self.train_step(images, labels)
            losses[step] = loss
            sizes[step] = labels.shape[0]
            correct += right
            bar.update(1)
            if bar.disable is False and (step + 1) % 50 == 0:  # the only mid-epoch read, and only on a terminal
                done = sizes[:step + 1].sum()
                mean = float((losses[:step + 1] * sizes[:step + 1]).sum() / done)
                bar.set_postfix_str(f"loss {mean:.3f}  {float(done) / (time.perf_counter() - start):.0f} img/s",
                                    refresh=False)
            elif bar.disable and self.dist.main and every and (step + 1) % every == 0:  # a log file: a line per N
                done = sizes[:step + 1].sum()
                mean = float((losses[:step + 1] * sizes[:step + 1]).sum() / done)
                self.say(f"  gen {entry.generation + 1} epoch {entry.epoch + 1} step {step + 1}/{steps}: "
                         f"train loss {mean:.3f}, {float(done) / (time.perf_counter() - start):.0f} img/s")
        bar.close()
        bad = (~torch.isfinite(losses)).nonzero()
        if distributed.any_rank(len(bad) > 0, self.dist, self.device):
            step = int(bad[0]) if len(bad) else None
            value = float(losses[step]) if step is not None else float("nan")
            raise NonFiniteLossError(self._nonfinite_message(entry, step, steps, value))
        totals = distributed.all_sum(torch.stack([(losses * sizes).sum(), sizes.sum(), correct.float()]), self.dist)
        seconds = time.perf_counter() - start
        loss_sum, n, right = totals.tolist()
        return {"train_loss": loss_sum / n, "train_acc": right / n, "images_per_s": n / seconds,
                "train_seconds": seconds}

    def _nonfinite_message(self, entry: Entry, step: int | None, steps: int, value: float) -> str:
        if getattr(self, "saver", None) is not None:
            self.saver.wait()  # the previous epoch's checkpoint, still being written
        last = self.out / "last.pt"
        kept = (f"{last} still holds the end of epoch {self.next_epoch - 1} (global)" if last.exists()
                else "no checkpoint had been written yet")
        where = f"step {step} of {steps}" if step is not None else "a step of another rank"
        return (f"the training loss became {value} at generation {entry.generation}, epoch {entry.epoch} "
                f"(global epoch {entry.global_epoch}), {where} ({entry.phase} phase); "
                f"stopped without saving the diverged weights: {kept}. Lower --lr or check the data, then "
                "start a new run (or resume with the same settings to retry)")

    def evaluate(self) -> tuple[float, float, float]:
        """(val loss, top-1, top-5) over the whole val split (every rank evaluates all of it: no collective, the
        same numbers everywhere)."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros(2, device=self.device, dtype=torch.int64)
        n = 0
        for images, labels in self.loaders.val.epoch(0):
            batch_loss, right, right5 = self.eval_step(images, labels)
            loss_sum += batch_loss
            correct[0] += right
            correct[1] += right5
            n += labels.shape[0]
        self.model.train()
        top1, top5 = correct.tolist()
        return float(loss_sum) / n, top1 / n, top5 / n

    # -- 5. the run ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Every plan entry from next_epoch on; last.pt (and best.pt) after every epoch, written behind the next."""
        self.saver = checkpoint.BackgroundSaver(
            then=f"continue with --resume {self.out} (from the last epoch last.pt holds)")
        try:
            if self.next_epoch >= len(self.plan):
                self.say(f"this run is already complete ({len(self.plan)} epochs); nothing to train")
            for entry in self.plan[self.next_epoch:]:
                self.epoch(entry)
            if self.dist.main:
                plot_curves(self.history, self.out / "curves.png", title=f"{self.cfg.method} ({self.cfg.arch})")
        finally:
            self.saver.wait()  # every checkpoint on disk before returning or reporting an error

    def epoch(self, entry: Entry) -> None:
        """One plan entry: LLF re-init, the entry's lr / wd / momentum reset, train, evaluate, checkpoint, log."""
        cfg = self.cfg
        if entry.reinit:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + entry.generation)
            reinit_in_place(self.model, entry.reinit, gen)
        apply_entry(self.optimizer, entry)
        t0 = time.perf_counter()
        row = {"generation": entry.generation, "epoch": entry.epoch, "global_epoch": entry.global_epoch,
               "phase": entry.phase, "lr": {g.name: g.lr for g in entry.groups}}
        row.update(self.train_epoch(entry))
        row["val_loss"] = row["val_acc"] = row["val_top5"] = None
        if entry.evaluate:
            row["val_loss"], row["val_acc"], row["val_top5"] = self.evaluate()
            improved = self.best_val is None or row["val_acc"] > self.best_val
            if improved:
                self.best_val = row["val_acc"]
        else:
            improved = False
        row["best_val"] = self.best_val  # over the whole run so far
        # within this generation, as the published code tracks it: the paper's figure is the last generation's best
        gen_vals = [r["val_acc"] for r in self.history + [row]
                    if r["generation"] == entry.generation and r["val_acc"] is not None]
        row["gen_best_val"] = max(gen_vals) if gen_vals else None
        row["gen_last_val"] = gen_vals[-1] if gen_vals else None
        row["seconds"] = time.perf_counter() - t0
        self.history.append(row)
        self.next_epoch = entry.global_epoch + 1
        if self.dist.main:  # one writer; every rank holds the same weights
            # written behind the next epoch, in order, last.pt last: it records the epoch as done only once best.pt
            # and gen<G>.pt are on disk, so a kill or a full disk in between redoes the epoch and rewrites them
            if improved:
                self._write_weights("best.pt", "best", self.best_val)
            if cfg.keep_generations == "all":
                if entry.epoch == cfg.epochs - 1:
                    self._write_weights(f"gen{entry.generation}.pt", "generation", row["gen_last_val"])
                if entry.phase == "ascent" and entry.epoch == cfg.ascent_epochs - 1:
                    self._write_weights(f"gen{entry.generation}-after-ascent.pt", "generation", row["val_acc"])
            checkpoint.write_last(self.state(), self.out, self.saver)
            append_line(self.out / "metrics.jsonl", json.dumps(row))
            if self.tensorboard is not None:
                self.tensorboard.write(row)
            if entry.epoch == cfg.epochs - 1:
                plot_curves(self.history, self.out / "curves.png", title=f"{cfg.method} ({cfg.arch})")
        self.say(epoch_line(row, cfg))

    def _write_weights(self, name: str, kind: str, val_acc: float | None) -> None:
        """Weights only (best.pt, gen<G>.pt, gen<G>-after-ascent.pt), written behind the next epoch."""
        state = checkpoint.RunState(model=self.model.state_dict(), config=self.cfg.to_dict(),
                                    next_epoch=self.next_epoch, kind=kind, val_acc=val_acc)
        checkpoint.write(state, self.out / name, self.saver)

    def generation_summary(self) -> list[dict]:
        """Per generation: epochs done, best and last val top-1 within it (None before its first evaluation)."""
        out = []
        for g in sorted({r["generation"] for r in self.history}):
            rows = [r for r in self.history if r["generation"] == g]
            out.append({"generation": g, "epochs": len(rows), "best_val": rows[-1].get("gen_best_val"),
                        "last_val": rows[-1].get("gen_last_val")})
        return out


def make_criterion(cfg: Config):
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def epoch_line(row: dict, cfg: Config) -> str:
    val = (f" | val loss {row['val_loss']:.3f} acc {100 * row['val_acc']:.1f}%" if row["val_acc"] is not None else "")
    best = f" (best {100 * row['best_val']:.1f}%)" if row["best_val"] is not None else ""
    return (f"gen {row['generation'] + 1}/{cfg.generations} epoch {row['epoch'] + 1}/{cfg.epochs} "
            f"[{row['phase']}] lr early {row['lr']['early']:+.4g} later {row['lr']['later']:.4g} | "
            f"train loss {row['train_loss']:.3f} acc {100 * row['train_acc']:.1f}%{val}{best} | "
            f"{row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """The one entry point: command line -> config (and checkpoint, with --resume) -> Trainer -> fit."""
    checked = check(argv)  # every check before training (preflight.py), the same sweep --dry-run runs
    cfg, ckpt = checked.cfg, checked.ckpt
    if checked.dry_run:
        return dry_run(cfg, getattr(checked.args, "plan_json", None))
    dist = distributed.init(cfg.device)
    try:
        return _train(cfg, ckpt, dist, argv)
    finally:
        release_locks()  # the output folder's lock (setup_out)
        distributed.shutdown()


def _train(cfg: Config, ckpt: checkpoint.RunState | None, dist: distributed.Dist, argv: list[str] | None) -> int:
    say = Console(dist.main, cfg.quiet)
    try:
        return _train_logged(cfg, ckpt, dist, argv, say)
    except SealError as exc:
        say.record(f"error: {one_line(exc)}")  # cli_main prints it on stderr; train.log keeps it too
        raise
    finally:
        say.close()


def _train_logged(cfg: Config, ckpt, dist: distributed.Dist, argv: list[str] | None, say: Console) -> int:
    if cfg.batch_size % dist.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split over {dist.world} processes; the global batch "
                          f"is kept, so choose a multiple of {dist.world} (or another --nproc_per_node)")
    if cfg.data is None and cfg.preset != "demo":
        say(f"no --data given: the built-in synthetic dataset (10 classes of coloured shapes, 64x64) with the "
            f"{cfg.preset} preset's schedule")
    elif cfg.data is None:  # the demo's banner, only for the demo
        as_shipped = all(getattr(cfg, k) == v for k, v in DEMO_OVERRIDES.items())
        say("seal-fast demo: no --data given, so this trains on the built-in synthetic dataset (10 classes of "
            "coloured shapes, 64x64, in the Tiny-ImageNet layout)")
        say(f"demo schedule: {cfg.generations} generations x {cfg.epochs} epochs ({cfg.ascent_epochs} ascent "
            "epoch(s) at the start of every generation after the first, for SEAL)"
            + (", 2 to 4 minutes on a 2-core CPU" if as_shipped and cfg.arch == "resnet50" else "")
            + "; pass --data /path/to/tiny-imagenet-200 for the paper's recipe")
    if cfg.data is not None and dist.main:
        warn_if_partial(cfg.data, say)
    if cfg.amp:  # in the first lines: on a CPU without native bf16, --amp runs fp32
        say(amp_dtype(pick_device(cfg.device, dist.local_rank, dist.world), True)[1])
    out = setup_out(cfg, ckpt is not None, dist)
    say.attach(out)
    cfg = dataclasses.replace(cfg, out=str(out))
    trainer = Trainer(cfg, out, say, dist)
    if ckpt is not None:
        trainer.load(ckpt)
        if dist.main:
            rewrite_metrics(out, trainer.history)
        say(f"resumed {out} at global epoch {trainer.next_epoch} of {len(trainer.plan)}")
    elif dist.main:
        (out / "config.json").write_text(json.dumps(dict(cfg.to_dict(), provenance=provenance(argv)), indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    say(describe(cfg, trainer.plan))
    say(f"loader {trainer.loaders.kind} ({trainer.loaders.why})")
    par = f", {dist.world} processes x {cfg.batch_size // dist.world} images (DDP, synchronized BN)" \
        if dist.world > 1 else ""
    precision = str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32"
    say(f"device {trainer.device.type}, {precision}, channels-last {cfg.channels_last}, "
        f"{trainer.graph_why}{par}; {len(trainer.loaders.train)} steps per epoch over "
        f"{trainer.loaders.train.num_images * dist.world} train / {trainer.loaders.val.num_images} val images from "
        f"{trainer.data_root}; writing to {out}")
    try:
        trainer.fit()
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
    gens = trainer.generation_summary()
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for g in gens:
        say(f"generation {g['generation'] + 1}: {g['epochs']} epochs, val top-1 best {pct(g['best_val'])}, "
            f"last {pct(g['last_val'])}")
    if gens:
        say(f"done: val top-1 {pct(gens[-1]['best_val'])}, the best within the last generation (the paper's figure); "
            f"best over the whole run {pct(trainer.best_val)}", result=True)
    kept = ", gen<G>.pt" if cfg.keep_generations == "all" else ""
    say(f"outputs: {out}/config.json, metrics.jsonl, train.log, last.pt, best.pt{kept}, curves.png", result=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted; the last finished epoch is in last.pt: continue with --resume DIR")


if __name__ == "__main__":
    sys.exit(main())
