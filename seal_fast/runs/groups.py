"""The runs behind the report's table: each run folder read (or listed as unreadable, with the file and the line),
and the runs grouped by the settings that change the result, so that only comparable runs are averaged.

A group is one run kind (normal160, normal, llf, seal) with one value of every setting that changes the result: the
data set (the built-in synthetic set, or the folder and a fingerprint of what it holds), the architecture, the
schedule (generations, epochs, warm-up, SEAL's ascent), the learning rate, momentum, weight decay, label smoothing,
batch size, precision (--amp), memory format, optimizer, evaluation cadence and the partition threshold. What does not
change it (the seed, which varies inside a group; the output folder, device, workers, loader, kernel backend, CUDA
graphs, what is kept on disk) is left out. Finished and unfinished runs never share a group. A seed that appears twice
in a group (a run folder given twice, or copied) is counted once, the first, and the table says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RESUME_FREE_KEYS, Config, read_saved_config
from ..errors import ConfigError, DataError

ORDER = ("normal160", "normal", "llf", "seal")
PAPER = {"normal160": 54.37, "normal": 49.27, "llf": 56.92, "seal": 59.22}  # Tiny-ImageNet, ResNet-50, top-1 %
# settings that do not change the result; the optimizer (SignedSGD or torch.optim.SGD) is kept apart all the same
NOT_RESULT = (set(RESUME_FREE_KEYS) - {"optimizer"}) | {"seed", "provenance", "out"}
SEAL_ONLY = ("ascent_epochs", "ascent_lr_scale", "ascent_wd_scale")
RECIPE = Config()  # the dataclass's defaults are the paper's recipe (docs/recipe.md)
RECIPE_KEYS = ("arch", "epochs", "generations", "warmup", "lr", "momentum", "weight_decay", "batch_size",
               "label_smoothing", "eval_every", "threshold", "amp") + SEAL_ONLY
# what a run folder holds besides config.json: a folder with one of these but no config.json is a run that broke
RUN_FILES = ("metrics.jsonl", "train.log", "last.pt")


@dataclass
class RunRecord:
    folder: Path
    cfg: dict
    kind: str
    seed: int
    rows: list[dict]
    planned: int
    data: str = ""                       # the data set as grouped: "synthetic", or "PATH (fingerprint)"
    real: str | None = None              # None: the complete Tiny-ImageNet; else why not / why it is not known

    @property
    def finished(self) -> bool:
        return len(self.rows) >= self.planned

    def figure(self, key: str) -> float | None:
        vals = [r.get(key) for r in self.rows if r.get(key) is not None]
        return vals[-1] if vals else None

    @property
    def final_val(self) -> float | None:
        return self.figure("val_acc")

    @property
    def hours(self) -> float:
        return sum(r.get("seconds") or 0.0 for r in self.rows) / 3600

    def settings(self) -> dict:
        """{setting: value} of everything that changes the result, the data set as its identity. A setting the run's
        config.json does not hold (one added to the trainer after the run) counts as its default, which is how the
        run trained."""
        s = {k: v for k, v in {**RECIPE.to_dict(), **self.cfg}.items() if k not in NOT_RESULT and k != "method"}
        if self.kind != "seal":
            for k in SEAL_ONLY:
                s.pop(k, None)
        s["data"] = self.data
        return s

    def not_recipe(self) -> list[str]:
        """The recipe's settings this run does not have (or did not record)."""
        want = {k: getattr(RECIPE, k) for k in RECIPE_KEYS if self.kind == "seal" or k not in SEAL_ONLY}
        want["generations"] = 1 if self.kind == "normal160" else RECIPE.generations
        return [k for k, v in want.items() if k not in self.cfg or self.cfg[k] != v]


@dataclass
class Group:
    kind: str
    finished: bool
    settings: dict
    runs: list[RunRecord]
    repeats: list[str] = field(default_factory=list)    # "seed S: in A and B, counted once (A)"

    @property
    def paper(self) -> tuple[float | None, str]:
        """(the paper's number, "") beside runs of its recipe on the complete Tiny-ImageNet, else (None, why not)."""
        if self.kind not in PAPER:
            return None, ""
        if self.runs[0].real is not None:
            return None, self.runs[0].real
        off = self.runs[0].not_recipe()
        return (None, "not the recipe: " + ", ".join(k.replace("_", "-") for k in off)) if off else \
            (PAPER[self.kind], "")


def kind_of(cfg: dict) -> str:
    return "normal160" if cfg["method"] == "normal" and cfg["generations"] == 1 else cfg["method"]


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as data (JSON lines): each line an object with an integer generation and numbers (or null) for
    the figures the report uses, else a DataError naming the file and the line."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    rows = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
        except (ValueError, RecursionError) as exc:
            why = "nested too deep" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise DataError(f"{path}, line {n}: not a JSON line ({why}); not the metrics.jsonl the trainer "
                            "wrote: restore it, or leave that run out") from None
        number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
        if not (isinstance(r, dict) and type(r.get("generation")) is int and type(r.get("global_epoch")) is int
                and all(number(r.get(k)) for k in ("val_acc", "best_val", "gen_best_val", "seconds"))):
            raise DataError(f"{path}, line {n}: not an epoch's metrics (an object with integer generation and "
                            "global_epoch, numeric val_acc / best_val / seconds); restore the file, or leave that run "
                            "out")
        rows.append(r)
    return rows


