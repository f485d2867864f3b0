"""seal_fast.studies.fewshot: balanced, seeded episodes shared by every checkpoint, BSCD-FSL's interval, the batched per-episode
head, EuroSAT / CropDisease / folder layouts (generated here), the CLI end to end, bad input."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_transfer import draw, trained_run  # the same generated images and trained run (tests/ is on sys.path)

from seal_fast.studies import fewshot
from seal_fast.data.folders import open_fewshot, write_image_folder
from seal_fast.errors import DataError
from seal_fast.studies.fewshot import ci95, sample_episodes
from seal_fast.studies.fewshot_heads import (BSCD, bscd_episode_accuracies, bscd_init, bscd_permutations, bscd_train,
                                             episode_accuracies, support_standardizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data):
    return trained_run(tmp_path_factory, tiny_data)


def make_eurosat(root, classes=EUROSAT, per_class=10):
    """torchvision's EuroSAT layout: eurosat/2750/<Class>/<Class>_<i>.jpg."""
    for k, c in enumerate(classes):
        for i in range(per_class):
            draw(root / "eurosat" / "2750" / c / f"{c}_{i + 1}.jpg", k, len(classes), i, size=32)
    return root


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    return make_eurosat(tmp_path_factory.mktemp("eurosat"))


# ----------------------------------------------------------------------------------------------
# Episodes, interval, head
# ----------------------------------------------------------------------------------------------


def test_episodes_are_balanced_seeded_and_skip_small_classes():
    labels = torch.tensor([0] * 9 + [1] * 4 + [2] * 7 + [3] * 5 + [4] * 12)   # class 1 cannot fill 2 + 3
    idx, cls = sample_episodes(labels, ways=3, shots=2, queries=3, episodes=200, seed=0)
    assert idx.shape == (200, 3, 5) and cls.shape == (200, 3)
    for e in range(200):
        assert len(set(cls[e].tolist())) == 3 and 1 not in cls[e].tolist()
        assert len(set(idx[e].flatten().tolist())) == 15                  # no image twice in an episode
        for w in range(3):
            assert (labels[idx[e, w]] == cls[e, w]).all()                  # support and queries of its class
    assert sorted(set(cls.flatten().tolist())) == [0, 2, 3, 4]            # every eligible class is drawn
    again, _ = sample_episodes(labels, 3, 2, 3, 200, seed=0)
    assert torch.equal(idx, again) and fewshot.episodes_sha1(idx) == fewshot.episodes_sha1(again)
    assert not torch.equal(sample_episodes(labels, 3, 2, 3, 200, seed=1)[0], idx)
    assert not torch.equal(sample_episodes(labels, 3, 1, 3, 200, seed=0)[0][:, :, :1], idx[:, :, :1])
    with pytest.raises(DataError, match="only 4 classes have 5 images .* a 5-way episode needs 5"):
        sample_episodes(labels, 5, 2, 3, 10, 0)


def test_ci95_is_bscd_fsl_formula():
    assert ci95([0.0, 100.0]) == pytest.approx(1.96 * 50 / math.sqrt(2))  # population std of (0, 100) is 50
    assert ci95([70.0] * 600) == 0.0
    acc = np.random.default_rng(0).uniform(40, 90, 600)
    assert ci95(acc) == pytest.approx(1.96 * np.std(acc) / np.sqrt(600), rel=1e-12)


