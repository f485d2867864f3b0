"""`python -m seal_fast report --studies DIR...`: the study page. The study folders are written by the studies' own
writers (depth / transfer / fewshot / hessian .write_outputs) from hand-made results, so their format is the real
one and no network runs."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from seal_fast.runs import report
from seal_fast.studies import depth, fewshot, hessian, transfer
from seal_fast.studies.features import FeatureCache, Transform

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
PROBES = ["input", "stem", "block.1.0", "block.2.0"]
# per checkpoint: k-NN accuracy of each probe, network accuracy, per-sample depth (4 samples)
DEPTH = {"seal-s0": ([0.25, 0.5, 0.75, 1.0], 0.75, [0, 1, 4, 2]),
         "normal160-s0": ([0.25, 0.25, 0.5, 0.5], 0.5, [4, 4, 3, 1])}
TOP1 = {("seal-s0", "Flower102"): 45.5, ("seal-s0", "CUB-200"): 8.25, ("normal160-s0", "Flower102"): 34.125}
FEW = {"seal-s0": (87.7, 0.52), "normal160-s0": (81.5, 0.61)}
HESS = {"seal-s0": ([12.5, 3.0], [100.0, 140.0]), "normal160-s0": ([40.25, 5.0], [300.0, 260.0])}


def ckpt(root: Path, run: str) -> Path:
    return root / "runs" / run / "last.pt"


def label(run: str) -> str:
    return f"{run.split('-')[0].removesuffix('160')} @ epoch 3 ({run}/last.pt)"


def write_depth(out: Path, root: Path, relative: bool) -> None:
    results = []
    for run, (acc, net, d) in DEPTH.items():
        path = str(Path("runs", run, "last.pt")) if relative else str(ckpt(root, run))  # as given on its command line
        results.append(depth.Result(path, label(run), PROBES, dict(zip(PROBES, acc)), net, torch.tensor(d),
                                    torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                                    torch.zeros(len(PROBES), 4, dtype=torch.long), {n: 8 for n in PROBES}))
    depth.write_outputs(out, results, Namespace(k=3, split="val", features="pooled"))


def write_hessian(out: Path, root: Path) -> None:
    results = []
    for i, (run, (ev, est)) in enumerate(HESS.items()):
        results.append(hessian.Result(str(ckpt(root, run)), label(run), 1.5 + i, 1000, ["fc.weight", "fc.bias"], hessian.Eigen(ev, [3, 3],
                                      [True, True], torch.zeros(2, 4)), hessian.Trace(est, True),
                                      hessian.Density([[-0.5, 1.0, ev[0]]], [[0.25, 0.5, 0.25]], [3]), 12, 0.5))
    hessian.write_outputs(out, results, {"data": "tiny", "samples": 4, "dtype": "float32", "slq_runs": 1,
                                         "slq_steps": 3, "seed": 0})


def write_transfer(out: Path, root: Path) -> None:
    rows = [{"checkpoint": str(ckpt(root, run)), "label": label(run), "method": label(run).split()[0], "dataset": ds,
             "image_size": 64, "resize": 64, "top1": top1, "l2": 0.1, "val_top1": 50.0, "val_source": "val",
             "train_images": 10, "val_images": 2, "test_images": 5, "classes": 3, "feature_dim": 8}
            for (run, ds), top1 in TOP1.items()]
    args = Namespace(image_size=64, tol=1e-6, max_iter=1000, l2_grid=[1.0, 0.1], seed=0)
    protocol = transfer.protocol_dict(args, Transform(64, 64), None, torch.device("cpu"), FeatureCache(None))
    transfer.write_outputs(out, rows, protocol)


def write_fewshot(out: Path, root: Path) -> None:
    rows = [{"checkpoint": str(ckpt(root, run)), "label": label(run), "method": label(run).split()[0],
             "dataset": "EuroSAT", "image_size": 64, "resize": 73, "ways": 5, "shots": 20, "queries": 15,
             "episodes": 3, "seed": 0, "accuracy": acc, "ci95": ci, "episodes_sha1": "x", "accuracies": [acc, acc, acc]}
            for run, (acc, ci) in FEW.items()]
    fewshot.write_outputs(out, rows, {"episodes": "5-way, shots [20], 15 queries per class, 3 episodes",
                                      "score": "mean query accuracy (%) over episodes"})


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """curv/ holds depth.json (relative checkpoint paths, as typed) and hessian.json; evals/ holds transfer/ and
    fewshot/ (a folder of study folders)."""
    root = tmp_path_factory.mktemp("study")
    for sub in ("curv", "evals/transfer", "evals/fewshot"):
        (root / sub).mkdir(parents=True)
    write_depth(root / "curv", root, relative=True)
    write_hessian(root / "curv", root)
    write_transfer(root / "evals" / "transfer", root)
    write_fewshot(root / "evals" / "fewshot", root)
    return root


def row(md: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    hits = [ln for ln in md.splitlines() if ln.startswith(f"| {first} |")]
    assert len(hits) == 1, (first, hits)
    return [c.strip() for c in hits[0].strip("|").split("|")][1:]


def sections(md: str) -> list[str]:
    """The page's parts: the head, then each "## " section (title line first)."""
    return md.split("\n## ")