_DATA: dict[str, tuple[str, str | None]] = {}


def data_identity(data) -> tuple[str, str | None]:
    """(the data set's identity, None when it is the complete Tiny-ImageNet else why it is not / cannot be told).
    A folder still there is fingerprinted (sha256 of wnids.txt, val_annotations.txt and the image names, 12 hex
    digits) and checked against the full set; a folder gone is known by its path only."""
    if data is None:
        return "synthetic (built-in)", "synthetic data"
    if not isinstance(data, str):
        return repr(data), "data not recorded"
    if data in _DATA:
        return _DATA[data]
    from ..data.verify import check_counts

    root = Path(data)
    if not root.is_dir():
        _DATA[data] = data, f"{data} is not here to check it is Tiny-ImageNet"
        return _DATA[data]
    h = hashlib.sha256()
    for name in ("wnids.txt", os.path.join("val", "val_annotations.txt")):
        h.update((root / name).read_bytes() if (root / name).is_file() else b"-")
    for base, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        h.update("\n".join([os.path.relpath(base, root)] + sorted(files)).encode())
    try:
        problems = check_counts(root)
    except DataError as exc:
        problems = [str(exc)]
    why = None if not problems else f"not the complete Tiny-ImageNet ({problems[0]})"
    _DATA[data] = f"{data} ({h.hexdigest()[:12]})", why
    return _DATA[data]


def read_run(folder: Path) -> RunRecord:
    cfg = read_saved_config(folder / "config.json")
    rows = read_metrics(folder / "metrics.jsonl")
    for i, r in enumerate(rows):  # runs from before per-generation figures: derive them from the rows themselves
        if "gen_best_val" not in r:
            gen = [x["val_acc"] for x in rows[:i + 1]
                   if x["generation"] == r["generation"] and x.get("val_acc") is not None]
            r["gen_best_val"] = max(gen) if gen else None
    data, real = data_identity(cfg.get("data"))
    return RunRecord(folder, cfg, kind_of(cfg), cfg.get("seed", 0), rows, cfg["generations"] * cfg["epochs"],
                     data, real)


def find_runs(paths: list[str]) -> tuple[list[RunRecord], list[str]]:
    """(the readable runs, one line per unreadable one naming the file and, where it applies, the line)."""
    runs, unreadable = [], []

    def read(q: Path) -> None:
        try:
            runs.append(read_run(q))
        except DataError as exc:
            unreadable.append(str(exc))

    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p}: no such folder; give run folders or a sweep folder")
        if (p / "config.json").exists():
            read(p)
            continue
        inner = sorted(q for q in p.iterdir() if q.is_dir() and any((q / f).exists() for f in
                                                                    ("config.json", *RUN_FILES)))
        if not inner:
            raise DataError(f"{p}: neither a run folder (config.json) nor a sweep folder holding run folders")
        for q in inner:
            if (q / "config.json").exists():
                read(q)
            else:
                log = " (see its train.log)" if (q / "train.log").exists() else ""
                unreadable.append(f"{q / 'config.json'}: missing: the run never started{log}")
    return runs, unreadable


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def group_runs(runs: list[RunRecord]) -> list[Group]:
    """The runs by (kind, finished, settings), in the paper's order of kinds; a repeated seed counted once."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        s = r.settings()
        key = (r.kind, r.finished, _key(s))
        g = groups.setdefault(key, Group(r.kind, r.finished, s, []))
        same = [x for x in g.runs if x.seed == r.seed]
        if same:
            how = f"{r.folder} given twice, counted once" if same[0].folder.resolve() == r.folder.resolve() else \
                f"in {same[0].folder} and {r.folder}, counted once ({same[0].folder})"
            g.repeats.append(f"seed {r.seed}: {how}")
            continue
        g.runs.append(r)
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(groups.values(), key=lambda g: (rank.get(g.kind, len(ORDER)), g.kind, not g.finished,
                                                  _key(g.settings)))


def applies(g: Group, k: str) -> bool:
    """Whether setting k is compared for group g: SEAL's ascent settings for SEAL only, and not the generations of
    normal160 (1, by its name)."""
    return (k not in SEAL_ONLY or g.kind == "seal") and not (g.kind == "normal160" and k == "generations")


def differing(groups: list[Group]) -> tuple[list[str], dict]:
    """(the settings whose value is not the same in every group, {setting: value} of those every group shares).
    SEAL's ascent settings are compared among SEAL groups only, and the generations of normal160 (1, by its name)
    are left out of the comparison."""
    keys = list(dict.fromkeys(k for g in groups for k in g.settings))
    differ, common = [], {}
    for k in keys:
        values = {_key(g.settings.get(k, "<not recorded>")) for g in groups if applies(g, k)}
        if len(values) > 1:
            differ.append(k)
        elif values:
            common[k] = json.loads(values.pop())
    return differ, common


def scope(groups: list[Group], k: str) -> str:
    """"" when setting k is compared in every group, else which rows it is about (for the shared settings' line)."""
    if all(applies(g, k) for g in groups):
        return ""
    return " (seal rows)" if k in SEAL_ONLY else " (normal160: 1)" if k == "generations" else ""
