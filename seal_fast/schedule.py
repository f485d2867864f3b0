"""The plan of a run: pure functions from a Config to one entry per epoch. No torch needed.

Each entry is an `Entry` (read by attribute: `entry.early.lr`, `entry.groups`):
    Entry(generation=g, epoch=e, global_epoch=i, phase="ascent"|"descent", reset_momentum=bool,
          reinit=(names), evaluate=bool, groups=(Group("early", lr, weight_decay, (names)), Group("later", ...)))
`--dry-run --plan-json FILE` writes it as JSON (plan_json; docs/train.md, 'The plan'). `lr` is signed
(negative = gradient ascent). The trainer applies the entry at the start of its epoch:
re-initialize `reinit` in place, zero every momentum buffer if `reset_momentum`, then set each
group's lr and weight decay; it validates after the epoch if `evaluate`.

Faithful to the authors' code (amiiir-sarfi/SEAL core.py, utils/schedulers.py):
- lr depends only on the epoch inside the generation: linear warm-up then a cosine to zero.
- momentum is zeroed at the start of every generation (the optimizer is rebuilt there; in
  generation 0 it is new) and, for SEAL, again at the first descent epoch after the ascent.
- validation after epoch e when (e + 1) % eval_every == 0 or e == the code's `ascending_epochs`:
  that is the ascent length for SEAL and LLF (the code keeps it for LLF) and 0 for normal
  (the code's config sets it to 0 for normal).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple

# (block kind, blocks per stage) of the torchvision ResNets the project knows.
_RESNETS = {
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet10": ("basic", (1, 1, 1, 1)),
}


def param_names(arch: str = "resnet50") -> list[str]:
    """The names of torchvision ResNet's `named_parameters()`, in order, computed without torch."""
    kind, blocks = _RESNETS[arch]
    convs = 3 if kind == "bottleneck" else 2
    expansion = 4 if kind == "bottleneck" else 1
    names = ["conv1.weight", "bn1.weight", "bn1.bias"]
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            prefix = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                names += [f"{prefix}.conv{c}.weight", f"{prefix}.bn{c}.weight", f"{prefix}.bn{c}.bias"]
            stride = 2 if (stage > 1 and b == 0) else 1
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                names += [f"{prefix}.downsample.0.weight", f"{prefix}.downsample.1.weight",
                          f"{prefix}.downsample.1.bias"]
            inplanes = planes * expansion
    return names + ["fc.weight", "fc.bias"]


def split_partitions(names: list[str], threshold: str) -> tuple[list[str], list[str]]:
    """(early, later): early = every name before the first whose leading components equal `threshold`."""
    depth = threshold.count(".") + 1
    for i, n in enumerate(names):
        if ".".join(n.split(".")[:depth]) == threshold:
            return names[:i], names[i:]
    return list(names), []


def llf_reinit_names(later: list[str]) -> list[str]:
    """LLF's re-initialized tensors: the conv weights (downsample.0 included) and fc.weight of the later
    partition. BN parameters (downsample.1 included) and fc.bias are kept, as in the authors' code."""
    return [n for n in later
            if n.endswith(".weight") and ("conv" in n or "downsample.0" in n or n.startswith("fc."))]


def lr_at(epoch: int, epochs: int, warmup: int, lr: float) -> float:
    """The recipe's per-epoch learning rate inside a generation (same arithmetic order as the code)."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * lr


class Group(NamedTuple):
    """One parameter group of an epoch: its name, signed lr, weight decay and parameter names."""
    name: str
    lr: float
    weight_decay: float
    params: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One epoch of the plan."""
    generation: int
    epoch: int
    global_epoch: int
    phase: str                      # "ascent" | "descent"
    reset_momentum: bool            # zero every momentum buffer before the epoch
    reinit: tuple[str, ...]         # tensors LLF re-initializes before the epoch
    evaluate: bool                  # validate after the epoch
    groups: tuple[Group, Group]     # (early, later), in the optimizer's order

    @property
    def early(self) -> Group:
        return self.groups[0]

    @property
    def later(self) -> Group:
        return self.groups[1]

    def to_dict(self) -> dict:
        """The entry as plain data (lists for the names)."""
        return {"generation": self.generation, "epoch": self.epoch, "global_epoch": self.global_epoch,
                "phase": self.phase, "reset_momentum": self.reset_momentum, "reinit": list(self.reinit),
                "evaluate": self.evaluate,
                "groups": [dict(g._asdict(), params=list(g.params)) for g in self.groups]}


