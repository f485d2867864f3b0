"""`python -m seal_fast report`: where it writes (never over a run's or a study's file, never into the current folder
by default), what it averages (only runs whose result-changing settings agree), the paper's number (only beside the
recipe on the complete Tiny-ImageNet), repeated seeds, and unreadable runs (listed, the rest tabled). Run folders are
written directly (config.json as the trainer writes it, metrics.jsonl), which is fast; one test trains real runs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_fast.config import Config
from seal_fast.runs import groups, report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_data_cache(monkeypatch):
    monkeypatch.setattr(groups, "_DATA", {})


def fake_run(folder: Path, gen_best: list[float], done: int | None = None, **settings) -> Path:
    """A run folder as the trainer leaves it: config.json (every setting, the recipe unless overridden),
    metrics.jsonl (one line per epoch; the last epoch of generation g reaches gen_best[g]) and a curves.png."""
    cfg = dict(Config().to_dict(), **settings)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(cfg, out=str(folder), provenance={"command": []})))
    rows, epochs = [], cfg["epochs"]
    for i in range(cfg["generations"] * epochs if done is None else done):
        g = i // epochs
        val = gen_best[g] if i % epochs == epochs - 1 else gen_best[g] - 0.1
        rows.append({"generation": g, "epoch": i % epochs, "global_epoch": i, "phase": "descent", "val_acc": val,
                     "best_val": max(gen_best[:g + 1] + [val]), "gen_best_val": val, "seconds": 1800.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "curves.png").write_bytes(b"the trainer's own plot")
    return folder


def short(**kw):
    return dict(dict(generations=2, epochs=2, data=None), **kw)


def normal160(**kw):
    return short(method="normal", generations=1, **kw)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def md_row(md: str, kind: str, status: str = "finished") -> list[str]:
    hits = [ln for ln in md.splitlines() if ln.startswith(f"| {kind} |") and f"| {status} (" in ln]
    assert len(hits) == 1, (kind, hits)
    return [c.strip() for c in hits[0].strip("|").split("|")]


# ---- what is averaged -----------------------------------------------------------------------------


def test_only_comparable_runs_are_averaged_and_what_differs_is_shown(tmp_path, tiny_data, capsys):
    """The user's case: two seed-0 runs on different data and batch sizes were one row "28.83 +- 11.08 (n=2)"."""
    sw = tmp_path / "sweep"
    fake_run(sw / "normal160-s0", [0.40], **normal160(batch_size=16))
    fake_run(sw / "normal160-s0-b64", [0.20], **normal160(batch_size=64, data=str(tiny_data)))
    fake_run(sw / "seal-s0", [0.7, 0.5], **short(arch="resnet10"))
    fake_run(sw / "seal-s1", [0.7, 0.6], **short(arch="resnet10", seed=1))
    assert report.main([str(sw)]) == 0
    md = (sw / "report.md").read_text()
    rows = csv_rows(sw / "report.csv")
    assert [(r["kind"], r["seeds"]) for r in rows] == [("normal160", "1"), ("normal160", "1"), ("seal", "2")]
    for r in rows[:2]:  # one run each: no spread
        assert r["last_gen_best_n"] == "1" and r["last_gen_best_std"] == ""
    assert sorted(float(r["last_gen_best_mean"]) for r in rows[:2]) == pytest.approx([20.0, 40.0])
    seal = rows[2]
    assert float(seal["last_gen_best_mean"]) == pytest.approx(55.0)
    assert float(seal["last_gen_best_std"]) == pytest.approx(7.0710678, rel=1e-6)   # sample std of 50 and 60
    # what differs is in each row; what every row shares is said once
    assert "batch-size 16" in rows[0]["settings"] + rows[1]["settings"]
    assert "batch-size 64" in rows[0]["settings"] + rows[1]["settings"]
    assert "arch resnet10" in seal["settings"] and "data synthetic (built-in)" in seal["settings"]
    assert any(f"data {tiny_data} (" in r["settings"] for r in rows[:2])   # the folder and its fingerprint
    every = [ln for ln in md.splitlines() if ln.startswith("Every row: ")][0]
    assert "lr 0.1" in every and "epochs 2" in every and "batch-size" not in every
    assert "generations 2 (normal160: 1)" in every and "ascent-epochs 40 (seal rows)" in every
    assert "40.00 (n=1)" in md and "55.00 +- 7.07 (n=2)" in md and "+- 0.00 (n=1)" not in md


def test_unfinished_runs_have_rows_of_their_own(tmp_path):
    sw = tmp_path / "sweep"
    fake_run(sw / "seal-s0", [0.7, 0.5], **short())
    fake_run(sw / "seal-s1", [0.7, 0.6], **short(seed=1))
    fake_run(sw / "seal-s2", [0.9, 0.9], done=3, **short(seed=2))
    assert report.main([str(sw)]) == 0
    rows = {(r["kind"], r["status"]): r for r in csv_rows(sw / "report.csv")}
    assert rows[("seal", "finished")]["seeds"] == "2" and float(rows[("seal", "finished")]["wall_hours"]) == 2.0
    assert rows[("seal", "UNFINISHED")]["epochs"] == "3/4" and rows[("seal", "UNFINISHED")]["seeds"] == "1"
    md = (sw / "report.md").read_text()
    assert md_row(md, "seal", "UNFINISHED")[2] == "UNFINISHED (seeds 2)" and md_row(md, "seal")[-1] == "2.00 h"
    assert md_row(md, "seal", "UNFINISHED")[-1] == "1.50 h"


