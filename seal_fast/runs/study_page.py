"""`python -m seal_fast report --studies DIR...`: the whole study of a set of checkpoints on one markdown page.

DIR is the --out folder of any of the studies (a folder may hold several of their JSON files), or a folder
holding such folders:
  depth.json     python -m seal_fast depth     per-layer KNN-probe accuracy, prediction depth
  transfer.json  python -m seal_fast transfer  linear-probe top-1 on other datasets
  fewshot.json   python -m seal_fast fewshot   few-shot accuracy +- 95% interval
  hessian.json   python -m seal_fast hessian   top Hessian eigenvalue, trace, eigenvalue density
Checkpoints are matched across the studies by their path (the studies write it absolute or as given on their
command line; a relative one is matched to the absolute path it ends with, else taken from the current folder).
Writes study.md into --out (default: the one folder given; with several and no --out the page is printed and
nothing is written): the checkpoints side by side (an overview, then one section per study; a study no folder
holds says "not run"), the source folders and the protocol each JSON carries, and the plots redrawn from the JSONs
with the studies' own plotting code (study-probe_accuracy.png and study-depth_histogram.png: one line / colour per
checkpoint; study-spectrum.png: the Hessian eigenvalue density of every checkpoint). These names are the page's own:
it never replaces a file a study wrote (a study's probe_accuracy.png, spectrum.png or table.md), and refuses, in one
line, to replace a study.md it did not write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from ..files import write_whole
from .outdir import check_own, marked

PLOTS = ("study-probe_accuracy.png", "study-depth_histogram.png", "study-spectrum.png")
FILES = {"depth": "depth.json", "transfer": "transfer.json", "fewshot": "fewshot.json", "hessian": "hessian.json"}
TITLES = {"depth": "Per-layer k-NN probe accuracy (%) and prediction depth",
          "transfer": "Transfer: linear probe of the frozen backbone, test top-1 (%)",
          "fewshot": "Few-shot: query accuracy (%) ± 95% interval",
          "hessian": "Hessian: top eigenvalue and trace"}
# the fields the page reads from each result; a result without one is not the study's output
NEEDS = {"depth": ("checkpoint", "label", "probes", "network_acc", "mean_depth", "depth_histogram", "k", "split",
                   "features", "samples"),
         "transfer": ("checkpoint", "label", "dataset", "image_size", "resize", "top1"),
         "fewshot": ("checkpoint", "label", "dataset", "image_size", "ways", "shots", "accuracy", "ci95"),
         "hessian": ("checkpoint", "label", "loss", "top_eigenvalues", "trace", "density", "settings")}


@dataclass
class Source:
    """One study JSON: its kind, file, creation time, protocol (transfer, few-shot) and results."""
    kind: str
    path: Path
    rows: list[dict]
    created: str | None = None
    protocol: dict | None = None


def load(kind: str, path: Path) -> Source:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSON: data only, nothing runs
        exc = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise DataError(f"{path}: not readable JSON ({exc}); rerun python -m seal_fast.{kind} into that folder "
                        "or leave the folder out") from None
    rows = doc if kind == "hessian" else doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: holds no results ({'a list of results' if kind == 'hessian' else 'results'} "
                        f"expected, as python -m seal_fast.{kind} writes)")
    for i, r in enumerate(rows):
        missing = [k for k in NEEDS[kind] if not isinstance(r, dict) or k not in r]
        bad = not missing and (
            (kind == "depth" and not (isinstance(r["probes"], list) and r["probes"]))
            or (kind == "hessian" and not (isinstance(r["top_eigenvalues"], list) and r["top_eigenvalues"]
                                           and isinstance(r["trace"], dict) and {"mean", "std"} <= set(r["trace"])
                                           and isinstance(r["density"], dict))))
        if missing or bad:
            what = f"lacks {', '.join(missing)}" if missing else "has a malformed probes / eigenvalue / trace entry"
            raise DataError(f"{path}: result {i + 1} {what}; not the output of python -m seal_fast.{kind}")
    meta = doc if isinstance(doc, dict) else {}
    return Source(kind, path, rows, meta.get("created"), meta.get("protocol"))


def find_sources(folders: list[str]) -> list[Source]:
    """Every study JSON in the folders (or in their sub-folders, one level down), in the order given."""
    expected = ", ".join(FILES.values())
    sources = []
    for p in map(Path, folders):
        if not p.is_dir():
            raise ConfigError(f"--studies {p}: no such folder; give the --out folders of the studies ({expected})")
        here = [(k, p / f) for k, f in FILES.items() if (p / f).is_file()]
        if not here:
            here = [(k, q / f) for q in sorted(x for x in p.iterdir() if x.is_dir()) for k, f in FILES.items()
                    if (q / f).is_file()]
        if not here:
            raise DataError(f"--studies {p}: holds none of {expected} (nor does a folder in it); give the --out "
                            "folder of python -m seal_fast depth / transfer / fewshot / hessian")
        sources += [load(k, f) for k, f in here if f.resolve() not in {s.path.resolve() for s in sources}]
    return sources


# ----------------------------------------------------------------------------------------------
# Checkpoints: one key per checkpoint file, one readable label each
# ----------------------------------------------------------------------------------------------


def _real(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else os.path.normpath(os.path.abspath(path))


def checkpoint_keys(paths: list[str]) -> dict[str, str]:
    """{path as a study wrote it: the checkpoint's absolute path}. A relative path names the file it names from the
    current folder when that exists, else the one absolute path among the others that ends with it."""
    absolute = {p: _real(p) for p in paths if os.path.isabs(p)}
    keys = dict(absolute)
    for p in paths:
        if p in keys:
            continue
        if os.path.exists(p):
            keys[p] = _real(p)
            continue
        parts = Path(os.path.normpath(p)).parts
        ends = {a for a in absolute.values() if Path(a).parts[-len(parts):] == parts}
        keys[p] = ends.pop() if len(ends) == 1 else _real(p)
    return keys


def short_labels(keys: list[str]) -> dict[str, str]:
    """{absolute path: "run/file"}, with more parent folders where two would read the same."""
    depth, labels = 2, {}
    while True:
        labels = {k: "/".join(Path(k).parts[-depth:]) for k in keys}
        if len(set(labels.values())) == len(labels) or depth > max(len(Path(k).parts) for k in keys):
            return labels
        depth += 1


@dataclass
class Study:
    sources: list[Source]
    keys: dict[str, str] = field(default_factory=dict)      # path as written -> absolute path
    order: list[str] = field(default_factory=list)          # absolute paths, first seen first
    labels: dict[str, str] = field(default_factory=dict)    # absolute path -> short label
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        paths = [str(r["checkpoint"]) for s in self.sources for r in s.rows]
        self.keys = checkpoint_keys(paths)
        self.order = list(dict.fromkeys(self.keys[p] for p in paths))
        self.labels = short_labels(self.order)

    def of(self, kind: str) -> list[tuple[Source, dict]]:
        return [(s, r) for s in self.sources if s.kind == kind for r in s.rows]

    def key(self, r: dict) -> str:
        return self.keys[str(r["checkpoint"])]

    def cells(self, kind: str, column) -> dict[tuple[str, str], dict]:
        """{(checkpoint, column(r)): r}; a repeat of a cell in a later folder is noted and not shown."""
        out: dict[tuple[str, str], dict] = {}
        where: dict[tuple[str, str], Source] = {}
        for s, r in self.of(kind):
            cell = (self.key(r), column(r))
            if cell in out:
                what = self.labels[cell[0]] + (f" / {cell[1]}" if cell[1] else "")
                self.notes.append(f"{kind}: {what} is in {where[cell].path} and again in {s.path}; the first is shown")
                continue
            out[cell], where[cell] = r, s
        return out


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


def _esc(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], text: int = 1) -> list[str]:
    """A markdown table: the first `text` columns left-aligned, the rest (numbers) right-aligned."""
    return (["| " + " | ".join(map(_esc, header)) + " |", "|" + "---|" * text + "---:|" * (len(header) - text)]
            + ["| " + " | ".join(map(_esc, r)) + " |" for r in rows])


def _setting(r: dict) -> str:
    return f"{r['split']} split, k = {r['k']}, {r['features']}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _not_run(kind: str) -> list[str]:
    return [f"not run (no {FILES[kind]} in the --studies folders: python -m seal_fast.{kind})", ""]


class Page:
    def __init__(self, study: Study, out: Path | None):
        self.s, self.out = study, out
        self.written: list[Path] = []
        self.overview: list[list[str]] = []   # rows of the side-by-side table, one column per checkpoint
        from ..studies import fewshot, transfer

        self.tr_col, self.fs_col = transfer.column, fewshot.column

    def row(self, name: str, values: dict[str, str]) -> None:
        self.overview.append([name] + [values.get(k, "") for k in self.s.order])

    # 1. depth ------------------------------------------------------------------------------------
    def depth(self) -> list[str]:
        from ..plots import plot_depth_histogram, plot_probe_accuracy

        if not self.s.of("depth"):
            return _not_run("depth")
        several = len({_setting(r) for _, r in self.s.of("depth")}) > 1
        cells = self.s.cells("depth", _setting)
        cols = [(k, st) for k in self.s.order for st in dict.fromkeys(_setting(r) for _, r in self.s.of("depth"))
                if (k, st) in cells]
        name = {c: self.s.labels[c[0]] + (f" ({c[1]})" if several else "") for c in cols}
        probes = list(dict.fromkeys(p["name"] for c in cols for p in cells[c]["probes"] if p["name"] != "output"))
        acc = {c: {p["name"]: p.get("knn_acc") for p in cells[c]["probes"]} for c in cols}

        def depth(r):  # of P k-NN probes: depth P = only the network's own output agrees
            return f"{r['mean_depth']:.2f} of {len(r['probes']) - 1}"

        lines = _table(["probe"] + [name[c] for c in cols],
                       [[p] + [_pct(acc[c].get(p)) for c in cols] for p in probes]
                       + [["output (the network's own top-1)"] + [_pct(cells[c]["network_acc"]) for c in cols],
                          ["mean prediction depth (0 .. probes)"] + [depth(cells[c]) for c in cols],
                          ["samples"] + [str(cells[c]["samples"]) for c in cols]])
        for st in dict.fromkeys(c[1] for c in cols):
            tag = f", {st}" if several else ""
            self.row(f"network top-1 (%){tag}", {c[0]: _pct(cells[c]["network_acc"]) for c in cols if c[1] == st})
            self.row(f"mean prediction depth{tag}", {c[0]: depth(cells[c]) for c in cols if c[1] == st})
        rows = [dict(cells[c], label=name[c]) for c in cols]
        figures = []
        if self.out is not None:
            plot_probe_accuracy(rows, self.out / PLOTS[0])
            plot_depth_histogram(rows, self.out / PLOTS[1])
            self.written += [self.out / PLOTS[0], self.out / PLOTS[1]]
            figures = ["", f"![k-NN probe accuracy per layer]({PLOTS[0]})", "",
                       f"![prediction depth histogram]({PLOTS[1]})"]
        setting = "" if several else f" ({_setting(rows[0])} embeddings)"
        return (["k-NN probe accuracy after each block, probes as rows, checkpoints as columns" + setting +
                 "; the prediction depth of a sample is the first probe from which every later probe agrees with "
                 "the network.", ""] + lines + figures + [""])

    # 2. transfer ---------------------------------------------------------------------------------
    def transfer(self) -> list[str]:
        from ..studies.transfer import PAPER_COLUMNS, PAPER_TABLE1

        if not self.s.of("transfer"):
            return _not_run("transfer")
        cells = self.s.cells("transfer", self.tr_col)
        cols = list(dict.fromkeys(self.tr_col(r) for _, r in self.s.of("transfer")))
        keys = [k for k in self.s.order if any((k, c) in cells for c in cols)]
        for c in cols:
            self.row(f"transfer {c}: top-1 (%)", {k: f"{cells[(k, c)]['top1']:.2f}" for k in keys if (k, c) in cells})
        return (_table(["checkpoint"] + cols, [[self.s.labels[k]] + [f"{cells[(k, c)]['top1']:.2f}"
                                                                     if (k, c) in cells else "" for c in cols]
                                               for k in keys])
                + ["", "The paper's Table 1 (ResNet-50 trained on Tiny-ImageNet), for comparison:", ""]
                + _table(["method"] + PAPER_COLUMNS, [[m] + [f"{v:.2f}" for v in vals]
                                                      for m, vals in PAPER_TABLE1.items()]) + [""])

    # 3. few-shot ---------------------------------------------------------------------------------
    def fewshot(self) -> list[str]:
        from ..studies.fewshot import PAPER_20SHOT

        if not self.s.of("fewshot"):
            return _not_run("fewshot")
        cells = self.s.cells("fewshot", self.fs_col)
        cols = list(dict.fromkeys(self.fs_col(r) for _, r in self.s.of("fewshot")))
        keys = [k for k in self.s.order if any((k, c) in cells for c in cols)]

        def fmt(r):
            return f"{r['accuracy']:.2f} ± {r['ci95']:.2f}"

        for c in cols:
            self.row(f"few-shot {c} (%)", {k: fmt(cells[(k, c)]) for k in keys if (k, c) in cells})
        episodes = " / ".join(sorted({str(r.get("episodes", "?")) for _, r in self.s.of("fewshot")}))
        note = (f"Mean over {episodes} episodes ± 1.96 std / sqrt(episodes); every checkpoint sees the same episodes "
                "(paired differences: the study's own table.md).")
        return (_table(["checkpoint"] + cols, [[self.s.labels[k]] + [fmt(cells[(k, c)]) if (k, c) in cells else ""
                                                                     for c in cols] for k in keys])
                + ["", note, "", "The paper's 20-shot table (5-way, 600 episodes), for comparison:", ""]
                + _table(["method", "EuroSAT", "CropDisease"], [[m, v["EuroSAT"], v["CropDisease"]]
                                                                for m, v in PAPER_20SHOT.items()]) + [""])

    # 4. Hessian ----------------------------------------------------------------------------------
    def hessian(self) -> list[str]:
        from ..studies.hessian_plots import plot_spectrum

        if not self.s.of("hessian"):
            return _not_run("hessian")
        cells = self.s.cells("hessian", lambda r: "")
        keys = [k for k in self.s.order if (k, "") in cells]
        top = max(len(cells[(k, "")]["top_eigenvalues"]) for k in keys)

        def trace(r):
            t = r["trace"]
            return f"{t['mean']:.6g} ± {t['std']:.3g}" + (f" ({t['samples']} vectors)" if "samples" in t else "")

        self.row("Hessian top eigenvalue", {k: f"{cells[(k, '')]['top_eigenvalues'][0]:.6g}" for k in keys})
        self.row("Hessian trace (mean ± std)", {k: trace(cells[(k, "")]) for k in keys})
        rows = []
        for k in keys:
            r = cells[(k, "")]
            s = r["settings"]
            rows.append([self.s.labels[k], f"{r['loss']:.4f}", f"{r['top_eigenvalues'][0]:.6g}"]
                        + ([", ".join(f"{x:.4g}" for x in r["top_eigenvalues"])] if top > 1 else [])
                        + [trace(r), f"{s.get('samples', '?')} ({s.get('dtype', '?')})"])
        lines = _table(["checkpoint", "loss", "top eigenvalue"] + (["top eigenvalues"] if top > 1 else [])
                       + ["trace (mean ± std over Rademacher vectors)", "images (dtype)"], rows)
        dense = [dict(cells[(k, "")], label=self.s.labels[k]) for k in keys if cells[(k, "")]["density"].get("nodes")]
        if dense and self.out is not None:
            plot_spectrum(dense, self.out / PLOTS[2])
            self.written.append(self.out / PLOTS[2])
            lines += ["", f"![Hessian eigenvalue density]({PLOTS[2]})"]
        elif not dense:
            lines += ["", "No eigenvalue density in hessian.json (run with --slq-runs 0)."]
        return lines + [""]

    # provenance ----------------------------------------------------------------------------------
    def provenance(self) -> list[str]:
        lines = []
        for src in self.s.sources:
            when = f", created {src.created}" if src.created else ""
            lines.append(f"- **{src.kind}**: `{src.path.resolve()}`{when}, {len(src.rows)} result(s)")
            if src.kind == "depth":
                for st in dict.fromkeys(_setting(r) for r in src.rows):
                    lines.append(f"  - k-NN probes: {st} embeddings")
            elif src.kind == "hessian":
                for st in dict.fromkeys(json.dumps(r["settings"]) for r in src.rows):
                    lines.append("  - settings: " + ", ".join(f"{k} {v}" for k, v in json.loads(st).items()))
            for k, v in (src.protocol or {}).items():
                if isinstance(v, list):
                    v = ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
                lines.append(f"  - {k}: {v}")
        return lines + [f"- note: {n}" for n in self.s.notes] + [""]

    def render(self) -> str:
        sections = {kind: getattr(self, kind)() for kind in FILES}   # fills self.overview as it goes
        run = [k for k in FILES if self.s.of(k)]
        lines = ["# The study: " + ", ".join(self.s.labels[k] for k in self.s.order), "",
                 f"Studies run: {', '.join(run)}"
                 + (f"; not run: {', '.join(k for k in FILES if k not in run)}." if len(run) < len(FILES) else "."),
                 "", "Checkpoints (the columns below):", ""]
        names: dict[str, dict] = {}
        for _, r in [x for kind in FILES for x in self.s.of(kind)]:
            names.setdefault(self.s.key(r), {})[str(r["label"])] = None
        lines += _table(["checkpoint", "path", "as the studies name it", "studies"],
                        [[self.s.labels[k], f"`{k}`", "; ".join(names[k]),
                          ", ".join(kind for kind in FILES if any(self.s.key(r) == k for _, r in self.s.of(kind)))]
                         for k in self.s.order], text=4)
        lines += ["", "## Side by side", ""]
        lines += _table(["result"] + [self.s.labels[k] for k in self.s.order], self.overview) + [""]
        for i, kind in enumerate(FILES, 1):
            lines += [f"## {i}. {TITLES[kind]}", ""] + sections[kind]
        lines += ["## Provenance", ""] + self.provenance()
        return "\n".join(lines)


def check_page(out: Path) -> None:
    """Refuse (one line) before anything is written when `out` holds a study.md or study-*.png not written here."""
    check_own(out, "study.md", list(PLOTS), "report")


def render_page(sources: list[Source]) -> str:
    """The page as text, without its plots (nothing is written)."""
    return Page(Study(sources), None).render()


def write_page(folders: list[str], out: Path, sources: list[Source] | None = None) -> list[Path]:
    """study.md and its plots in `out` (which exists); returns the files written, the page first."""
    check_page(out)
    page = Page(Study(sources if sources is not None else find_sources(folders)), out)
    text = marked(page.render(), "report")
    write_whole(out / "study.md", text)
    return [out / "study.md"] + page.written