def build_plan(cfg, names: list[str] | None = None) -> list[Entry]:
    """The whole run, one dict per epoch. `names` defaults to the architecture's parameter names."""
    names = list(names) if names is not None else param_names(cfg.arch)
    early, later = (tuple(part) for part in split_partitions(names, cfg.threshold))
    reinit_names = tuple(llf_reinit_names(list(later)))
    seal = cfg.method == "seal"
    ascent_len = cfg.ascent_epochs if seal else 0
    eval_extra = 0 if cfg.method == "normal" else cfg.ascent_epochs
    plan = []
    for g in range(cfg.generations):
        for e in range(cfg.epochs):
            lr_e = lr_at(e, cfg.epochs, cfg.warmup, cfg.lr)
            ascent = seal and g >= 1 and e < ascent_len
            if ascent:
                early_lr, early_wd = lr_e * cfg.ascent_lr_scale, cfg.ascent_wd_scale * cfg.weight_decay
            else:
                early_lr, early_wd = lr_e, cfg.weight_decay
            reset = e == 0 or (seal and g >= 1 and ascent_len > 0 and e == ascent_len)
            plan.append(Entry(
                generation=g, epoch=e, global_epoch=g * cfg.epochs + e,
                phase="ascent" if ascent else "descent",
                reset_momentum=reset,
                reinit=reinit_names if (cfg.method == "llf" and g >= 1 and e == 0) else (),
                evaluate=(e + 1) % cfg.eval_every == 0 or e == eval_extra,
                groups=(Group("early", early_lr, early_wd, early), Group("later", lr_e, cfg.weight_decay, later)),
            ))
    return plan


def plan_json(cfg, plan: list[Entry]) -> str:
    """`--dry-run --plan-json FILE`: one JSON object, the partitions (and LLF's re-initialized tensors) named once,
    then one line per epoch with the early / later lr and weight decay."""
    reinit = next((p.reinit for p in plan if p.reinit), ())
    head = {"method": cfg.method, "arch": cfg.arch, "threshold": cfg.threshold, "generations": cfg.generations,
            "epochs": cfg.epochs, "partitions": {g.name: list(g.params) for g in plan[0].groups},
            "reinit_params": list(reinit)}
    rows = [json.dumps({
        "generation": p.generation, "epoch": p.epoch, "global_epoch": p.global_epoch, "phase": p.phase,
        "reset_momentum": p.reset_momentum, "reinit": bool(p.reinit), "evaluate": p.evaluate,
        "lr": {g.name: g.lr for g in p.groups}, "weight_decay": {g.name: g.weight_decay for g in p.groups}})
        for p in plan]
    return json.dumps(head)[:-1] + ', "plan": [\n' + ",\n".join(rows) + "\n]}\n"


def describe(cfg, plan: list[Entry]) -> str:
    """A few human lines summarizing a plan (printed at the start of a run)."""
    early, later = plan[0].early.params, plan[0].later.params
    ascent = sum(p.phase == "ascent" for p in plan)
    resets = [p.global_epoch for p in plan if p.reset_momentum]
    reinit = sum(bool(p.reinit) for p in plan)
    return (f"plan: {cfg.method}, {cfg.generations} generation(s) x {cfg.epochs} epochs = {len(plan)} epochs; "
            f"{len(early) + len(later)} tensors ({len(early)} early before '{cfg.threshold}', {len(later)} later); "
            f"{ascent} ascent epochs; momentum resets at epochs {resets[:12]}{' ...' if len(resets) > 12 else ''}; "
            f"{reinit} LLF re-initializations")


def summary_lines(cfg, plan: list[Entry]) -> list[str]:
    """`--dry-run`: the plan for a person, one line per generation (phases, lr range, resets, re-inits)."""
    lines = [describe(cfg, plan)]
    for g in range(cfg.generations):
        gen = [p for p in plan if p.generation == g]
        parts = []
        for phase in ("ascent", "descent"):
            eps = [p for p in gen if p.phase == phase]
            if not eps:
                continue
            early = [p.early.lr for p in eps]
            later = [p.later.lr for p in eps]
            parts.append(f"{phase} epochs {eps[0].epoch}-{eps[-1].epoch} (early lr {min(early):+.4g}.."
                         f"{max(early):+.4g} wd {eps[0].early.weight_decay:g}, later lr "
                         f"{min(later):.4g}..{max(later):.4g})")
        resets = [p.epoch for p in gen if p.reset_momentum]
        reinit = sum(len(p.reinit) for p in gen)
        evals = sum(p.evaluate for p in gen)
        lines.append(f"generation {g + 1}: " + "; ".join(parts) + f"; momentum reset at epoch(s) {resets}"
                     + (f"; {reinit} tensors re-initialized (LLF)" if reinit else "") + f"; {evals} evaluations")
    return lines