def test_page_puts_every_study_side_by_side(studies, tmp_path, capsys):
    out = tmp_path / "page"
    assert report.main(["--studies", str(studies / "curv"), str(studies / "evals"), "--out", str(out)]) == 0
    assert "study.md" in capsys.readouterr().out
    md = (out / "study.md").read_text()
    head, side, dep, tr, fs, hs, prov = sections(md)
    s0, n0 = "seal-s0/last.pt", "normal160-s0/last.pt"
    # two checkpoints: depth.json's relative paths matched to the absolute ones of the other studies
    assert row(head, "checkpoint") == ["path", "as the studies name it", "studies"]
    assert row(head, s0) == [f"`{ckpt(studies, 'seal-s0')}`", label("seal-s0"), "depth, transfer, fewshot, hessian"]
    assert row(head, n0)[0] == f"`{ckpt(studies, 'normal160-s0')}`"
    assert sum(ln.startswith("| ") for ln in head.splitlines()) == 3   # header + two checkpoints
    # side by side: one column per checkpoint
    assert row(side, "result") == [s0, n0]
    assert row(side, "network top-1 (%)") == ["75.00", "50.00"]
    assert row(side, "mean prediction depth") == ["1.75 of 4", "3.00 of 4"]
    assert row(side, "transfer Flower102: top-1 (%)") == ["45.50", "34.12"]
    assert row(side, "transfer CUB-200: top-1 (%)") == ["8.25", ""]
    assert row(side, "few-shot EuroSAT 5-way 20-shot (%)") == ["87.70 ± 0.52", "81.50 ± 0.61"]
    assert row(side, "Hessian top eigenvalue") == ["12.5", "40.25"]
    assert row(side, "Hessian trace (mean ± std)") == ["120 ± 28.3 (2 vectors)", "280 ± 28.3 (2 vectors)"]
    # 1. probes as rows, checkpoints as columns
    assert dep.startswith("1. Per-layer") and row(dep, "probe") == [s0, n0]
    assert row(dep, "stem") == ["50.00", "25.00"] and row(dep, "block.2.0") == ["100.00", "50.00"]
    assert row(dep, "output (the network's own top-1)") == ["75.00", "50.00"]
    assert row(dep, "mean prediction depth (0 .. probes)") == ["1.75 of 4", "3.00 of 4"]
    # 2.-4. checkpoints as rows
    assert tr.startswith("2. Transfer") and row(tr, "checkpoint") == ["Flower102", "CUB-200"]
    assert row(tr, s0) == ["45.50", "8.25"] and row(tr, n0) == ["34.12", ""]
    assert row(tr, "SEAL")[0] == "45.68"   # the paper's Table 1 beside it
    assert fs.startswith("3. Few-shot") and row(fs, s0) == ["87.70 ± 0.52"] and "Mean over 3 episodes" in fs
    assert hs.startswith("4. Hessian")
    assert row(hs, s0) == ["1.5000", "12.5", "12.5, 3", "120 ± 28.3 (2 vectors)", "4 (float32)"]
    assert row(hs, n0)[:3] == ["2.5000", "40.25", "40.25, 5"]
    # plots redrawn into --out and linked; provenance names each file and its protocol
    for png in ("study-probe_accuracy.png", "study-depth_histogram.png", "study-spectrum.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"]({png})" in md
    for f in ("curv/depth.json", "curv/hessian.json", "evals/transfer/transfer.json", "evals/fewshot/fewshot.json"):
        assert f"`{(studies / f).resolve()}`" in prov
    assert "k-NN probes: val split, k = 3, pooled embeddings" in prov and "l2_grid: 1, 0.1" in prov
    assert "settings: data tiny, samples 4" in prov and "episodes: 5-way, shots [20]" in prov
    assert "not run" not in md


