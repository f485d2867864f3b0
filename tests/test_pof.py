"""PoF (seal_fast/studies/pof.py): the classifier never moves, the line search finds a known minimum, the feature update
goes through the classifier moved by s * xi* along -g_hat, the CLI writes a seal_fast checkpoint and resumes
bit-identically after SIGKILL, bad input is one line."""

import copy
import json
import os
import sys

import pytest
import torch
from conftest import run_killing  # tests/ is on sys.path

from seal_fast import checkpoint, train
from seal_fast.studies import pof
from seal_fast.studies.features import load_model
from seal_fast.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "normal"
    assert train.main(["--data", str(tiny_data), "--out", str(out), "--method", "normal", "--arch", "resnet10",
                       "--generations", "1", "--epochs", "2", "--warmup", "1", "--batch-size", "16", "--workers",
                       "0", "--device", "cpu", "--keep-generations", "none"]) == 0
    return out / "last.pt"


@pytest.mark.parametrize("minimum, xi0, refine", [(3.7, 0.1, 8), (3.7, 0.1, 400), (0.02, 0.1, 8), (0.0, 0.5, 8)])
def test_line_search_finds_the_minimum_of_a_quadratic(minimum, xi0, refine):
    calls = []

    def loss_at(xi):
        calls.append(xi)
        return (xi - minimum) ** 2

    xi = pof.line_search(loss_at, xi0, refine=refine)
    assert xi >= 0 and all(c >= 0 for c in calls)
    # the bracket is at most 4x the doubling step around the minimum; refine splits it into refine + 1 gaps
    bracket = max(xi0, 4 * max(minimum, xi0))
    assert abs(xi - minimum) <= bracket / (refine + 1), (xi, minimum)


def test_one_step_keeps_the_classifier_and_updates_phi_through_the_moved_classifier():
    torch.manual_seed(0)
    model = build_model("resnet10", 4)
    ref = copy.deepcopy(model)
    cfg = pof.PofConfig(checkpoint="-", lr=0.05, momentum=0.9, weight_decay=5e-4)
    theta0 = (model.fc.weight.detach().clone(), model.fc.bias.detach().clone())
    for p in model.fc.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(pof.feature_params(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 4, (12,), generator=g))
    bt = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    r = pof.pof_step(model, theta0, opt, b, bt, cfg)
    assert r["xi"] > 0
    assert torch.equal(model.fc.weight, ref.fc.weight) and torch.equal(model.fc.bias, ref.fc.bias)
    # by hand: g_hat on B (eval mode), xi* from the same search, then the loss on B~ through theta0 - 2 xi* g_hat
    ref.eval()
    with torch.no_grad():
        feats = pof.backbone(ref, b[0])
    gw, gb = pof.normalized_gradient(feats, b[1], ref.fc.weight, ref.fc.bias)
    assert float((gw * gw).sum() + (gb * gb).sum()) == pytest.approx(1.0, rel=1e-5)
    ref.train()
    moved_w = ref.fc.weight.detach() - 2 * r["xi"] * gw
    moved_b = ref.fc.bias.detach() - 2 * r["xi"] * gb
    loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(pof.backbone(ref, bt[0]), moved_w, moved_b),
                                             bt[1])
    params = [p for n, p in ref.named_parameters() if not n.startswith("fc.")]
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(r["loss"], loss.detach())
    moved = 0
    for (name, p_new), p_old, grad in zip([(n, p) for n, p in model.named_parameters() if not n.startswith("fc.")],
                                          params, grads):
        d = grad + cfg.weight_decay * p_old.detach()                # SGD's first Nesterov step: p -= lr (1 + m) d
        torch.testing.assert_close(p_new.detach(), p_old.detach() - cfg.lr * (1 + cfg.momentum) * d,
                                   rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(p_new, p_old))
    assert moved > 0


def small(source, out, *extra):
    return ["--checkpoint", str(source), "--out", str(out), "--epochs", "3", "--batch-size", "16",
            "--search-batch", "32", "--lr", "0.01", "--workers", "0", "--device", "cpu", *extra]


def test_cli_writes_a_seal_fast_checkpoint_with_the_classifier_unchanged(source, tmp_path, capsys):
    out = tmp_path / "pof"
    assert pof.main(small(source, out)) == 0
    text = capsys.readouterr().out
    assert "before PoF: normal @ epoch 2" in text and "done: val top-1" in text
    st = checkpoint.read(out / "last.pt", resumable=True)
    src = checkpoint.read(source)
    assert st.next_epoch == 3 and st.config["method"] == "normal+pof" and st.config["pof"]["scale"] == 2.0
    assert torch.equal(st.model["fc.weight"], src.model["fc.weight"]) and torch.equal(st.model["fc.bias"],
                                                                                     src.model["fc.bias"])
    assert not torch.equal(st.model["conv1.weight"], src.model["conv1.weight"])
    model, cfg, label = load_model(str(out / "last.pt"), torch.device("cpu"))  # what every study does
    assert label.startswith("normal+pof @ epoch 3")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["xi_mean"] > 0 for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(source, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    assert pof.main(small(source, ref_out)) == 0
    ref = checkpoint.read(ref_out / "last.pt")
    kills = run_killing(lambda attempt: [sys.executable, "-m", "seal_fast", "pof", *small(source, out)] +
                        (["--resume"] if attempt else []), out / "last.pt", attempts=10, max_pause_s=0.3, seed=0)
    st = checkpoint.read(out / "last.pt")
    assert st.next_epoch == 3
    for k, v in ref.model.items():
        assert torch.equal(v, st.model[k]), f"{k} differs after {kills} kill(s)"


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/nonexistent.pt"], "no such file"),
    (["--checkpoint", "{src}", "--resume"], "--resume needs --out"),
    (["--checkpoint", "{src}", "--epochs", "0"], "--epochs 0"),
    (["--checkpoint", "{src}", "--data", "{other}", "--out", "{tmp}/o"], "predicts 4 classes"),
])
def test_bad_input_is_one_line(source, tmp_path, capsys, args, words):
    from seal_fast.data.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "other", num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=1)
    args = [a.format(src=source, other=other, tmp=tmp_path) for a in args]
    assert pof.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
