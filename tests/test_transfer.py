"""seal_fast.studies.transfer: the logistic-regression head against closed-form optima, the probe's protocol, every dataset
layout (generated here in torchvision's and the datasets' own on-disk formats), the CLI end to end, bad input."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from seal_fast.studies import transfer, transfer_probe
from seal_fast.data import folders
from seal_fast.data.folders import open_transfer, write_image_folder
from seal_fast.errors import DataError
from seal_fast.studies.transfer_probe import (NARROW_GRID, PAPER_GRID, fit_logreg, holdout, linear_probe,
                                             mean_per_class, scores, standardizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Fixtures: a trained checkpoint (shared with test_fewshot through the session's temp folder), datasets
# ----------------------------------------------------------------------------------------------


def trained_run(tmp_path_factory, tiny_data):
    """A short resnet10 SEAL run on the tiny data (the trainer's own CLI), trained once per session."""
    out = tmp_path_factory.getbasetemp() / "study-run"
    if not (out / "last.pt").is_file():
        args = ["--data", tiny_data, "--out", out, "--method", "seal", "--arch", "resnet10", "--generations", "1",
                "--epochs", "3", "--ascent-epochs", "1", "--warmup", "1", "--batch-size", "16", "--workers", "0",
                "--device", "cpu"]
        res = subprocess.run([sys.executable, "-m", "seal_fast.train", *map(str, args)], cwd=ROOT,
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data):
    return trained_run(tmp_path_factory, tiny_data)


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
    """A learnable ImageFolder transfer set: 4 classes, train 12 / test 8 a class, no val."""
    return write_image_folder(tmp_path_factory.mktemp("folder") / "shapes", 4, {"train": 12, "test": 8}, size=32)


def draw(path, k=0, classes=3, i=0, size=24):
    from seal_fast.data.synthetic import _draw

    path.parent.mkdir(parents=True, exist_ok=True)
    _draw(np.random.default_rng([k, i]), k, classes, size).save(path)


def make_flowers(root, classes=3, per_split=2):
    """torchvision's Flowers102 layout: flowers-102/jpg/image_%05d.jpg, imagelabels.mat, setid.mat."""
    from scipy.io import savemat

    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    n = 0
    for k in range(classes):
        for split in ids:
            for _ in range(per_split):
                n += 1
                draw(base / "jpg" / f"image_{n:05d}.jpg", k, classes, n)
                labels.append(k + 1)
                ids[split].append(n)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {s: np.array([v]) for s, v in ids.items()})
    return root


def make_aircraft(root, variants=("707-320", "A300B4", "Cessna 172"), per_split=2):
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("".join(v + "\n" for v in variants))
    n = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for k, v in enumerate(variants):
            for _ in range(per_split):
                n += 1
                draw(data / "images" / f"{n}.jpg", k, len(variants), n)
                lines.append(f"{n} {v}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return root


def make_cub(root, classes=3, per_class=4):
    base = root / "CUB_200_2011"
    images, labels, split, names = [], [], [], []
    n = 0
    for k in range(classes):
        name = f"{k + 1:03d}.Bird_{k}"
        names.append(f"{k + 1} {name}\n")
        for i in range(per_class):
            n += 1
            draw(base / "images" / name / f"Bird_{k}_{i}.jpg", k, classes, i)
            images.append(f"{n} {name}/Bird_{k}_{i}.jpg\n")
            labels.append(f"{n} {k + 1}\n")
            split.append(f"{n} {int(i % 2 == 0)}\n")
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(labels))
    (base / "train_test_split.txt").write_text("".join(split))
    (base / "classes.txt").write_text("".join(names))
    return root


def make_mit67(root, classes=("bar", "kitchen", "office"), per_class=4):
    train, test = [], []
    for k, c in enumerate(classes):
        for i in range(per_class):
            draw(root / "Images" / c / f"img{i}.jpg", k, len(classes), i)
            (train if i < per_class - 1 else test).append(f"{c}/img{i}.jpg\n")
    (root / "TrainImages.txt").write_text("".join(train))
    (root / "TestImages.txt").write_text("".join(test))
    return root


def make_dogs(root, breeds=("n02085620-Chihuahua", "n02085782-Japanese_spaniel"), per_class=3):
    from scipy.io import savemat

    lists = {"train": ([], []), "test": ([], [])}
    for k, b in enumerate(breeds):
        for i in range(per_class):
            name = f"{b}/{b.split('-')[0]}_{i}.jpg"
            draw(root / "Images" / name, k, len(breeds), i)
            files, labels = lists["train" if i else "test"]
            files.append(name)
            labels.append(k + 1)
    (root / "lists").mkdir()
    for s, (files, labels) in lists.items():
        cell = np.empty((len(files), 1), dtype=object)
        for j, f in enumerate(files):
            cell[j, 0] = np.array([f])
        savemat(root / "lists" / f"{s}_list.mat", {"file_list": cell, "labels": np.array(labels)[:, None]})
    return root