def test_support_standardizer_per_episode():
    xs = torch.tensor([[[1.0, 2.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    mean, scale = support_standardizer(xs)
    assert mean.tolist() == [[[2.0, 2.0]], [[0.0, 2.0]]] and scale.tolist() == [[[1.0, 1.0]], [[1.0, 2.0]]]


def test_head_per_episode_separable_random_and_batched():
    g = torch.Generator().manual_seed(0)
    classes, per, d = 8, 30, 24
    labels = torch.arange(classes).repeat_interleave(per)
    centers = 3 * torch.randn(classes, d, generator=g)
    separable = centers[labels] + torch.randn(len(labels), d, generator=g)
    idx, _ = sample_episodes(labels, 5, 5, 15, 40, seed=0)
    acc, stats = episode_accuracies(separable, idx, 5, 1 / 25, CPU, chunk=40, progress=False)
    assert acc.shape == (40,) and acc.mean() > 97 and stats["converged"] and stats["iterations_max"] <= 20
    one_by_one, _ = episode_accuracies(separable, idx, 5, 1 / 25, CPU, chunk=1, progress=False)
    assert torch.equal(acc, one_by_one)                                   # batching changes nothing
    noise = torch.randn(len(labels), d, generator=g)
    acc, _ = episode_accuracies(noise, sample_episodes(labels, 5, 5, 15, 200, 1)[0], 5, 1 / 25, CPU, 200,
                                progress=False)
    assert 14 < float(acc.mean()) < 26                                     # chance is 20%


# ----------------------------------------------------------------------------------------------
# BSCD-FSL's head (--head bscd)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The SGD head takes hundreds of steps on tiny tensors: on a shared 2-core machine, thread hand-offs cost far more
    than the arithmetic (measured: 43 ms a step with 2 threads under load, 1.9 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bscd_reference(xs, ys, xq, seed, episodes, dtype):
    """finetune.py (IBM/cdfsl-benchmark @5cfa669) lines 77-154 with the backbone frozen and its features given,
    written out as they are: np.random.seed once (line 164), then per episode a fresh Classifier (nn.Linear, default
    init from torch's global generator), SGD(lr 0.01, momentum 0.9, dampening 0.9, weight_decay 0.001), 100 epochs of
    np.random.permutation in batches of 4, zero_grad / CrossEntropyLoss / backward / step; then topk(1) on the
    queries. Returns each episode's final (weight, bias) and predictions."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = []
    for e in range(episodes):
        classifier = torch.nn.Linear(xs.shape[2], int(ys.max()) + 1).to(dtype)
        loss_fn = torch.nn.CrossEntropyLoss()
        classifier_opt = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, dampening=0.9,
                                         weight_decay=0.001)
        support_size, batch_size = len(ys), 4
        x_a_i, y_a_i = xs[e].to(dtype), ys
        for epoch in range(100):
            rand_id = np.random.permutation(support_size)
            for j in range(0, support_size, batch_size):
                classifier_opt.zero_grad()
                selected_id = torch.from_numpy(rand_id[j: min(j + batch_size, support_size)])
                loss = loss_fn(classifier(x_a_i[selected_id]), y_a_i[selected_id])
                loss.backward()
                classifier_opt.step()
        with torch.no_grad():
            scores = classifier(xq[e].to(dtype))
        out.append((classifier.weight.detach(), classifier.bias.detach(), scores.topk(1, 1, True, True)[1][:, 0]))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bscd_head_is_finetune_py_loop(dtype, one_thread):
    """Two episodes, 3-way 3-shot (support 9: batches 4, 4, 1), 6-dim features: our batched SGD against the reference
    loop above, same seed: the same init (bit for bit), the same weights (float64: to 1e-12; float32: to float32
    rounding; bit-identical in both on the 2-core CPU this was written on) and the same predictions."""
    g = torch.Generator().manual_seed(0)
    episodes, ways, shots, dim = 2, 3, 3, 6
    xs = torch.rand(episodes, ways * shots, dim, generator=g, dtype=torch.float64)
    xq = torch.rand(episodes, ways * 4, dim, generator=g, dtype=torch.float64)
    ys = torch.arange(ways).repeat_interleave(shots)
    ref = bscd_reference(xs, ys, xq, 7, episodes, dtype)
    w0, b0 = bscd_init(episodes, dim, ways, torch.Generator().manual_seed(7), dtype)
    torch.manual_seed(7)
    first = torch.nn.Linear(dim, ways)                       # the init is nn.Linear's own draw, bit for bit
    assert torch.equal(w0[0], first.weight.detach().to(dtype)) and torch.equal(b0[0], first.bias.detach().to(dtype))
    perms = bscd_permutations(np.random.RandomState(7), episodes, ways * shots, BSCD["epochs"])
    w, b = bscd_train(xs.to(dtype), ys, w0, b0, perms)
    tol = {"atol": 1e-12, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 0}
    for e, (rw, rb, pred) in enumerate(ref):
        assert torch.allclose(w[e], rw, **tol) and torch.allclose(b[e], rb, **tol), (w[e] - rw).abs().max()
        assert torch.equal((xq[e].to(dtype) @ w[e].T + b[e]).argmax(1), pred)
    assert not torch.allclose(w, w0)  # it trained


def test_bscd_head_separable_reaches_100_and_is_seeded(one_thread):
    g = torch.Generator().manual_seed(0)
    classes, per, d = 8, 30, 16
    labels = torch.arange(classes).repeat_interleave(per)
    centers = 6 * torch.rand(classes, d, generator=g)                    # nonnegative, as pooled ReLU features
    feats = (centers[labels] + 0.1 * torch.rand(len(labels), d, generator=g)).float()
    idx, _ = sample_episodes(labels, 5, 2, 15, 24, seed=0)
    acc, stats = bscd_episode_accuracies(feats, idx, 2, CPU, chunk=24, progress=False)
    assert torch.equal(acc, torch.full((24,), 100.0, dtype=acc.dtype))
    assert stats["sgd_steps"] == 100 * 3 and stats["seed"] == 10 and stats["lr"] == 0.01   # 10 images: 4 + 4 + 2
    again, _ = bscd_episode_accuracies(feats, idx, 2, CPU, chunk=10, progress=False)    # other chunks: same draws
    assert torch.equal(acc, again)
    noise = torch.rand(len(labels), d, generator=g)
    runs = [bscd_episode_accuracies(noise, idx, 2, CPU, chunk=24, seed=s, progress=False)[0] for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])   # a seed decides, and only it
    assert 10 < float(runs[0].mean()) < 35                                       # chance is 20%


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def test_eurosat_through_torchvision(eurosat, tmp_path):
    for root in (eurosat, eurosat / "eurosat", eurosat / "eurosat" / "2750"):
        ds = open_fewshot("eurosat", root)
        assert ds.name == "EuroSAT" and ds.classes == sorted(EUROSAT) and len(ds.splits["all"].files) == 60
        assert ds.splits["all"].labels[:10] == [0] * 10
    assert open_fewshot("eurosat", eurosat).source.startswith("torchvision.datasets.EuroSAT")
    bscd = tmp_path / "EuroSAT"          # BSCD-FSL's EuroSAT/2750 under another name: the same ImageFolder reading
    bscd.mkdir()
    os.symlink(eurosat / "eurosat" / "2750", bscd / "2750")
    for root in (bscd, bscd / "2750"):
        other = open_fewshot("eurosat", root)
        names = [os.path.basename(f) for f in other.splits["all"].files]
        assert other.classes == ds.classes and names == [os.path.basename(f) for f in ds.splits["all"].files]
        assert other.splits["all"].labels == ds.splits["all"].labels


def test_cropdisease_and_folder_layouts(tmp_path):
    bscd = write_image_folder(tmp_path / "crop" / "dataset" / "train", 3, {"all": 2}, size=16)
    ds = open_fewshot("cropdisease", tmp_path / "crop")
    assert ds.name == "CropDisease" and len(ds.classes) == 3 and str(bscd) in ds.source
    assert len(open_fewshot("cropdisease", bscd).splits["all"].files) == 6   # the class folders themselves
    flat = write_image_folder(tmp_path / "flat", 2, {"all": 3}, size=16, ext=".png")
    assert open_fewshot("folder", flat).splits["all"].labels == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    code = fewshot.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(run_dir, eurosat, tmp_path):
    out = tmp_path / "f"
    cmd = [sys.executable, "-m", "seal_fast", "fewshot", "--checkpoint", run_dir / "last.pt", run_dir / "best.pt",
           "--dataset", "eurosat", "--root", eurosat, "--shots", "1", "5", "--queries", "4", "--episodes", "30",
           "--image-size", "32", "--workers", "0", "--cache-dir", tmp_path / "cache", "--out", out]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EuroSAT: 6 classes, 60 images" in res.stdout and "(paired, same episodes)" in res.stdout
    doc = json.loads((out / "fewshot.json").read_text())
    assert "Newton" in doc["protocol"]["solver"] and "1.96" in doc["protocol"]["score"]
    rows = doc["results"]
    assert [(r["label"].split(" (")[1], r["shots"]) for r in rows] == [
        ("study-run/last.pt)", 1), ("study-run/last.pt)", 5), ("study-run/best.pt)", 1), ("study-run/best.pt)", 5)]
    for r in rows:
        assert r["ways"] == 5 and r["queries"] == 4 and r["episodes"] == 30 and len(r["accuracies"]) == 30
        assert r["accuracy"] == pytest.approx(np.mean(r["accuracies"])) and r["ci95"] == pytest.approx(
            ci95(r["accuracies"])) and r["solver"]["converged"] and r["l2"] == pytest.approx(1 / (5 * r["shots"]))
    assert rows[0]["episodes_sha1"] == rows[2]["episodes_sha1"] != rows[1]["episodes_sha1"]   # same episodes
    assert rows[3]["paired"]["vs"] == rows[1]["label"] and rows[1]["paired"] is None
    diff = np.asarray(rows[3]["accuracies"]) - np.asarray(rows[1]["accuracies"])
    assert rows[3]["paired"]["diff"] == pytest.approx(diff.mean()) and rows[3]["paired"]["ci95"] == pytest.approx(
        ci95(diff))
    assert rows[1]["accuracy"] > 40, rows[1]   # 5-way chance is 20%
    table = (out / "table.md").read_text()
    assert "| checkpoint | EuroSAT 5-way 1-shot, 32 px | EuroSAT 5-way 5-shot, 32 px |" in table
    assert "| SEAL | 87.70 ± 0.52 | 95.67 ± 0.28 |" in table and "Paired differences" in table
    with open(out / "fewshot.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and lines[2]["paired_vs"] == rows[0]["label"]


def test_cli_keeps_earlier_rows_and_same_episodes_across_runs(run_dir, tmp_path, capsys):
    flat = write_image_folder(tmp_path / "shapes", 5, {"all": 6}, size=24)
    common = ["--dataset", "folder", "--root", flat, "--shots", "2", "--queries", "3", "--episodes", "12",
              "--image-size", "24", "--workers", "0", "--cache-dir", tmp_path / "c", "--out", tmp_path / "o"]
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "last.pt", *common)
    assert code == 0
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "best.pt", *common)
    assert code == 0 and "kept 1 result(s)" in out
    rows = json.loads((tmp_path / "o" / "fewshot.json").read_text())["results"]
    assert [r["label"].split(" (")[1] for r in rows] == ["study-run/last.pt)", "study-run/best.pt)"]
    assert rows[0]["episodes_sha1"] == rows[1]["episodes_sha1"] and rows[1]["paired"]["vs"] == rows[0]["label"]
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir / "last.pt", run_dir / "best.pt", "--head", "bscd", *common)
    assert code == 0 and "kept 2 result(s)" in out and "bscd head, 300 SGD steps" in out   # 10 images: 3 batches
    doc = json.loads((tmp_path / "o" / "fewshot.json").read_text())
    rows = doc["results"]
    assert [r["head"] for r in rows] == ["logreg", "logreg", "bscd", "bscd"]
    assert rows[2]["head_seed"] == 10 and rows[2]["l2"] is None and rows[2]["solver"]["momentum"] == 0.9
    assert rows[3]["paired"]["vs"] == rows[2]["label"] and rows[2]["episodes_sha1"] == rows[0]["episodes_sha1"]
    assert "SGD(lr 0.01, momentum 0.9, dampening 0.9, weight_decay 0.001" in doc["protocol"]["solver"]
    table = (tmp_path / "o" / "table.md").read_text()
    assert "shapes 5-way 2-shot, 24 px |" in table and "shapes 5-way 2-shot, 24 px, bscd head |" in table


def test_cli_bad_input_is_one_line(run_dir, eurosat, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    blob = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    blob["config"]["arch"] = "resnet18"
    torch.save(blob, wrong)
    (tmp_path / "empty").mkdir()
    ok = ["--checkpoint", run_dir / "last.pt"]
    cases = [
        (ok + ["--dataset", "eurosat", "--root", tmp_path / "none"], "no such folder; expected DIR/eurosat/2750/"),
        (ok + ["--dataset", "eurosat", "--root", tmp_path / "empty"], "expected DIR/eurosat/2750/<class>/*.jpg"),
        (ok + ["--dataset", "cropdisease", "--root", tmp_path / "empty"], "has no class sub-folders; expected"),
        (ok + ["--dataset", "eurosat", "--root", eurosat, "--shots", "20"], "only 0 classes have 35 images"),
        (ok + ["--dataset", "eurosat", "--root", eurosat, "--ways", "1"], "--ways 1"),
        (ok + ["--dataset", "eurosat", "--root", eurosat, "--l2", "-1"], "--l2 -1.0"),
        (ok + ["--dataset", "eurosat", "--root", eurosat, "--head", "bscd", "--l2", "0.1"], "--l2 is the logreg"),
        (ok + ["--dataset", "eurosat", "--root", eurosat, "--head", "bscd", "--head-seed", "-1"], "--head-seed -1"),
        (ok + ["--dataset", "flowers102", "--root", eurosat], "choose one of eurosat, cropdisease, folder"),
        (["--checkpoint", wrong, "--dataset", "eurosat", "--root", eurosat, "--shots", "1", "--queries", "2"],
         "not a resnet18's"),
    ]
    for args, words in cases:
        code, _, err = run_cli(capsys, *args, "--workers", "0", "--out", tmp_path / "o")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)
        assert words in lines[0], (words, lines[0])
