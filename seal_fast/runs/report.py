"""`python -m seal_fast report RUN_DIR... [--studies DIR...] [--out DIR]`: the paper's table from run folders.

RUN_DIR is a run folder (config.json + metrics.jsonl) or a sweep folder holding run folders. Runs are grouped by
kind (normal160 = normal with 1 generation, normal, llf, seal) and by every setting that changes the result (data set
and its fingerprint, architecture, schedule, batch size, precision, optimizer...: seal_fast/runs/groups.py); only the
runs of one group are averaged over their seeds. Per group: the val top-1 the paper reports (the best within the last
generation: the published code tracks the best per generation), the best over the whole run, the final val top-1 (the
last evaluation), each as mean +- sample std (n) (no spread for n = 1), epochs done, wall hours, and the paper's
number only beside runs of the paper's recipe on the complete Tiny-ImageNet. Settings every row shares are said once
above the table; those that differ between rows are in the row. Unfinished runs get rows of their own; a run that
cannot be read is listed (file and line) and the rest are tabled.

Writes report.md, report.csv and report-curves.png (val top-1 per epoch, one line per row, seeds as a band, SEAL's
ascent epochs shaded), files of its own that never replace a file a run or a study wrote, into --out; without --out
into the one folder given, and with several folders it prints the table and writes nothing.

`--studies DIR...` puts the studies of a set of checkpoints (the --out folders of seal_fast depth, transfer,
fewshot and hessian) side by side on one page, study.md, with its plots (study-*.png; seal_fast/runs/study_page.py).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from ..cli import command_parser
from ..errors import DataError, cli_main
from ..files import write_whole, written_whole
from .groups import ORDER, Group, RunRecord, applies, differing, find_runs, group_runs, scope
from .outdir import check_own, marked, out_folder

FILES = ("report.md", "report.csv", "report-curves.png")
EXIT_CODES = ("exit codes: 0 the table (and page) written, or printed; also when some runs are unreadable (they are "
              "listed, on stderr and under the table); 1 a file could not be written (a full disk); 2 bad input, "
              "before anything is written: a missing folder, --out naming a file, no readable run, a study file that "
              "is not a study's output, a file of the report's names there that it did not write; 3 is not used (it "
              "is the trainer's non-finite loss); 130 interrupted.")


def stats(values: list[float | None]) -> tuple[float | None, float | None, int]:
    values = [100 * v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def show(k: str, v) -> str:
    return f"{k.replace('_', '-')} {'(not recorded)' if v is None else v}"


def summarize(groups: list[Group], differ: list[str]) -> list[dict]:
    table = []
    for g in groups:
        runs = sorted(g.runs, key=lambda r: r.seed)
        paper, why = g.paper
        row = {"kind": g.kind, "settings": ", ".join(show(k, g.settings.get(k)) for k in differ if applies(g, k)),
               "status": "finished" if g.finished else "UNFINISHED", "seeds": len(runs),
               "seed_list": " ".join(str(r.seed) for r in runs)}
        for key, getter in (("last_gen_best", lambda r: r.figure("gen_best_val")),
                            ("run_best", lambda r: r.figure("best_val")), ("final", lambda r: r.final_val)):
            m, s, n = stats([getter(r) for r in runs])
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = m, s, n
        row["epochs"] = " ".join(sorted({f"{len(r.rows)}/{r.planned}" for r in runs}))
        row["wall_hours"] = statistics.fmean(r.hours for r in runs)
        row["paper"], row["paper_note"] = paper, why
        row["repeated_seeds"] = "; ".join(g.repeats)
        table.append(row)
    return table


def wall(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{60 * hours:.1f} min" if hours >= 1 / 60 else f"{3600 * hours:.0f} s"


def fmt(m, s, n) -> str:
    return "-" if m is None else f"{m:.2f} (n=1)" if n == 1 else f"{m:.2f} +- {s:.2f} (n={n})"


def table_md(table: list[dict], common: dict[str, str], unreadable: list[str]) -> str:
    """common: {setting: "value" as shown}, the settings every row shares."""
    lines = ["# Runs: val top-1 (%)", ""]
    if common:
        lines += ["Every row: " + "; ".join(f"{k.replace('_', '-')} {v}" for k, v in common.items()) + ".", ""]
    lines += ["| run | settings that differ | status (seeds) | val top-1 %, best in the last generation | paper | "
              "best over the whole run | final val | epochs | wall time (mean) |", "|---" * 9 + "|"]
    for r in table:
        paper = "-" if r["paper"] is None else f"{r['paper']:.2f}"
        if r["paper_note"]:
            paper += f" ({r['paper_note']})"
        lines.append(f"| {r['kind']} | {r['settings'] or '-'} | {r['status']} (seeds {r['seed_list']}) | "
                     f"{fmt(r['last_gen_best_mean'], r['last_gen_best_std'], r['last_gen_best_n'])} | {paper} | "
                     f"{fmt(r['run_best_mean'], r['run_best_std'], r['run_best_n'])} | "
                     f"{fmt(r['final_mean'], r['final_std'], r['final_n'])} | {r['epochs']} | "
                     f"{wall(r['wall_hours'])} |")
    lines += ["", "Rows are runs of one kind and one value of every setting that changes the result; only a row's "
              "runs are averaged: mean +- sample std over seeds (n = the seeds counted; no spread for one). The paper "
              "column compares with the best val top-1 within the last generation (the published code tracks the best "
              "per generation) and is filled only beside runs of the paper's recipe on the complete Tiny-ImageNet. "
              "UNFINISHED rows are runs still short of their planned epochs, never averaged with finished ones."]
    repeats = [f"- {r['kind']} ({r['settings'] or 'as above'}), {x}" for r in table if r["repeated_seeds"]
               for x in r["repeated_seeds"].split("; ")]
    if repeats:
        lines += ["", "Repeated seeds, each counted once:", "", *repeats]
    if unreadable:
        lines += ["", f"Unreadable runs, left out of the table ({len(unreadable)}):", "",
                  *(f"- {u}" for u in unreadable)]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with written_whole(path) as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)


def plot(groups: list[Group], labels: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = {"normal160": "tab:gray", "normal": "tab:blue", "llf": "tab:orange", "seal": "tab:green"}
    styles = ["-", "--", ":", "-."]
    shaded, seen = False, {}
    for g, label in zip(groups, labels):
        epochs = sorted({x["global_epoch"] for r in g.runs for x in r.rows if x.get("val_acc") is not None})
        if not epochs:
            continue
        per = np.full((len(g.runs), len(epochs)), np.nan)
        for i, r in enumerate(g.runs):
            for x in r.rows:
                if x.get("val_acc") is not None:
                    per[i, epochs.index(x["global_epoch"])] = 100 * x["val_acc"]
        xs = np.array(epochs) + 1
        style = styles[seen.setdefault(g.kind, 0) % len(styles)]
        seen[g.kind] += 1
        ax.plot(xs, np.nanmean(per, axis=0), color=colours.get(g.kind), ls=style, lw=1.5,
                label=f"{label} (n={len(g.runs)}{'' if g.finished else ', unfinished'})")
        if len(g.runs) > 1:
            ax.fill_between(xs, np.nanmin(per, axis=0), np.nanmax(per, axis=0), color=colours.get(g.kind), alpha=0.2,
                            lw=0)
        if g.kind == "seal" and not shaded:
            for x in g.runs[0].rows:
                if x.get("phase") == "ascent":
                    ax.axvspan(x["global_epoch"] + 0.5, x["global_epoch"] + 1.5, color="tab:red", alpha=0.08, lw=0)
            shaded = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("val top-1 per epoch: mean over seeds, band = min..max" + (", SEAL ascent shaded" if shaded else ""))
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser():
    p = command_parser("report", __doc__.split("\n\n")[0], epilog=EXIT_CODES)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders or sweep folders")
    p.add_argument("--studies", nargs="+", metavar="DIR",
                   help="the --out folders of seal_fast depth / transfer / fewshot / hessian: study.md side by side")
    p.add_argument("--out", metavar="DIR",
                   help="folder for report.md, report.csv, report-curves.png (and study.md, study-*.png); created if "
                        "needed. Default: the one RUN_DIR given (or, with --studies alone, the one --studies folder); "
                        "with several folders and no --out the table is printed and nothing is written")
    return p


def default_out(args) -> Path | None:
    if args.out:
        return Path(args.out)
    if len(args.runs) == 1:
        return Path(args.runs[0])
    if not args.runs and len(args.studies or []) == 1:
        return Path(args.studies[0])
    return None


def run(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.runs and not args.studies:
        p.error("give RUN_DIR... (the table) and / or --studies DIR... (the study page)")
    out = default_out(args)
    if args.out:
        out_folder(out, create=False)  # --out FILE: one line before anything is read
    sources = None
    if args.studies:
        from .study_page import find_sources

        sources = find_sources(args.studies)  # every folder read and checked before anything is written
    runs, unreadable = find_runs(args.runs) if args.runs else ([], [])
    if args.runs and not runs:
        raise DataError(f"no readable run among {len(unreadable)}: {unreadable[0]}"
                        + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""))
    for u in unreadable:
        print(f"warning: unreadable, left out of the table: {u}", file=sys.stderr)
    if out is not None:
        out = out_folder(out)
        if runs:
            check_own(out, FILES[0], list(FILES[1:]), "report")
        if sources:
            from .study_page import check_page

            check_page(out)
    if runs:
        write_runs(runs, unreadable, out)
    if sources:
        from .study_page import render_page, write_page

        if out is None:
            print(render_page(sources))
        else:
            written = write_page(args.studies, out, sources)
            print(f"wrote {', '.join(map(str, written))} ({len(sources)} study files)")
    if out is None:
        folders = len(args.runs) + len(args.studies or [])
        what = [", ".join(FILES)] if runs else []
        what += ["study.md with its plots"] if sources else []
        print(f"nothing written: {folders} folders were given; --out DIR writes {' and '.join(what)} into DIR")
    return 0


def write_runs(runs: list[RunRecord], unreadable: list[str], out: Path | None) -> None:
    groups = group_runs(runs)
    differ, common = differing(groups)
    table = summarize(groups, differ)
    text = table_md(table, {k: f"{v}{scope(groups, k)}" for k, v in common.items()}, unreadable)
    print(text)
    if out is None:
        return
    write_whole(out / FILES[0], marked(text, "report"))  # first: the other two are the report's beside it
    write_csv(table, out / FILES[1])
    plot(groups, [f"{r['kind']}" + (f" [{r['settings']}]" if r["settings"] else "") for r in table], out / FILES[2])
    print(f"wrote {', '.join(str(out / f) for f in FILES)} ({len(runs)} runs in {len(groups)} rows"
          + (f", {len(unreadable)} unreadable" if unreadable else "") + ")")


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, "interrupted; nothing was written")


__all__ = ["ORDER", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
