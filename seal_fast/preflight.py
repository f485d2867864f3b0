"""Every check the trainer runs before it trains, writing nothing: the trainer's parser, the flags' values and
presets, the data folder and its layout, the output folder, the folder and checkpoint to resume from.

`check_train_argv(argv)` is the whole of it for another command (`sweep --dry-run` checks each run's flags with
it); the trainer's `run()` calls `check(argv)`, the same checks, so the two can never disagree.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .cli import command_parser
from .config import DEMO_OVERRIDES, RESUME_FREE_KEYS, Config, make_config, read_config_file, validate
from .data import LOADERS
from .data.layout import read_wnids, scan_train, scan_val
from .data.verify import CLASSES, TRAIN_PER_CLASS, VAL_IMAGES, check_counts
from .errors import ConfigError, DataError, SealError
from .runtime import memory_fraction

# flags that steer the command rather than the run (never part of the Config)
COMMAND_FLAGS = ("config", "resume", "dry_run", "preset", "summary", "trust_checkpoint", "partial_data", "plan_json")


def _refuse_with_config_error(message: str):
    raise ConfigError(f"{message} (python -m seal_fast.train --help lists every flag)")


def _non_negative_int(text: str) -> int:
    value = int(text)  # a ValueError reads "invalid int value" (the __name__ below)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more (0 loads in the training process)")
    return value


_non_negative_int.__name__ = "int"


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser. Its errors raise ConfigError (one line, exit 2 through cli_main), never SystemExit."""
    d = Config()
    p = command_parser(
        "train", module="seal_fast.train", argument_default=argparse.SUPPRESS,
        description="Train ResNet on Tiny-ImageNet with SEAL, LLF or normal training. Defaults are the "
                    "paper's recipe; without --data it trains a demo schedule on a built-in synthetic set. "
                    "Exit codes: 0 done, 1 an output could not be written or a checkpoint read, 2 a bad flag, "
                    "value, data folder or checkpoint (nothing trained), 3 the loss became NaN or infinite, "
                    "130 interrupted.")
    p.error = _refuse_with_config_error
    a = p.add_argument
    a("--config", metavar="FILE",
      help="take settings from FILE (YAML, or JSON; a run's own config.json repeats that run in a new folder); "
           "flags given on the command line win")
    a("--method", choices=("seal", "llf", "normal"), help=f"training method (default {d.method})")
    a("--data", metavar="DIR", help="tiny-imagenet-200 folder (default: built-in synthetic data, demo schedule)")
    a("--out", metavar="DIR", help="output folder (default runs/<method>-s<seed>-<timestamp>, never shared)")
    a("--resume", nargs="?", const=True, metavar="DIR|auto",
      help="continue the run in DIR (or in --out) from its last.pt, exactly; 'auto' (with --out): resume if --out "
           "holds a run, else start one there (SLURM requeue, torchrun --max-restarts)")
    a("--seed", type=int, help=f"seed of init, data order, augmentation, LLF re-init (default {d.seed})")
    a("--arch", choices=("resnet50", "resnet18", "resnet10"), help=f"model (default {d.arch}, the recipe's)")
    a("--generations", type=int, help=f"generations (default {d.generations}; demo {DEMO_OVERRIDES['generations']})")
    a("--epochs", type=int, help=f"epochs per generation (default {d.epochs}; demo {DEMO_OVERRIDES['epochs']})")
    a("--ascent-epochs", type=int,
      help=f"SEAL ascent epochs per generation >= 1 (default {d.ascent_epochs}; demo {DEMO_OVERRIDES['ascent_epochs']})")
    a("--ascent-lr-scale", type=float, help=f"early lr = lr_e x this during ascent (default {d.ascent_lr_scale})")
    a("--ascent-wd-scale", type=float, help=f"early weight decay x this during ascent (default {d.ascent_wd_scale})")
    a("--threshold", help=f"first layer of the later partition (default {d.threshold})")
    a("--warmup", type=int, help=f"warm-up epochs per generation (default {d.warmup}; demo {DEMO_OVERRIDES['warmup']})")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    a("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    a("--weight-decay", type=float, help=f"weight decay on every parameter (default {d.weight_decay})")
    a("--batch-size", type=int, help=f"images per step (default {d.batch_size})")
    a("--label-smoothing", type=float, help=f"cross-entropy label smoothing (default {d.label_smoothing})")
    a("--eval-every", type=int, help=f"validate every N epochs (default {d.eval_every})")
    a("--amp", action=argparse.BooleanOptionalAction,
      help="bf16 autocast on a GPU (fp16 + loss scaling where it lacks bf16) or on a CPU with native bf16 "
           "(AVX512_BF16 / AMX / Arm BF16); other CPUs run fp32 and say so")
    a("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")
    a("--device", choices=("auto", "cpu", "cuda"), help="training device (default auto)")
    a("--workers", type=_non_negative_int, help="data-loader worker processes, 0 or more (default: from the CPU count)")
    a("--loader", choices=LOADERS,
      help="auto (default): the fastest available; torch: DataLoader + PIL; cache: decoded once into device "
           "memory; dali: NVIDIA DALI")
    a("--cuda-graph", choices=("auto", "on", "off"),
      help="replay each training / evaluation step as one CUDA graph (default auto: on a GPU when the setup allows)")
    a("--optimizer", choices=("signed", "torch"),
      help="signed: the fused SignedSGD (default); torch: torch.optim.SGD as in the published code")
    a("--sgd-backend", choices=("auto", "triton", "cuda", "torch"),
      help="SignedSGD's kernel: auto (default: Triton on a GPU, PyTorch ops on a CPU), triton, "
           "cuda (the native CUDA C++ kernel: build it first with `make cuda`) or torch")
    a("--preset", choices=("paper", "demo"),
      help="defaults to start from (default: demo without --data, paper with --data; the same for --dry-run)")
    a("--keep-generations", choices=("all", "none"),
      help="all (default, as published): gen<G>.pt at the end of every generation and SEAL's "
           "gen<G>-after-ascent.pt, for the studies; none: only last.pt and best.pt")
    a("--tensorboard", action="store_true", help="also write the epoch scalars for TensorBoard into --out/tb")
    a("--log-every", type=int, metavar="N",
      help=f"when the output is not a terminal (a log file), a progress line every N steps (default {d.log_every}; "
           "0: none); a terminal gets a progress bar")
    a("--quiet", action="store_true",
      help="print only warnings, errors and the result; the folder's train.log still gets every line")
    a("--partial-data", action="store_true",
      help="let the paper preset's full recipe train on a folder that is not the whole Tiny-ImageNet")
    checkpoint.add_trust_flag(p)
    a("--dry-run", action="store_true",
      help="check everything, print the plan that would train (one readable line per generation) and exit")
    a("--plan-json", metavar="FILE",
      help="with --dry-run: also write the plan as JSON to FILE (the partitions named once, then one object per "
           "epoch)")
    a("--summary", action="store_true", help="with --dry-run: the readable plan (what --dry-run prints anyway)")
    return p


@dataclass
class Checked:
    """What the checks found: the config that runs (the saved one, with --resume), the flags given explicitly,
    the raw arguments, and the checkpoint to resume from (None for a fresh run or a dry run)."""
    cfg: Config
    explicit: dict
    args: argparse.Namespace
    ckpt: checkpoint.RunState | None = None

    @property
    def dry_run(self) -> bool:
        return getattr(self.args, "dry_run", False)


def parse(argv: list[str] | None) -> tuple[Config, dict, argparse.Namespace]:
    """(config, explicitly given settings, raw args). Flags the user did not give keep the preset's values."""
    args = build_parser().parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if k not in COMMAND_FLAGS}
    if getattr(args, "config", None):
        from_file = read_config_file(args.config)
        if "preset" in from_file and not hasattr(args, "preset"):
            args.preset = from_file["preset"]
        from_file.pop("preset", None)
        explicit = {**from_file, **explicit}  # the command line wins
    preset = getattr(args, "preset", None) or ("demo" if explicit.get("data") is None else "paper")  # dry run or not
    cfg = make_config(explicit, preset)
    validate(cfg)
    if "warmup" in explicit and cfg.warmup > cfg.epochs:
        raise ConfigError(f"--warmup {cfg.warmup} > --epochs {cfg.epochs}: the warm-up is longer than a generation; "
                          f"choose --warmup {cfg.epochs} or less")
    return cfg, explicit, args