def test_a_repeated_seed_is_counted_once_and_said(tmp_path, capsys):
    a = fake_run(tmp_path / "a" / "seal-s0", [0.7, 0.5], **short())
    fake_run(tmp_path / "b" / "seal-s0", [0.7, 0.9], **short())   # a copy of seed 0 elsewhere
    fake_run(tmp_path / "a" / "seal-s1", [0.7, 0.6], **short(seed=1))
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), str(a), "--out", str(out)]) == 0
    (row,) = csv_rows(out / "report.csv")
    assert row["seeds"] == "2" and float(row["last_gen_best_mean"]) == pytest.approx(55.0)
    md = (out / "report.md").read_text()
    assert "Repeated seeds, each counted once:" in md
    assert f"seed 0: in {a} and {tmp_path / 'b' / 'seal-s0'}, counted once ({a})" in md
    assert f"seed 0: {a} given twice, counted once" in md


# ---- the paper's number ---------------------------------------------------------------------------


def test_the_paper_number_only_beside_the_recipe_on_the_complete_tiny_imagenet(tmp_path, tiny_data, monkeypatch):
    real = tmp_path / "tiny-imagenet-200"
    real.mkdir()
    (real / "wnids.txt").write_text("n1\n")
    import seal_fast.data.verify as verify

    full = verify.check_counts
    monkeypatch.setattr(verify, "check_counts", lambda root: [] if Path(root) == real else full(root))  # "complete"
    sw = tmp_path / "sweep"
    fake_run(sw / "seal-s0", [0.5] * 10, data=str(real))                       # the recipe, real data: 59.22
    fake_run(sw / "normal160-s0", [0.5], method="normal", generations=1, data=str(real))   # its recipe: 54.37
    fake_run(sw / "llf-s0", [0.5] * 10, method="llf", data=str(real), arch="resnet10", batch_size=64)  # not it
    fake_run(sw / "normal-s0", [0.5] * 10, method="normal", data=str(tiny_data))          # a 4-class folder
    fake_run(sw / "normal-s1", [0.5] * 10, method="normal", data=None)                    # the synthetic set
    fake_run(sw / "normal-s2", [0.5] * 10, method="normal", data=str(tmp_path / "gone"))  # not here to check
    fake_run(sw / "seal-s1", [0.5] * 10, data=str(real), amp=True, seed=1)   # bf16: not the published fp32
    assert report.main([str(sw)]) == 0
    rows = csv_rows(sw / "report.csv")
    paper = {(r["kind"], r["settings"]): (r["paper"], r["paper_note"]) for r in rows}
    by_kind = {}
    for (kind, _), v in paper.items():
        by_kind.setdefault(kind, []).append(v)
    assert sorted(by_kind["seal"]) == [("", "not the recipe: amp"), ("59.22", "")]
    assert by_kind["normal160"] == [("54.37", "")]
    assert by_kind["llf"] == [("", "not the recipe: arch, batch-size")]
    notes = sorted(n for _, n in by_kind["normal"])
    assert notes[0].startswith(f"{tmp_path / 'gone'} is not here to check")
    assert notes[1].startswith("not the complete Tiny-ImageNet (wnids.txt lists 4 classes")
    assert notes[2] == "synthetic data"
    md = (sw / "report.md").read_text()
    assert md.count("59.22") == 1 and "49.27" not in md and "56.92" not in md


# ---- unreadable runs ------------------------------------------------------------------------------


def test_an_unreadable_run_is_listed_and_the_rest_tabled(tmp_path, capsys):
    sw = tmp_path / "sweep"
    fake_run(sw / "seal-s0", [0.7, 0.5], **short())
    bad = fake_run(sw / "seal-s1", [0.7, 0.6], **short(seed=1))
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]                                     # a torn line
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (sw / "llf-s0").mkdir()
    (sw / "llf-s0" / "train.log").write_text("error: --data: no such folder\n")   # a run that never started
    (sw / "notes").mkdir()                                        # not a run: ignored
    assert report.main([str(sw)]) == 0
    err = capsys.readouterr().err
    assert f"warning: unreadable, left out of the table: {bad / 'metrics.jsonl'}, line 3: not a JSON line" in err
    assert f"{sw / 'llf-s0' / 'config.json'}: missing: the run never started (see its train.log)" in err
    (row,) = csv_rows(sw / "report.csv")
    assert row["seed_list"] == "0"
    md = (sw / "report.md").read_text()
    assert "Unreadable runs, left out of the table (2):" in md and f"{bad / 'metrics.jsonl'}, line 3" in md


