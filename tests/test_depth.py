"""seal_fast.studies.depth: prediction depth by hand, probes on the model, streaming == all-at-once, the CLI end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from seal_fast.kernels.knn import vote
from seal_fast.kernels.reference import knn_topk_ref
from seal_fast.data import build_eval_loaders
from seal_fast.studies.depth import Study, plan_jobs, prediction_depth
from seal_fast.studies.features import load_model
from seal_fast.models import build_model, forward_probes, probe_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prediction_depth_by_hand():
    final = torch.tensor([1, 1, 1, 1, 2, 0])
    knn = torch.tensor([  # 4 probes (rows) x 6 samples
        [1, 0, 1, 0, 2, 3],
        [1, 1, 0, 0, 2, 3],
        [1, 1, 1, 0, 2, 3],
        [1, 1, 1, 0, 0, 3]])
    # sample 0: all agree -> 0; 1: from probe 1; 2: probe 1 disagrees -> 2; 3: never -> 4 (only the network);
    # 4: the last probe disagrees -> 4 though earlier ones agreed; 5: final prediction 0 is wrong vs label, and no
    # probe agrees with it -> 4 (depth is about agreement with the prediction, never with the label)
    assert prediction_depth(knn, final).tolist() == [0, 1, 2, 4, 4, 4]
    assert prediction_depth(knn[:, :1], torch.tensor([0])).tolist() == [4]


def test_resnet50_probes_and_forward():
    torch.manual_seed(0)
    model = build_model("resnet50", 7).eval()
    names = probe_names(model)
    assert names[:3] == ["input", "stem", "block.1.0"] and names[-1] == "block.4.2"
    assert len(names) == 18 and sum(n.startswith("block.") for n in names) == 16
    x = torch.randn(2, 3, 32, 32)
    feats = forward_probes(model, x, set(names) | {"output"}, pooled=True)
    with torch.no_grad():
        assert torch.allclose(feats["output"], model(x), atol=1e-5)
    assert feats["input"].shape == (2, 3) and feats["stem"].shape == (2, 64)
    assert feats["block.1.2"].shape == (2, 256) and feats["block.4.2"].shape == (2, 2048)
    flat = forward_probes(model, x, {"block.1.0"}, pooled=False)
    assert list(flat) == ["block.1.0"] and flat["block.1.0"].shape == (2, 256 * 8 * 8)


def test_plan_jobs_respects_the_budget():
    dims = {"a": 10, "b": 10, "c": 100, "d": 1000}
    jobs = plan_jobs(dims, list(dims), queries=50, support=400, elt=4, budget=2 * 50 * 100 * 4, batch=8)
    assert [j.probes for j in jobs] == [["a", "b"], ["c"]] + [["d"]] * 10     # d alone is 10x the half budget
    assert [(j.lo, j.hi) for j in jobs[2:4]] == [(0, 5), (5, 10)] and jobs[-1].hi == 50
    for j in jobs:
        assert (j.hi - j.lo) * sum(dims[n] for n in j.probes) * 4 <= 50 * 100 * 4
        assert j.chunk == min(400, max(8, 50 * 100 * 4 // (sum(dims[n] for n in j.probes) * 4)))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A checkpoint of a short resnet10 run on the tiny data (the trainer's own CLI)."""
    out = tmp_path_factory.mktemp("run")
    args = ["--data", tiny_data, "--out", out, "--method", "seal", "--arch", "resnet10", "--generations", "1",
            "--epochs", "3", "--ascent-epochs", "1", "--warmup", "1", "--batch-size", "16", "--workers", "0",
            "--device", "cpu"]
    res = subprocess.run([sys.executable, "-m", "seal_fast.train", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def brute_force(model, loaders, k, pooled, split):
    """All embeddings at once, the fp64 reference KNN and the vote: what the streamed study must reproduce."""
    def embed(loader):
        feats, labels = {}, []
        for x, y in loader.epoch(0):
            for n, t in forward_probes(model, x, set(probe_names(model)) | {"output"}, pooled).items():
                feats.setdefault(n, []).append(t)
            labels.append(y)
        return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)

    support, support_labels = embed(loaders.train)
    queries, labels = embed(loaders.val if split == "val" else loaders.train)
    exclude = torch.arange(len(labels)) if split == "train" else None
    preds = torch.stack([vote(support_labels[knn_topk_ref(queries[n], support[n], k, exclude=exclude)[1]],
                              len(loaders.classes)) for n in probe_names(model)])
    return preds, queries["output"].argmax(1), labels


@pytest.mark.parametrize("split,pooled", [("val", True), ("train", True), ("val", False)])
def test_streamed_study_equals_all_at_once(trained, tiny_data, split, pooled):
    model, _, label = load_model(str(trained / "last.pt"), torch.device("cpu"), channels_last=False)
    loaders = build_eval_loaders(str(tiny_data), 10, 0, torch.device("cpu"), kind="torch")
    expected, final, labels = brute_force(model, loaders, 5, pooled, split)
    # everything in one pass / several passes, probes split into query slices, chunks shorter than the support
    for budget in (10**9, 40_000 if pooled else 1_000_000):
        study = Study(loaders, torch.device("cpu"), 5, pooled, split, "l2", False, budget, say=lambda m: None)
        r = study.run("last.pt", model, label)
        assert torch.equal(r.knn_preds, expected), budget
        assert torch.equal(r.final_pred, final) and torch.equal(r.labels, labels)
        assert torch.equal(r.depth, prediction_depth(expected, final))
        for i, n in enumerate(r.probes):
            assert r.knn_acc[n] == pytest.approx(float((expected[i] == labels).float().mean()))


def test_cli_end_to_end(trained, tiny_data, tmp_path):
    out = tmp_path / "depth"
    cmd = [sys.executable, "-m", "seal_fast", "depth", "--checkpoint", trained / "last.pt", trained / "best.pt",
           "--data", tiny_data, "--k", "5", "--workers", "0", "--out", out]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((out / "depth.json").read_text())
    assert len(doc["results"]) == 2
    for r in doc["results"]:
        names = [p["name"] for p in r["probes"]]
        assert names == ["input", "stem", "block.1.0", "block.2.0", "block.3.0", "block.4.0", "output"]
        assert sum(r["depth_histogram"]) == r["samples"] == 24 and len(r["depth_histogram"]) == 7
        assert all(0 <= p["knn_acc"] <= 1 for p in r["probes"][:-1])
    rows = (out / "depth_per_sample.csv").read_text().splitlines()
    assert rows[0] == "sample,label,prediction_0,depth_0,prediction_1,depth_1" and len(rows) == 25
    assert len((out / "probe_accuracy.csv").read_text().splitlines()) == 1 + 2 * 7
    for png in ("probe_accuracy.png", "depth_histogram.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,words", [
    (["--checkpoint", "missing.pt"], "no such file"),
    (["--k", "500"], "--k 500"),
    (["--k", "97"], "only 96 images"),
    (["--split", "train", "--k", "96"], "leaves itself out"),
    (["--memory-gb", "0"], "--memory-gb"),
])
def test_cli_errors(trained, tiny_data, tmp_path, args, words):
    base = ["--checkpoint", trained / "last.pt", "--data", tiny_data, "--workers", "0", "--out", tmp_path / "d"]
    if "--checkpoint" in args:
        base = base[2:]
    res = subprocess.run([sys.executable, "-m", "seal_fast", "depth", *map(str, base + args)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert words in res.stderr


def test_cli_refuses_wrong_dataset_and_non_checkpoints(trained, tmp_path):
    from seal_fast.data.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "other", num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=1)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    for ckpt, data, words in ((trained / "last.pt", other, "predicts 4 classes"), (junk, other, "not a seal_fast")):
        res = subprocess.run([sys.executable, "-m", "seal_fast", "depth", "--checkpoint", str(ckpt), "--data", str(data),
                              "--workers", "0", "--out", str(tmp_path / "d")], cwd=ROOT, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
        assert res.returncode == 2 and "Traceback" not in res.stderr and words in res.stderr, res.stderr[-2000:]


def test_diverged_checkpoint_is_refused_by_name(trained, tiny_data):
    model, _, label = load_model(str(trained / "last.pt"), torch.device("cpu"), channels_last=False)
    with torch.no_grad():
        model.layer3[0].conv1.weight.fill_(float("nan"))
    loaders = build_eval_loaders(str(tiny_data), 32, 0, torch.device("cpu"), kind="torch")
    study = Study(loaders, torch.device("cpu"), 5, True, "val", "l2", False, 10**9, say=lambda m: None)
    from seal_fast.errors import DataError

    with pytest.raises(DataError, match="output embeddings hold NaN"):
        study.run("last.pt", model, label)
