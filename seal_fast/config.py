"""The run's configuration: one dataclass whose defaults are the paper's recipe (docs/recipe.md).

Pure Python (no torch), so that the dry-run plan and the checks below run without the heavy imports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from .errors import ConfigError, DataError

METHODS = ("seal", "llf", "normal")
ARCHS = ("resnet50", "resnet18", "resnet10")  # resnet50 is the recipe; the others are for tests and quick looks


@dataclass
class Config:
    method: str = "seal"            # seal | llf | normal
    data: str | None = None         # tiny-imagenet-200 folder; None = the built-in synthetic set
    out: str | None = None          # output folder; None = runs/<method>-<timestamp>
    seed: int = 0                   # model init, data order, augmentation, LLF re-init
    arch: str = "resnet50"          # torchvision ResNet, recipe init, ImageNet stem
    generations: int = 10           # generations of `epochs` epochs each
    epochs: int = 160               # epochs per generation
    ascent_epochs: int = 40         # SEAL: epochs of early-layer ascent at the start of generations >= 1
    ascent_lr_scale: float = -0.01  # SEAL: early-partition lr = lr_e * this during ascent (negative = ascent)
    ascent_wd_scale: float = 0.0    # SEAL: early-partition weight decay = weight_decay * this during ascent
    threshold: str = "layer3"       # first layer of the "later" partition (parameter-name prefix)
    warmup: int = 20                # epochs of linear warm-up at the start of every generation
    lr: float = 0.1                 # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4      # on every parameter, BN included
    batch_size: int = 32            # images per optimizer step
    label_smoothing: float = 0.1
    eval_every: int = 2             # validate after every `eval_every`-th epoch (and where the code adds one)
    amp: bool = False               # bf16 autocast where supported, else fp16 with loss scaling
    channels_last: bool = False     # NHWC memory format for model and inputs
    device: str = "auto"            # auto | cpu | cuda
    workers: int = -1               # data-loader worker processes; -1 = pick from the CPU count
    optimizer: str = "signed"       # signed (fused SignedSGD) | torch (torch.optim.SGD); same math
    sgd_backend: str = "auto"       # SignedSGD's kernel: auto | triton | cuda (native, `make cuda`) | torch
    loader: str = "auto"            # auto | torch | cache | dali; same batches (seal_fast/data/augment.py)
    cuda_graph: str = "auto"        # auto | on | off: replay the training step as one CUDA graph (CUDA only)
    preset: str = "paper"           # paper | demo: which defaults the values above started from
    keep_generations: str = "all"   # all | none: gen<G>.pt (and SEAL's gen<G>-after-ascent.pt) weights per generation
    tensorboard: bool = False       # also write the epoch scalars for TensorBoard (needs the tensorboard package)
    log_every: int = 100            # on a non-terminal: a progress line every N steps (0: none)
    quiet: bool = False             # print only warnings and the result (train.log still gets every line)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The demo schedule used when training on the built-in synthetic data: 2 generations with ascent,
# with the synthetic set's 960 train images, 240 steps: under 2 minutes on this project's 2-core CPU without
# native bf16 (README, 'The demo'). Explicit flags override it.
DEMO_OVERRIDES = dict(generations=2, epochs=4, ascent_epochs=1, warmup=2, preset="demo")

# Keys that may differ between a run and its resume without changing the science.
RESUME_FREE_KEYS = ("out", "workers", "device", "preset", "optimizer", "sgd_backend", "loader", "cuda_graph",
                    "keep_generations", "tensorboard", "log_every", "quiet")


def read_json(path: str | os.PathLike, fix: str):
    """A JSON file handed to a command, as data (json: nothing in it runs, unlike a pickle or a YAML loader with tags).
    A file that cannot be read or parsed (also: nested too deep, an integer too long) is a DataError naming it,
    ending with `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deep" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise DataError(f"{path}: not readable JSON ({why}); {fix}") from None


def read_saved_config(path: str | os.PathLike) -> dict:
    """A run folder's config.json (what the trainer wrote): a JSON object whose method is a string and whose
    generations / epochs are positive integers, else a DataError line naming the file."""
    fix = "it is not a config.json the trainer wrote: restore it, or leave that folder out"
    cfg = read_json(path, fix)
    ok = (isinstance(cfg, dict) and isinstance(cfg.get("method"), str)
          and all(type(cfg.get(k)) is int and cfg[k] >= 1 for k in ("generations", "epochs"))
          and type(cfg.get("seed", 0)) is int)
    if not ok:
        raise DataError(f"{path}: not a run's settings (a JSON object with method, generations, epochs, seed); {fix}")
    return cfg


def read_config_file(path: str) -> dict:
    """--config FILE: settings by Config's names (a dash may stand for the underscore), YAML when PyYAML is
    installed (safe_load: plain data only), else JSON. A run's own config.json is accepted: its provenance is
    dropped, and so is its out (repeating a run writes a new folder; pass --out to choose it). Each value must
    have its setting's type; a ConfigError names the file and the key otherwise."""
    fix = "pass a YAML or JSON file of settings (python -m seal_fast.train --help names them)"
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is None or str(path).endswith(".json"):
        data = read_json(path, fix)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config {path}: not readable YAML ({str(exc).splitlines()[0][:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: holds no settings (expected a mapping of setting: value); {fix}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "provenance" in data:  # a run's own config.json
        data.pop("provenance")
        data.pop("out", None)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; {fix}")
    for key, value in data.items():
        default = fields[key].default
        kind = type(default) if default is not None else str
        ok = (value is None and default is None) or (type(value) is kind) or (kind is float and type(value) is int)
        if not ok:
            raise ConfigError(f"--config {path}: {key}: {value!r} is not a {kind.__name__} (default {default!r})")
        if kind is float:
            data[key] = float(value)
    return data


def make_config(explicit: dict, preset: str) -> Config:
    """Config from a preset ("paper" or "demo") and the flags the user gave explicitly."""
    if preset not in ("paper", "demo"):
        raise ConfigError(f"--preset {preset!r}: choose 'paper' or 'demo'")
    base = dict(DEMO_OVERRIDES) if preset == "demo" else {}
    base.update(explicit)
    default_warmup = base.get("warmup", Config.warmup)
    if "warmup" not in explicit and "epochs" in explicit and default_warmup > explicit["epochs"] >= 1:
        base["warmup"] = explicit["epochs"]  # the preset's warm-up, cut to the generation asked for
    base["preset"] = preset
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(base) - names
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Config(**base)


def validate(cfg: Config) -> None:
    """Refuse impossible combinations with a one-line reason (ConfigError)."""
    from .schedule import param_names, split_partitions

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise ConfigError(why)

    need(cfg.method in METHODS, f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    need(cfg.arch in ARCHS, f"--arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    need(cfg.generations >= 1, f"--generations {cfg.generations}: need at least 1 generation")
    need(cfg.epochs >= 1, f"--epochs {cfg.epochs}: need at least 1 epoch per generation")
    need(cfg.ascent_epochs >= 0, f"--ascent-epochs {cfg.ascent_epochs}: cannot be negative")
    need(cfg.method != "seal" or cfg.generations == 1 or cfg.ascent_epochs < cfg.epochs,
         f"--ascent-epochs {cfg.ascent_epochs} >= --epochs {cfg.epochs}: the ascent must end inside the "
         "generation, leaving descent epochs")  # one generation never ascends: any ascent length is moot
    need(cfg.warmup >= 0, f"--warmup {cfg.warmup}: cannot be negative")
    for flag, value in (("--lr", cfg.lr), ("--momentum", cfg.momentum), ("--weight-decay", cfg.weight_decay),
                        ("--label-smoothing", cfg.label_smoothing), ("--ascent-lr-scale", cfg.ascent_lr_scale),
                        ("--ascent-wd-scale", cfg.ascent_wd_scale)):
        need(math.isfinite(value), f"{flag} {value}: must be a finite number")
    need(cfg.lr > 0, f"--lr {cfg.lr}: the peak learning rate must be positive (ascent is --ascent-lr-scale < 0)")
    need(-1 <= cfg.ascent_lr_scale <= 1,
         f"--ascent-lr-scale {cfg.ascent_lr_scale}: must lie in [-1, 1] (the early partition's lr during ascent is "
         "lr x this; the recipe's -0.01 ascends at 1% of the lr)")
    need(cfg.ascent_wd_scale <= 1, f"--ascent-wd-scale {cfg.ascent_wd_scale}: must lie in [0, 1] (the early "
         "partition's weight decay during ascent is weight_decay x this; the recipe's is 0)")
    need(0 <= cfg.momentum < 1, f"--momentum {cfg.momentum}: must lie in [0, 1)")
    need(cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: cannot be negative")
    need(cfg.ascent_wd_scale >= 0, f"--ascent-wd-scale {cfg.ascent_wd_scale}: cannot be negative")
    need(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be a positive number of images")
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing {cfg.label_smoothing}: must lie in [0, 1)")
    need(cfg.log_every >= 0, f"--log-every {cfg.log_every}: must be 0 (no progress lines) or more")
    need(cfg.eval_every >= 1, f"--eval-every {cfg.eval_every}: must be at least 1 epoch")
    need(cfg.device in ("auto", "cpu", "cuda"), f"--device {cfg.device!r}: choose auto, cpu or cuda")
    need(cfg.optimizer in ("signed", "torch"), f"--optimizer {cfg.optimizer!r}: choose signed or torch")
    need(cfg.sgd_backend in ("auto", "triton", "cuda", "torch"),
         f"--sgd-backend {cfg.sgd_backend!r}: choose auto, triton, cuda or torch")
    need(cfg.sgd_backend == "auto" or cfg.optimizer == "signed",
         f"--sgd-backend {cfg.sgd_backend} picks SignedSGD's kernel; it does not go with --optimizer torch")
    need(cfg.loader in ("auto", "torch", "cache", "dali"), f"--loader {cfg.loader!r}: choose auto, torch, cache or dali")
    need(cfg.cuda_graph in ("auto", "on", "off"), f"--cuda-graph {cfg.cuda_graph!r}: choose auto, on or off")
    need(cfg.keep_generations in ("all", "none"), f"--keep-generations {cfg.keep_generations!r}: choose all or none")
    names = param_names(cfg.arch)
    early, later = split_partitions(names, cfg.threshold)
    need(bool(later), f"--threshold {cfg.threshold!r}: {cfg.arch} has no parameter whose name starts with "
                      f"'{cfg.threshold}.' (try layer2, layer3 or layer4)")
    need(bool(early), f"--threshold {cfg.threshold!r}: leaves the early partition empty; "
                      "pick a later layer such as layer2, layer3 or layer4")