def test_a_lone_corrupt_run_names_the_file_and_the_line(tmp_path, capsys):
    bad = fake_run(tmp_path / "seal-s0", [0.7, 0.6], **short())
    (bad / "metrics.jsonl").write_text('{"generation": 0, "global_epoch": 0}\n{"generation": "x"}\n')
    assert report.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no readable run among 1: {bad / 'metrics.jsonl'}, line 2: not an epoch's metrics")
    assert err.count("\n") == 1
    assert sorted(p.name for p in bad.iterdir()) == ["config.json", "curves.png", "metrics.jsonl"]


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err


# ---- where it writes ------------------------------------------------------------------------------


def test_inside_a_run_folder_it_writes_files_of_its_own(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "seal-s0", [0.7, 0.5], **short())
    (run / "table.md").write_text("a study's table")
    before = tree(run)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert report.main([str(run)]) == 0
    after = tree(run)
    assert {k: after[k] for k in before} == before             # the trainer's curves.png untouched
    assert sorted(set(after) - set(before)) == ["report-curves.png", "report.csv", "report.md"]
    assert list(elsewhere.iterdir()) == []                     # nothing in the current folder
    assert after["report-curves.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(run)]) == 0                        # its own files: rewritten
    assert f"wrote {run / 'report.md'}" in capsys.readouterr().out


def test_several_folders_without_out_print_the_table_and_write_nothing(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "a" / "seal-s0", [0.7, 0.5], **short())
    fake_run(tmp_path / "b" / "seal-s1", [0.7, 0.6], **short(seed=1))
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "55.00 +- 7.07 (n=2)" in out
    assert ("nothing written: 2 folders were given; --out DIR writes report.md, report.csv, report-curves.png into "
            "DIR") in out
    assert tree(tmp_path) == before


def test_help_states_the_default_and_the_exit_codes():
    text = " ".join(report.parser().format_help().split())
    assert "Default: the one RUN_DIR given" in text and "the table is printed and nothing is written" in text
    assert "exit codes: 0 " in text and "2 bad input" in text and "--version" in text


def test_a_report_md_not_its_own_is_never_replaced(tmp_path, capsys):
    run = fake_run(tmp_path / "seal-s0", [0.7, 0.5], **short())
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("someone's\n")
    assert report.main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "report.csv: already there and not written by python -m seal_fast report" in err and err.count("\n") == 1
    assert (out / "report.csv").read_text() == "someone's\n"


@pytest.mark.parametrize("sub", ["", "sub"])
def test_out_naming_a_file_is_one_line_exit_2(tmp_path, sub):
    run = fake_run(tmp_path / "seal-s0", [0.7, 0.5], **short())
    f = tmp_path / "afile"
    f.write_text("x")
    res = subprocess.run([sys.executable, "-m", "seal_fast", "report", str(run), "--out", str(f / sub if sub else f)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: --out {f / sub if sub else f}: ") and "is a file" in res.stderr
    assert f.read_text() == "x"


# ---- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_runs_on_other_batch_sizes_are_two_rows(tiny_data, tmp_path):
    """Two trainings with the same seed, one on a batch of 16 and one of 8: two rows, never one mean."""
    from seal_fast import train

    base = ["--data", str(tiny_data), "--method", "normal", "--arch", "resnet10", "--generations", "1", "--epochs", "1",
            "--warmup", "0", "--workers", "0", "--device", "cpu", "--eval-every", "1", "--keep-generations", "none"]
    for b in (16, 8):
        assert train.main([*base, "--batch-size", str(b), "--out", str(tmp_path / "sw" / f"b{b}")]) == 0
    assert report.main([str(tmp_path / "sw")]) == 0
    rows = csv_rows(tmp_path / "sw" / "report.csv")
    assert [(r["kind"], r["seeds"], r["last_gen_best_std"]) for r in rows] == [("normal160", "1", "")] * 2
    assert sorted(r["settings"] for r in rows) == ["batch-size 16", "batch-size 8"]
    assert all(r["paper"] == "" and r["paper_note"].startswith("not the complete Tiny-ImageNet") for r in rows)


def test_a_setting_an_older_run_did_not_record_counts_as_its_default(tmp_path):
    """A run from before a setting existed trained as its default does: it shares a row with runs that record it."""
    sw = tmp_path / "sweep"
    fake_run(sw / "seal-s0", [0.7, 0.5], **short())
    old = fake_run(sw / "seal-s1", [0.7, 0.6], **short(seed=1))
    cfg = json.loads((old / "config.json").read_text())
    del cfg["label_smoothing"], cfg["channels_last"]
    (old / "config.json").write_text(json.dumps(cfg))
    fake_run(sw / "seal-s2", [0.7, 0.9], **short(seed=2, label_smoothing=0.0))   # recorded, not the default: apart
    assert report.main([str(sw)]) == 0
    rows = csv_rows(sw / "report.csv")
    assert sorted((r["seed_list"], r["settings"]) for r in rows) == [("0 1", "label-smoothing 0.1"),
                                                                     ("2", "label-smoothing 0.0")]