@pytest.fixture
def flowers_md5_off(monkeypatch):
    """The generated .mat files cannot carry the real md5: check only that they are there, as the class does."""
    from torchvision.datasets import Flowers102

    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: self._images_folder.is_dir() and all(
        (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid")))


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------


def closed_form(a, k=3):
    """K one-hot points, one a class: the optimum is W = a (I - 11^T / K), b = 0, when l2 = (1 - p) / (a (K - 1)),
    p = 1 / (1 + (K - 1) e^-a) the probability of the right class (stationarity of the symmetric solution)."""
    p = 1 / (1 + (k - 1) * math.exp(-a))
    return (1 - p) / (a * (k - 1)), a * (torch.eye(k, dtype=torch.float64) - 1 / k)


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("pad", [0, 2])
def test_head_equals_the_closed_form(solver, pad):
    l2a, wa = closed_form(2.0)
    l2b, wb = closed_form(0.7)
    x = torch.cat([torch.eye(3, dtype=torch.float64), torch.zeros(3, pad, dtype=torch.float64)], 1)
    y = torch.arange(3)
    # two problems at once (different l2), and the padded case goes through the span basis (N < D)
    tol = 1e-9 if solver == "lbfgs" else 1e-11
    head = fit_logreg(torch.stack([x, x]), torch.stack([y, y]), 3, torch.tensor([l2a, l2b]), solver=solver, tol=tol)
    assert head.converged
    for e, w in enumerate((wa, wb)):
        assert torch.allclose(head.weight[e, :3], w, atol=1e-7), head.weight[e]
        assert torch.allclose(head.weight[e, 3:], torch.zeros(pad, 3, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(head.bias[e], torch.zeros(3, dtype=torch.float64), atol=1e-7)
    single = fit_logreg(x, y, 3, l2a, solver=solver, tol=tol)
    assert torch.allclose(single.weight[0, :3], wa, atol=1e-7)


def full_gradient(x, y, c, l2, head):
    p = torch.softmax(head.logits(x), -1)
    r = p - torch.nn.functional.one_hot(y, c).to(x.dtype)
    return x.transpose(1, 2) @ r / x.shape[1] + l2 * head.weight, r.mean(1)


@pytest.mark.parametrize("n,d", [(24, 7), (9, 40)])
def test_newton_and_lbfgs_reach_the_same_optimum(n, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3, n), generator=g)
    y[:, :4] = torch.arange(4)
    a = fit_logreg(x, y, 4, 0.05, solver="newton")
    b = fit_logreg(x, y, 4, 0.05, solver="lbfgs", tol=1e-8, max_iter=3000)
    assert a.iterations <= 20 and a.converged and b.converged
    assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(a.bias, b.bias, atol=1e-5)
    gw, gb = full_gradient(x, y, 4, 0.05, a)  # stationary in the full space too (the span basis is exact)
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6


def test_probe_beats_chance_on_separable_features():
    g = torch.Generator().manual_seed(0)
    c, d = 5, 16
    centers = 4 * torch.randn(c, d, generator=g)

    def sample(per):
        y = torch.arange(c).repeat_interleave(per)
        return centers[y] + torch.randn(len(y), d, generator=g), y

    train, val, test = sample(30), sample(10), sample(20)
    r = linear_probe(train, test, c, val=val, grid=[1e-3, 1e-1, 10.0])
    assert r["top1"] >= 95 and r["val_source"] == "the dataset's val split" and r["refit_images"] == 200
    assert r["mean_per_class"] == pytest.approx(r["top1"])  # a balanced test set: the two metrics agree
    assert all("val_mean_per_class" in p for p in r["grid"])
    assert [p["l2"] for p in r["grid"]] == [10.0, 0.1, 1e-3] and r["solver"]["converged"]
    held = linear_probe(train, test, c, grid=[1e-2], seed=3)
    assert held["top1"] >= 95 and held["val_images"] == 15 and held["fit_images"] == 135
    assert held["val_source"].startswith("held-out 10% of train")
    noise = linear_probe((torch.randn(150, d, generator=g), train[1]), (torch.randn(100, d, generator=g), test[1]), c,
                         grid=[1.0])
    assert noise["top1"] < 45  # unrelated features stay near chance (20%)


def test_mean_per_class_by_hand_on_an_imbalanced_set():
    """6 / 3 / 1 test images in classes 0 / 1 / 2; right: 5 of 6, 1 of 3, 0 of 1. Top-1 = 6 / 10 = 60%; mean per-class
    = (5/6 + 1/3 + 0) / 3 = 38.89%; a class with no test image (3) counts in neither."""
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 2, 0])
    assert mean_per_class(pred, y) == pytest.approx(100 * (5 / 6 + 1 / 3 + 0) / 3, abs=1e-12)
    # through a head: logits = x W + b with x one-hot of the predicted class (4 classes, class 3 never a label)
    x = torch.nn.functional.one_hot(pred, 4).double()
    head = transfer_probe.Head(torch.eye(4, dtype=torch.float64)[None], torch.zeros(1, 4, dtype=torch.float64), 0, 0,
                               0.0, True)
    top1, mpc = scores(head, x, y)
    assert top1 == pytest.approx(60.0) and mpc == pytest.approx(38.8888888888889)
    balanced = torch.tensor([0, 0, 1, 1])
    assert mean_per_class(torch.tensor([0, 1, 1, 1]), balanced) == pytest.approx(75.0)  # = top-1 when balanced


def test_l2_grids_are_the_papers_and_the_narrow_one():
    """Kornblith et al. 2019: 45 values log-spaced between 1e-6 and 1e5 (np.logspace(-6, 5, 45)), the default; the
    earlier 15-value grid (1e-6 .. 1e1, every half decade) by name."""
    assert len(PAPER_GRID) == 45 and PAPER_GRID[0] == 1e5 and PAPER_GRID[-1] == pytest.approx(1e-6, rel=1e-15)
    assert np.allclose(PAPER_GRID, np.logspace(-6, 5, 45)[::-1], rtol=1e-13, atol=0)
    assert np.allclose(np.diff(np.log10(PAPER_GRID)), -0.25)
    assert len(NARROW_GRID) == 15 and NARROW_GRID[0] == 10.0 and NARROW_GRID[-1] == pytest.approx(1e-6)
    assert all(any(math.isclose(v, w, rel_tol=1e-12) for w in PAPER_GRID) for v in NARROW_GRID)  # a subset
    parse = transfer.build_parser().parse_args
    base = ["--checkpoint", "x.pt", "--dataset", "synthetic"]
    assert transfer.resolve_grid(parse(base).l2_grid) == PAPER_GRID
    assert transfer.resolve_grid(parse(base + ["--l2-grid", "narrow"]).l2_grid) == NARROW_GRID
    assert transfer.resolve_grid(parse(base + ["--l2-grid", "1", "0.1"]).l2_grid) == [1.0, 0.1]
    with pytest.raises(transfer.ConfigError, match="stands alone"):
        transfer.resolve_grid(parse(base + ["--l2-grid", "paper", "1"]).l2_grid)


def test_holdout_is_stratified_and_seeded():
    labels = torch.tensor([0] * 20 + [1] * 9 + [2] * 1 + [3] * 2)
    fit, val = holdout(labels, 0.1, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 1]
    assert torch.equal(holdout(labels, 0.1, 0)[1], val) and not torch.equal(holdout(labels, 0.1, 1)[1], val)


def test_standardizer_leaves_constant_dimensions():
    x = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 2.0]])
    mean, scale = standardizer(x)
    assert mean.tolist() == [2.0, 5.0, 1.0] and scale.tolist() == [1.0, 1.0, 1.0]
    assert standardizer(torch.tensor([[0.0, 5.0], [4.0, 5.0]]))[1].tolist() == [2.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Dataset layouts
# ----------------------------------------------------------------------------------------------


def test_flowers102_through_torchvision(tmp_path, flowers_md5_off):
    pytest.importorskip("scipy")
    make_flowers(tmp_path)
    for root in (tmp_path, tmp_path / "flowers-102"):   # the parent (torchvision's root) or the folder itself
        ds = open_transfer("flowers102", root)
        assert ds.name == "Flower102" and ds.has_val and len(ds.classes) == 3 and ds.classes[0] == "pink primrose"
        assert {s: len(v.files) for s, v in ds.splits.items()} == {"train": 6, "val": 6, "test": 6}
        assert ds.splits["test"].labels == [0, 0, 1, 1, 2, 2]
        assert ds.splits["train"].files[0].endswith("flowers-102/jpg/image_00001.jpg")


def test_flowers102_with_the_real_md5_check_names_the_layout(tmp_path):
    pytest.importorskip("scipy")
    make_flowers(tmp_path)
    with pytest.raises(DataError, match="fail torchvision's checks.*--download.*expected DIR/flowers-102/"):
        open_transfer("flowers102", tmp_path)


def test_fgvc_aircraft_through_torchvision(tmp_path):
    make_aircraft(tmp_path)
    ds = open_transfer("fgvc-aircraft", tmp_path)
    assert ds.classes == ["707-320", "A300B4", "Cessna 172"] and ds.has_val
    assert ds.splits["val"].labels == [0, 0, 1, 1, 2, 2] and len(ds.splits["test"].files) == 6
    (tmp_path / "fgvc-aircraft-2013b" / "data" / "images_variant_val.txt").write_text("1000001 Unknown Plane\n")
    with pytest.raises(DataError, match="fgvc-aircraft.*KeyError.*expected DIR/fgvc-aircraft-2013b/data/"):
        open_transfer("fgvc-aircraft", tmp_path)


def test_native_layouts_cub_mit67_dogs(tmp_path):
    pytest.importorskip("scipy")
    cub = open_transfer("cub200", make_cub(tmp_path / "cub"))
    assert cub.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2"] and not cub.has_val
    assert len(cub.splits["train"].files) == 6 and cub.splits["test"].labels == [0, 0, 1, 1, 2, 2]
    mit = open_transfer("mit67", make_mit67(tmp_path / "mit"))
    assert mit.classes == ["bar", "kitchen", "office"] and len(mit.splits["train"].files) == 9
    assert mit.splits["test"].files[1].endswith("Images/kitchen/img3.jpg")
    dogs = open_transfer("stanford-dogs", make_dogs(tmp_path / "dogs"))
    assert dogs.classes == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    assert dogs.splits["train"].labels == [0, 0, 1, 1] and len(dogs.splits["test"].files) == 2
    os.remove(tmp_path / "cub" / "CUB_200_2011" / "images" / "002.Bird_1" / "Bird_1_3.jpg")
    with pytest.raises(DataError, match="Bird_1_3.jpg is missing .*expected DIR/CUB_200_2011/"):
        open_transfer("cub200", tmp_path / "cub")


def test_folder_layout_with_and_without_val(tmp_path, folder_set):
    ds = open_transfer("folder", folder_set)
    assert ds.name == "shapes" and not ds.has_val and ds.classes == [f"class_{k:02d}" for k in range(4)]
    assert len(ds.splits["train"].files) == 48 and ds.splits["test"].labels[:8] == [0] * 8
    withval = write_image_folder(tmp_path / "v", 2, {"train": 2, "val": 1, "test": 1}, size=16)
    assert open_transfer("folder", withval).has_val
    extra = write_image_folder(tmp_path / "x", 2, {"train": 2, "test": 1}, size=16)
    write_image_folder(tmp_path / "x" / "test" / "zz", 1, {"all": 1}, size=16)
    with pytest.raises(DataError, match="class folder 'zz', which the train split lacks"):
        open_transfer("folder", extra)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    code = transfer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(run_dir, folder_set, tmp_path):
    out = tmp_path / "t"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "seal_fast", "transfer", "--checkpoint", run_dir / "last.pt", run_dir / "best.pt",
           "--dataset", "folder", "--root", folder_set, "--image-size", "32", "--l2-grid", "0.01", "1",
           "--workers", "0", "--cache-dir", cache, "--out", out]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "shapes: 4 classes, 48 train, 32 test images" in res.stdout
    doc = json.loads((out / "transfer.json").read_text())
    assert doc["protocol"]["l2_grid"] == [1.0, 0.01] and "L-BFGS" in doc["protocol"]["solver"]
    assert [r["label"].split(" (")[1] for r in doc["results"]] == ["study-run/last.pt)", "study-run/best.pt)"]
    for r in doc["results"]:
        assert r["dataset"] == "shapes" and r["classes"] == 4 and r["feature_dim"] == 512
        assert r["val_source"].startswith("held-out") and r["test_images"] == 32 and r["train_images"] == 48
        assert r["top1"] >= 50, r  # chance is 25%: the frozen features of a trained network carry the shapes
        assert r["mean_per_class"] == pytest.approx(r["top1"])  # 8 test images a class: balanced
    assert "mean per-class" in res.stdout and "given on the command line (2 values)" in res.stdout
    with open(out / "transfer.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"checkpoint", "dataset", "top1"} <= set(rows[0])
    assert float(rows[0]["top1"]) == pytest.approx(doc["results"][0]["top1"], abs=0.005)
    assert float(rows[0]["mean_per_class"]) == pytest.approx(doc["results"][0]["mean_per_class"], abs=0.005)
    table = (out / "table.md").read_text()
    assert "| checkpoint | shapes (32 px) |" in table and "| SEAL | 45.68 | 8.49 | 9.81 | 35.37 | 12.61 |" in table
    assert table.count("| checkpoint | shapes (32 px) |") == 2 and "Mean per-class accuracy" in table
    assert len(list(cache.glob("shapes-*.pt"))) == 4   # train and test, for each checkpoint


def test_cli_reuses_cache_and_keeps_earlier_rows(run_dir, folder_set, tmp_path, capsys, flowers_md5_off):
    pytest.importorskip("scipy")
    flowers = make_flowers(tmp_path / "fl")
    common = ["--image-size", "32", "--l2-grid", "0.1", "--workers", "0", "--cache-dir", tmp_path / "c",
              "--out", tmp_path / "o"]
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "last.pt", "--dataset", "folder", "--root", folder_set,
                           *common)
    assert code == 0
    first = json.loads((tmp_path / "o" / "transfer.json").read_text())["results"][0]
    assert all("extracted" in s for s in first["features"])
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "last.pt", "--dataset", "flowers102", "folder",
                           "--root", flowers, folder_set, "--name", "Flowers", "Shapes", *common)
    assert code == 0 and "kept 1 result(s)" in out and "Flowers: 3 classes, 6 train, 6 val, 6 test" in out
    doc = json.loads((tmp_path / "o" / "transfer.json").read_text())
    assert [r["dataset"] for r in doc["results"]] == ["shapes", "Flowers", "Shapes"]
    fl = doc["results"][1]
    assert fl["val_source"] == "the dataset's val split" and fl["train_images"] == 6 and fl["val_images"] == 6
    shapes_again = doc["results"][2]
    assert all("extracted" in s for s in shapes_again["features"])  # another --name: cached under that name
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "last.pt", "--dataset", "folder", "--root", folder_set,
                           *common)
    again = json.loads((tmp_path / "o" / "transfer.json").read_text())["results"]
    assert [r["dataset"] for r in again] == ["Flowers", "Shapes", "shapes"]
    assert all(": cache " in s for s in again[-1]["features"]) and again[-1]["top1"] == first["top1"]


