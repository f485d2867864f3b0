"""`python -m seal_fast report RUN_DIR... [--studies DIR...] [--out DIR]`: the paper's table from run folders.

RUN_DIR is a run folder (config.json + metrics.jsonl) or a sweep folder holding run folders. Per run kind
(normal160 = normal with 1 generation, normal, llf, seal) over its seeds: the val top-1 the paper reports
(the best within the last generation: the published code tracks the best per generation), the best over
the whole run, the final val top-1 (the last evaluation), each as mean +- std (n), epochs done, wall hours,
and the paper's number beside the first. Unfinished runs get rows of their own, marked so, never averaged
with finished ones. Writes table.md, table.csv and curves.png (val top-1 per epoch, one colour per kind,
seeds as a band, SEAL's ascent epochs shaded) into --out (default: the sweep folder, or the current folder
for several).

`--studies DIR...` puts the studies of a set of checkpoints (the --out folders of seal_fast depth, transfer,
fewshot and hessian) side by side on one page, study.md, with their plots (seal_fast/runs/study_page.py); --out
defaults to runs/study-<timestamp> when no RUN_DIR is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import read_saved_config
from ..errors import ConfigError, DataError, cli_main

PAPER = {"normal160": 54.37, "normal": 49.27, "llf": 56.92, "seal": 59.22}  # Tiny-ImageNet, ResNet-50, top-1 %
ORDER = ("normal160", "normal", "llf", "seal")


@dataclass
class RunRecord:
    folder: Path
    kind: str
    seed: int
    rows: list[dict]
    planned: int

    @property
    def finished(self) -> bool:
        return len(self.rows) >= self.planned

    def figure(self, key: str) -> float | None:
        vals = [r.get(key) for r in self.rows if r.get(key) is not None]
        return vals[-1] if vals else None

    @property
    def final_val(self) -> float | None:
        vals = [r["val_acc"] for r in self.rows if r.get("val_acc") is not None]
        return vals[-1] if vals else None

    @property
    def hours(self) -> float:
        return sum(r.get("seconds") or 0.0 for r in self.rows) / 3600


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


def read_run(folder: Path) -> RunRecord:
    cfg = read_saved_config(folder / "config.json")
    rows = read_metrics(folder / "metrics.jsonl")
    for r in rows:  # runs from before per-generation figures: derive them from the rows themselves
        if "gen_best_val" not in r:
            gen = [x["val_acc"] for x in rows[:rows.index(r) + 1]
                   if x["generation"] == r["generation"] and x.get("val_acc") is not None]
            r["gen_best_val"] = max(gen) if gen else None
    return RunRecord(folder, kind_of(cfg), cfg.get("seed", 0), rows, cfg["generations"] * cfg["epochs"])


def find_runs(paths: list[str]) -> list[RunRecord]:
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p}: no such folder; give run folders or a sweep folder")
        if (p / "config.json").exists():
            runs.append(read_run(p))
            continue
        inner = sorted(q for q in p.iterdir() if (q / "config.json").exists())
        if not inner:
            raise DataError(f"{p}: neither a run folder (config.json) nor a sweep folder holding run folders")
        runs += [read_run(q) for q in inner]
    return runs


def stats(values: list[float]) -> tuple[float | None, float | None, int]:
    values = [100 * v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def summarize(runs: list[RunRecord]) -> list[dict]:
    table = []
    kinds = sorted({r.kind for r in runs}, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
    for kind in kinds:
        for finished in (True, False):
            group = [r for r in runs if r.kind == kind and r.finished == finished]
            if not group:
                continue
            row = {"kind": kind, "status": "finished" if finished else "UNFINISHED", "seeds": len(group),
                   "seed_list": " ".join(str(r.seed) for r in sorted(group, key=lambda r: r.seed))}
            for key, getter in (("last_gen_best", lambda r: r.figure("gen_best_val")),
                                ("run_best", lambda r: r.figure("best_val")), ("final", lambda r: r.final_val)):
                m, s, n = stats([getter(r) for r in group])
                row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = m, s, n
            row["epochs"] = " ".join(sorted({f"{len(r.rows)}/{r.planned}" for r in group}))
            row["wall_hours"] = statistics.fmean(r.hours for r in group)
            row["paper"] = PAPER.get(kind)
            table.append(row)
    return table


def fmt(m, s, n) -> str:
    return "-" if m is None else f"{m:.2f} +- {s:.2f} (n={n})"


def write_table(table: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = ["| run | status | val top-1 %, best in the last generation | paper | best over the whole run | "
             "final val | epochs | wall h (mean) |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['kind']} | {r['status']} (seeds {r['seed_list']}) | "
                     f"{fmt(r['last_gen_best_mean'], r['last_gen_best_std'], r['last_gen_best_n'])} | "
                     f"{'-' if r['paper'] is None else r['paper']} | "
                     f"{fmt(r['run_best_mean'], r['run_best_std'], r['run_best_n'])} | "
                     f"{fmt(r['final_mean'], r['final_std'], r['final_n'])} | {r['epochs']} | {r['wall_hours']:.2f} |")
    lines += ["", "The paper column compares with the best val top-1 within the last generation (the published code "
              "tracks the best per generation); the whole-run best is its own column. Mean +- sample std over "
              "seeds. UNFINISHED rows are runs still short of their planned epochs, never averaged with finished "
              "ones."]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[RunRecord], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {"normal160": "tab:gray", "normal": "tab:blue", "llf": "tab:orange", "seal": "tab:green"}
    shaded = False
    for kind in sorted({r.kind for r in runs}, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        group = [r for r in runs if r.kind == kind]
        epochs = sorted({x["global_epoch"] for r in group for x in r.rows if x.get("val_acc") is not None})
        if not epochs:
            continue
        per = np.full((len(group), len(epochs)), np.nan)
        for i, r in enumerate(group):
            for x in r.rows:
                if x.get("val_acc") is not None:
                    per[i, epochs.index(x["global_epoch"])] = 100 * x["val_acc"]
        mean = np.nanmean(per, axis=0)
        xs = np.array(epochs) + 1
        unfinished = sum(not r.finished for r in group)
        label = f"{kind} (n={len(group)}{', ' + str(unfinished) + ' unfinished' if unfinished else ''})"
        ax.plot(xs, mean, color=colours.get(kind), label=label, lw=1.5)
        if len(group) > 1:
            ax.fill_between(xs, np.nanmin(per, axis=0), np.nanmax(per, axis=0), color=colours.get(kind), alpha=0.2,
                            lw=0)
        if kind == "seal" and not shaded:
            for x in group[0].rows:
                if x.get("phase") == "ascent":
                    ax.axvspan(x["global_epoch"] + 0.5, x["global_epoch"] + 1.5, color="tab:red", alpha=0.08, lw=0)
            shaded = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("val top-1 per epoch: mean over seeds, band = min..max" + (", SEAL ascent shaded" if shaded else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seal_fast report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders or sweep folders")
    p.add_argument("--studies", nargs="+", metavar="DIR",
                   help="the --out folders of seal_fast depth / transfer / fewshot / hessian: study.md side by side")
    p.add_argument("--out", metavar="DIR", help="where table.md / table.csv / curves.png (and study.md) go")
    args = p.parse_args(argv)
    if not args.runs and not args.studies:
        p.error("give RUN_DIR... (the table) and / or --studies DIR... (the study page)")
    if args.studies:
        from .study_page import find_sources, write_page

        sources = find_sources(args.studies)  # every folder read and checked before anything is written
        if not args.runs:
            from ..runtime import make_out_folder

            out = make_out_folder(args.out or f"runs/study-{datetime.now():%Y%m%d-%H%M%S}")
            written = write_page(args.studies, out, sources)
            print(f"wrote {', '.join(map(str, written))} ({len(sources)} study files)")
            return 0
    runs = find_runs(args.runs)
    out = Path(args.out) if args.out else (Path(args.runs[0]) if len(args.runs) == 1 and
                                           not (Path(args.runs[0]) / "config.json").exists() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(runs)
    write_table(table, out)
    plot(runs, out / "curves.png")
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'curves.png'} ({len(runs)} runs)")
    if args.studies:
        print(f"wrote {', '.join(map(str, write_page(args.studies, out, sources)))} ({len(sources)} study files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