def resolve_resume(args, cfg: Config, explicit: dict) -> tuple[Config, checkpoint.RunState | None]:
    """With --resume: the saved config (flags given now must agree with it) and the checkpoint."""
    resume = getattr(args, "resume", None)
    if resume is None:
        return cfg, None
    if resume == "auto":
        if not explicit.get("out"):
            raise ConfigError("--resume auto needs --out DIR: the folder to resume from, or to start the run in")
        if not (Path(explicit["out"]) / "last.pt").exists():
            return cfg, None  # nothing there yet: start the run in --out
        resume = explicit["out"]
    folder = resume if isinstance(resume, str) else explicit.get("out")
    if not folder:
        raise ConfigError("--resume: name the run folder (--resume DIR, or --resume with --out DIR)")
    ckpt = read_resumable(Path(folder), getattr(args, "trust_checkpoint", False))
    saved = dict(ckpt.config)
    differ = [f"{k}: run has {saved.get(k)!r}, command line says {v!r}" for k, v in explicit.items()
              if k not in RESUME_FREE_KEYS and saved.get(k) != v]
    if differ:
        raise ConfigError(f"--resume {folder}: the settings differ from the saved run ({'; '.join(differ)}); "
                          "resume with the run's own settings, or start a new run in another --out")
    saved.update({k: explicit[k] for k in RESUME_FREE_KEYS if k in explicit})
    saved["out"] = str(folder)
    cfg = Config(**saved)
    validate(cfg)
    return cfg, ckpt