def test_cli_bad_input_is_one_line(run_dir, folder_set, tmp_path, capsys):
    from seal_fast.studies.features import load_model  # noqa: F401  (imported once, before timing-sensitive calls)

    wrong = tmp_path / "wrong.pt"
    blob = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    blob["config"]["arch"] = "resnet50"
    torch.save(blob, wrong)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    no_test = write_image_folder(tmp_path / "nt", 2, {"train": 2}, size=16)
    ok = ["--checkpoint", run_dir / "last.pt"]
    cases = [
        (ok + ["--dataset", "folder", "--root", tmp_path / "missing"], "no such folder; expected DIR/train/"),
        (ok + ["--dataset", "folder", "--root", no_test], "nt/test is missing; expected DIR/train/<class>"),
        (ok + ["--dataset", "folder"], "--dataset folder needs --root DIR"),
        (ok + ["--dataset", "flowers102", "--root", tmp_path], "expected DIR/flowers-102/"),
        (ok + ["--dataset", "eurosat", "--root", tmp_path], "--dataset 'eurosat': choose one of flowers102"),
        (["--checkpoint", wrong, "--dataset", "folder", "--root", folder_set], "not a resnet50's"),
        (["--checkpoint", junk, "--dataset", "folder", "--root", folder_set], "not a seal_fast checkpoint"),
        (["--checkpoint", tmp_path / "nope.pt", "--dataset", "folder", "--root", folder_set], "no such file"),
        (ok + ["--dataset", "folder", "--root", folder_set, "--l2-grid", "0"], "--l2-grid"),
        (ok + ["--dataset", "folder", "folder", "--root", folder_set, folder_set, folder_set], "one per --dataset"),
        (ok + ["--dataset", "folder", "folder", "--root", folder_set], "same name; tell them apart with --name"),
        (ok + ["--dataset", "folder", "--root", folder_set, "--resize", "20"], "--resize 20: must be at least"),
        (ok + ["--dataset", "cub200", "--root", tmp_path, "--download"], "cub200 has no --download"),
    ]
    for args, words in cases:
        code, _, err = run_cli(capsys, *args, "--workers", "0", "--out", tmp_path / "o")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)
        assert words in lines[0], (words, lines[0])
    assert not (tmp_path / "o" / "transfer.json").exists()


def test_scipy_missing_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError("no scipy")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    from seal_fast.errors import ConfigError

    (tmp_path / "flowers-102").mkdir()
    with pytest.raises(ConfigError, match="pip install scipy"):
        folders.read_flowers102(tmp_path)