def test_absent_studies_say_not_run(studies, tmp_path):
    out = tmp_path / "page"
    assert report.main(["--studies", str(studies / "evals" / "transfer"), "--out", str(out)]) == 0
    md = (out / "study.md").read_text()
    assert "Studies run: transfer; not run: depth, fewshot, hessian." in md
    for kind, file in (("depth", "depth.json"), ("fewshot", "fewshot.json"), ("hessian", "hessian.json")):
        assert f"not run (no {file} in the --studies folders: python -m seal_fast.{kind})" in md
    assert row(sections(md)[1], "transfer Flower102: top-1 (%)") == ["45.50", "34.12"]
    assert sorted(p.name for p in out.iterdir()) == ["study.md"]


def test_runs_and_studies_together_and_the_table_alone_unchanged(studies, tmp_path, capsys):
    run = tmp_path / "sweep" / "seal-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "seal", "generations": 1, "epochs": 1, "seed": 0}))
    (run / "metrics.jsonl").write_text(json.dumps({"generation": 0, "epoch": 0, "global_epoch": 0, "phase": "descent",
                                                   "val_acc": 0.5, "best_val": 0.5, "seconds": 60.0}) + "\n")
    assert report.main([str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["report-curves.png", "report.csv", "report.md",
                                                                       "seal-s0"]
    assert report.main([str(tmp_path / "sweep"), "--studies", str(studies / "evals" / "fewshot")]) == 0
    assert (tmp_path / "sweep" / "study.md").is_file() and (tmp_path / "sweep" / "report.md").is_file()
    with pytest.raises(SystemExit) as e:
        report.main([])
    assert e.value.code == 2 and "--studies" in capsys.readouterr().err


def test_repeats_and_several_depth_settings(studies, tmp_path):
    """The same transfer cell in two folders: the first shown, the repeat noted; depth at two k: two columns each."""
    import shutil

    shutil.copytree(studies / "evals" / "transfer", tmp_path / "again")
    (tmp_path / "k5").mkdir()
    write_depth(tmp_path / "k5", studies, relative=False)
    doc = json.loads((tmp_path / "k5" / "depth.json").read_text())
    for r in doc["results"]:
        r["k"], r["network_acc"] = 5, r["network_acc"] / 2
    (tmp_path / "k5" / "depth.json").write_text(json.dumps(doc))
    out = tmp_path / "page"
    folders = [studies / "curv", tmp_path / "k5", studies / "evals" / "transfer", tmp_path / "again",
               studies / "curv"]   # a folder given twice is read once
    assert report.main(["--studies", *map(str, folders), "--out", str(out)]) == 0
    md = (out / "study.md").read_text()
    _, side, dep, tr, *_ = sections(md)
    s0, n0 = "seal-s0/last.pt", "normal160-s0/last.pt"
    assert row(side, "result") == [s0, n0] and row(tr, s0) == ["45.50", "8.25"]
    assert row(side, "network top-1 (%), val split, k = 3, pooled") == ["75.00", "50.00"]
    assert row(side, "network top-1 (%), val split, k = 5, pooled") == ["37.50", "25.00"]
    assert row(dep, "probe") == [f"{s0} (val split, k = 3, pooled)", f"{s0} (val split, k = 5, pooled)",
                                 f"{n0} (val split, k = 3, pooled)", f"{n0} (val split, k = 5, pooled)"]
    notes = [ln for ln in md.splitlines() if ln.startswith("- note: transfer:")]
    assert len(notes) == 3 and str(tmp_path / "again" / "transfer.json") in notes[0]
    assert md.count("- **hessian**") == 1


def break_json(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case,words", [
    ("missing", ["no such folder", "depth.json, transfer.json, fewshot.json, hessian.json"]),
    ("empty", ["holds none of depth.json, transfer.json, fewshot.json, hessian.json"]),
    ("malformed", ["transfer.json: not readable JSON"]),
    ("no-results", ["depth.json: holds no results"]),
    ("wrong-fields", ["hessian.json: result 1 lacks", "top_eigenvalues"]),
])
def test_bad_input_is_one_line(studies, tmp_path, capsys, case, words):
    bad = tmp_path / "bad"
    if case == "empty":
        bad.mkdir()
    elif case == "malformed":
        break_json(bad, "transfer.json", '{"results": [')
    elif case == "no-results":
        break_json(bad, "depth.json", '{"created": "x", "results": []}')
    elif case == "wrong-fields":
        break_json(bad, "hessian.json", json.dumps([{"checkpoint": "a.pt", "label": "a"}]))
    out = tmp_path / "out"
    assert report.main(["--studies", str(studies / "curv"), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (out / "study.md").exists()


def test_python_m_error_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "seal_fast", "report", "--studies", str(tmp_path / "nope")], cwd=ROOT,
                         check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "no such folder" in res.stderr


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_without_out_the_page_goes_into_the_one_folder_beside_the_studys_own_files(studies, tmp_path, capsys):
    import shutil

    folder = tmp_path / "curv"
    shutil.copytree(studies / "curv", folder)   # depth.json, probe_accuracy.png, ... and hessian's table.md
    before = tree(folder)
    assert {"probe_accuracy.png", "depth_histogram.png", "spectrum.png", "table.md"} <= set(before)
    assert report.main(["--studies", str(folder)]) == 0
    after = tree(folder)
    assert {k: after[k] for k in before} == before           # not one file of the studies changed
    assert sorted(set(after) - set(before)) == ["study-depth_histogram.png", "study-probe_accuracy.png",
                                                "study-spectrum.png", "study.md"]
    assert report.main(["--studies", str(folder)]) == 0       # its own page: rewritten
    assert "--studies" in report.parser().format_help() and "Default: the one RUN_DIR" in report.parser().format_help()


def test_several_folders_without_out_print_the_page_and_write_nothing(studies, tmp_path, capsys):
    import shutil

    for sub in ("curv", "evals"):
        shutil.copytree(studies / sub, tmp_path / sub)
    before = tree(tmp_path)
    assert report.main(["--studies", str(tmp_path / "curv"), str(tmp_path / "evals")]) == 0
    out = capsys.readouterr().out
    assert "## 1. Per-layer k-NN probe accuracy" in out and "## 4. Hessian" in out
    assert "nothing written: 2 folders were given; --out DIR writes study.md with its plots into DIR" in out
    assert tree(tmp_path) == before


def test_a_study_md_not_its_own_is_never_replaced(studies, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "study.md").write_text("my notes\n")
    assert report.main(["--studies", str(studies / "curv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "study.md: already there and not written by" in err and err.count("\n") == 1
    assert (out / "study.md").read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == ["study.md"]


@pytest.mark.parametrize("sub", ["", "sub"])
def test_out_naming_a_file_is_one_line(studies, tmp_path, capsys, sub):
    f = tmp_path / "afile"
    f.write_text("x")
    assert report.main(["--studies", str(studies / "curv"), "--out", str(f / sub if sub else f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1 and "is a file" in err, err
    assert f.read_text() == "x"