def read_resumable(folder: Path, trust: bool) -> checkpoint.RunState:
    """folder/last.pt, or one line: the folder is missing, holds no last.pt, or its last.pt is damaged (then which
    checkpoints there are intact, and what they allow)."""
    if not folder.is_dir():
        raise ConfigError(f"--resume {folder}: no such folder (a run's folder, as given to --out)")
    try:
        return checkpoint.read(folder / "last.pt", resumable=True, trust=trust)
    except DataError:
        raise  # a whole file of the wrong kind, or refused as untrusted: its own line says what to do
    except SealError as exc:
        if not (folder / "last.pt").is_file():
            raise
        raise SealError(f"{exc}; {intact_note(folder, trust)}") from None


def intact_note(folder: Path, trust: bool) -> str:
    """What is left in a run folder whose last.pt is damaged."""
    intact = []
    for path in [folder / "best.pt", *sorted(folder.glob("gen*.pt"))]:
        try:
            state = checkpoint.read(path, trust=trust)
        except SealError:
            continue
        intact.append(f"{path.name} (after global epoch {state.next_epoch - 1})")
    if not intact:
        return f"no other intact checkpoint in {folder}: start a new run in another --out"
    return (f"intact in {folder}: {', '.join(intact)}. They hold weights only (no momentum, RNG or loader state), "
            "so no run can continue from them bit-identically and the trainer does not resume from them: the "
            "studies read them as they are (python -m seal_fast depth CKPT ...); to train again, start a new run in "
            "another --out")


def data_shortfall(root: str, detail: bool = False) -> str | None:
    """One line when `root` is not the whole Tiny-ImageNet (classes and images found vs expected; detail: and how
    it falls short), else None."""
    try:
        problems = check_counts(root)
        if not problems:
            return None
        found = (len(read_wnids(root)), len(scan_train(root).files), len(scan_val(root).files))
    except DataError:
        return None  # not a dataset at all: check_data names that
    return (f"{root} is not the complete Tiny-ImageNet: {found[0]} classes, {found[1]} train / {found[2]} val images "
            f"found; {CLASSES} classes, {CLASSES * TRAIN_PER_CLASS} train / {VAL_IMAGES} val expected"
            + (f" ({'; '.join(problems)})" if detail else ""))


def is_full_recipe(cfg: Config) -> bool:
    """The paper preset's whole schedule (its 1,600 epochs), not a shortened run of it."""
    return cfg.preset == "paper" and (cfg.generations, cfg.epochs) == (Config.generations, Config.epochs)


def check_batch(cfg: Config, train_images: int) -> None:
    if cfg.batch_size > train_images:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set ({train_images} images): "
                          "no full batch to train on; choose a smaller --batch-size")


def check_data(root: str) -> tuple:
    """The folder the loaders will read: the Tiny-ImageNet layout, every listed file there (DataError if not)."""
    return len(scan_train(root).files), scan_val(root)


def check_out(cfg: Config, resuming: bool) -> None:
    """--out, without creating it: not a file, not a finished or running run's folder unless resuming, and in a
    place that can be written (the nearest folder that exists is writable)."""
    if cfg.out is None:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: cannot write there (it is a file, not a folder); choose a folder you can "
                          "write to")
    if not resuming and (out / "last.pt").exists():
        raise ConfigError(f"--out {out} already holds a run (last.pt): continue it with --resume {out}, "
                          "or choose another --out")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "a file is in the way" if parent.exists() and not parent.is_dir() else "permission denied"
        raise ConfigError(f"--out {out}: cannot write there ({why}: {parent}); pass --out DIR with a folder you can "
                          "write to")


def check(argv: list[str] | None) -> Checked:
    """The trainer's checks, in the trainer's order; nothing is written. run() trains what this returns."""
    cfg, explicit, args = parse(argv)
    memory_fraction()  # SEAL_FAST_CUDA_MEMORY_FRACTION, if set, is a number in (0, 1]
    dry_run = getattr(args, "dry_run", False)
    if getattr(args, "summary", False) and not dry_run:
        raise ConfigError("--summary goes with --dry-run (python -m seal_fast.train --dry-run)")
    if getattr(args, "plan_json", None) and not dry_run:
        raise ConfigError("--plan-json goes with --dry-run (python -m seal_fast.train --dry-run --plan-json FILE)")
    if dry_run:
        return Checked(cfg, explicit, args)
    cfg, ckpt = resolve_resume(args, cfg, explicit)
    if cfg.data is not None:
        check_batch(cfg, check_data(cfg.data)[0])
    check_out(cfg, ckpt is not None)
    short = data_shortfall(cfg.data) if cfg.data is not None and ckpt is None and is_full_recipe(cfg) else None
    if short and not getattr(args, "partial_data", False):
        raise ConfigError(f"{short}. The paper preset's full recipe refuses it: pass the whole set "
                          f"(python -m seal_fast.data verify {cfg.data} lists what is missing), a shorter "
                          "--generations / --epochs, or --partial-data to train on it anyway")
    return Checked(cfg, explicit, args, ckpt)


def check_train_argv(argv: list[str]) -> Config:
    """Parse a trainer command line (`python -m seal_fast.train ARGV`) with the trainer's own parser and run every
    check the trainer runs before it trains, writing nothing. Returns the Config that would train (with --resume,
    the saved run's); raises ConfigError / DataError / SealError with the trainer's one-line message."""
    return check(list(argv)).cfg
