"""python -m seal_fast.evaluate: top-1 / top-5 / per-class accuracy of a checkpoint, checked against a direct
computation on the synthetic set; its one-line errors and exit codes."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seal_fast import checkpoint
from seal_fast.data.images import load_rgb, normalize
from seal_fast.data.layout import scan_val
from seal_fast.evaluate import main
from seal_fast.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def write_ckpt(path, model, data, kind="best"):
    cfg = {"method": "normal", "arch": "resnet10", "data": str(data) if data else None}
    checkpoint.write(checkpoint.RunState(model=model.state_dict(), config=cfg, next_epoch=3, kind=kind,
                                         val_acc=0.0), path)
    return path


@pytest.fixture
def fresh(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet10", num_classes=4).eval()
    return model, write_ckpt(tmp_path / "best.pt", model, tiny_data)


def direct(model, root):
    """Top-1, top-5 and per-class right counts from the val files read one by one (no loader)."""
    val = scan_val(root)
    images = torch.from_numpy(np.stack([load_rgb(f) for f in val.files])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(normalize(images, torch.device("cpu"), False))
    labels = torch.tensor(val.labels)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top[:, 0] == labels
    per_class = [int(hit[labels == c].sum()) for c in range(len(val.classes))]
    return float(hit.float().mean()), float((top == labels[:, None]).any(1).float().mean()), per_class


def result_line(out: str) -> tuple[float, float]:
    words = out.split()
    return float(words[words.index("top-1") + 1].rstrip("%")), float(words[words.index("top-5") + 1].rstrip("%"))


def test_numbers_match_a_direct_computation(fresh, tiny_data, tmp_path, capsys):
    model, ckpt = fresh
    csv_path = tmp_path / "per_class.csv"
    assert main([str(ckpt), "--batch-size", "5", "--device", "cpu", "--per-class-csv", str(csv_path)]) == 0
    top1, top5 = result_line(capsys.readouterr().out)
    want1, want5, per_class = direct(model, tiny_data)
    assert top1 == pytest.approx(100 * want1, abs=0.005) and top5 == pytest.approx(100 * want5, abs=0.005)
    rows = list(csv.DictReader(csv_path.open()))
    wnids = (tiny_data / "wnids.txt").read_text().split()
    assert [r["wnid"] for r in rows] == wnids
    assert [int(r["correct"]) for r in rows] == per_class and [int(r["images"]) for r in rows] == [6] * 4


def test_a_network_that_always_answers_one_class(tiny_data, tmp_path, capsys):
    """fc weights zero, bias favouring class 2 then 0: top-1 is class 2's share of val, per class 6/6 for it only."""
    model = build_model("resnet10", num_classes=4)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([1.0, 0.0, 2.0, 0.5]))
    ckpt = write_ckpt(tmp_path / "gen1.pt", model, tiny_data, kind="generation")
    csv_path = tmp_path / "c.csv"
    assert main([str(ckpt), "--device", "cpu", "--per-class-csv", str(csv_path)]) == 0
    assert result_line(capsys.readouterr().out) == (25.0, 100.0)
    assert [int(r["correct"]) for r in csv.DictReader(csv_path.open())] == [0, 0, 6, 0]
    assert main([str(ckpt), "--device", "cpu", "--amp"]) == 0  # under the trainer's autocast: the same answer
    out = capsys.readouterr().out
    assert result_line(out) == (25.0, 100.0) and "generation checkpoint after 3 epochs" in out


def test_data_flag_overrides_the_trained_folder(fresh, tiny_data, tmp_path, capsys):
    model, _ = fresh
    ckpt = write_ckpt(tmp_path / "last.pt", model, tmp_path / "gone")
    assert main([str(ckpt), "--device", "cpu"]) == 2
    assert "gone" in capsys.readouterr().err
    assert main([str(ckpt), "--device", "cpu", "--data", str(tiny_data)]) == 0
    assert f"of {tiny_data} (--data)" in capsys.readouterr().out


def junk(d):
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    return d / "junk.pt"


@pytest.mark.parametrize("make, words, code", [
    (lambda d: d / "missing.pt", "no such file", 2),
    (lambda d: d, "is a folder", 2),
    (junk, "junk.pt: cannot read this checkpoint", 1),
])
def test_bad_checkpoints_are_one_line(make, words, code, tmp_path, capsys):
    assert main([str(make(tmp_path)), "--device", "cpu"]) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_wrong_number_of_classes(tiny_data, tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "best.pt", build_model("resnet10", num_classes=7), tiny_data)
    assert main([str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has 4 classes" in err and "7 outputs" in err and err.count("\n") == 1


def test_bad_values_and_help(fresh, capsys):
    _, ckpt = fresh
    assert main([str(ckpt), "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m seal_fast evaluate")
    for flag in ("--data", "--per-class-csv", "--batch-size", "--device", "--trust-checkpoint", "--version", "CKPT"):
        assert flag in text
    from seal_fast.evaluate import build_parser

    assert all(a.help for a in build_parser()._actions)


def test_reachable_through_the_command_table(fresh):
    _, ckpt = fresh
    done = subprocess.run([sys.executable, "-m", "seal_fast", "evaluate", str(ckpt), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "top-1" in done.stdout and "normal resnet10, best checkpoint after 3 epochs" in done.stdout


def test_per_class_csv_is_replaced_whole(tmp_path, monkeypatch):
    """The CSV appears under its name only once whole: a write that fails half-way leaves the earlier file as it was
    and no temporary file behind, and the error is one WriteError line."""
    from seal_fast import evaluate
    from seal_fast.errors import WriteError

    result = evaluate.Result(0.5, 1.0, 4, ["n0", "n1"], [(1, 2), (1, 2)])
    path = tmp_path / "per_class.csv"
    path.write_text("earlier\n")

    real_writer = csv.writer

    class Broken:
        def __init__(self, f):
            self.w, self.rows = real_writer(f), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 2:
                raise OSError(28, "No space left on device")
            self.w.writerow(row)

    monkeypatch.setattr(evaluate.csv, "writer", Broken)
    with pytest.raises(WriteError, match="untouched and whole"):
        evaluate.write_per_class(result, path)
    assert path.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["per_class.csv"]
    monkeypatch.undo()
    evaluate.write_per_class(result, path)
    assert path.read_text().splitlines()[1:] == ["0,n0,2,1,0.500000", "1,n1,2,1,0.500000"]
