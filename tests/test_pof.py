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


@pytest.mark.parametrize("cap, minimum, found", [(100, 40.0, True), (100, 60.0, False), (1000, 60.0, True),
                                                  (100, float("inf"), False)])
def test_line_search_cap_returns_none_past_it(cap, minimum, found):
    """xi0 = 1: under the official cap of 100 the search tries 1, 2, ..., 64 (the official lr_search: 1 to 64, then
    128 >= 100 stops it). On (xi - m)^2 the loss rises at 64 over 32 iff m < 48: a minimum at 40 is found, one at 60
    (or a loss that falls for ever) is past the cap: None, after exactly those 7 points."""
    calls = []

    def loss_at(xi):
        calls.append(xi)
        return -xi if minimum == float("inf") else (xi - minimum) ** 2

    xi = pof.line_search(loss_at, 1.0, cap=cap)
    if not found:
        assert xi is None and calls == [0.0] + [2.0 ** k for k in range(7)]
    else:
        assert xi is not None and abs(xi - minimum) <= 96 / 9 and max(calls) < 2 * cap


def test_line_search_cap_rule_on_the_boundary():
    # (64 - m)^2 > (32 - m)^2 iff m < 48: a minimum at 47 is bracketed under the cap 100, one at 49 is not
    assert pof.line_search(lambda xi: (xi - 47.0) ** 2, 1.0) == pytest.approx(47.0, abs=96 / 9)
    assert pof.line_search(lambda xi: (xi - 49.0) ** 2, 1.0) is None


def _one_step_setup(cfg):
    torch.manual_seed(0)
    model = build_model("resnet10", 4)
    with torch.no_grad():  # non-trivial running statistics, so train / eval mode differ on B
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ref = copy.deepcopy(model)
    theta0 = (model.fc.weight.detach().clone(), model.fc.bias.detach().clone())
    for p in model.fc.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(pof.feature_params(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(1)
    b = (torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 4, (12,), generator=g))
    bt = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g))
    return model, ref, theta0, opt, b, bt


@pytest.mark.parametrize("bn_mode, smoothing", [("eval", 0.0), ("train", 0.0), ("train", 0.1), ("eval", 0.1)])
def test_one_step_keeps_the_classifier_and_updates_phi_through_the_moved_classifier(bn_mode, smoothing):
    cfg = pof.PofConfig(checkpoint="-", lr=0.05, momentum=0.9, weight_decay=5e-4, bn_mode=bn_mode,
                        search_cap=2.0 ** 30)  # an untrained net: its loss falls far along -g_hat
    model, ref, theta0, opt, b, bt = _one_step_setup(cfg)
    r = pof.pof_step(model, theta0, opt, b, bt, cfg, smoothing)
    assert r["xi"] > 0
    assert torch.equal(model.fc.weight, ref.fc.weight) and torch.equal(model.fc.bias, ref.fc.bias)
    # by hand: g_hat on B (BN in bn_mode), xi* from the same search, then the loss on B~ through theta0 - 2 xi* g_hat
    ref.train(bn_mode == "train")
    with torch.no_grad():
        feats = pof.backbone(ref, b[0])
    if bn_mode == "eval":
        torch.testing.assert_close(feats, pof.backbone(copy.deepcopy(ref).eval(), b[0]).detach())
    gw, gb = pof.normalized_gradient(feats, b[1], ref.fc.weight, ref.fc.bias, smoothing)
    assert float((gw * gw).sum() + (gb * gb).sum()) == pytest.approx(1.0, rel=1e-5)
    ref.train()
    moved_w = ref.fc.weight.detach() - 2 * r["xi"] * gw
    moved_b = ref.fc.bias.detach() - 2 * r["xi"] * gb
    loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(pof.backbone(ref, bt[0]), moved_w, moved_b),
                                             bt[1], label_smoothing=smoothing)
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
    # the running statistics: moved by B (train mode, as the official code) and B~, or by B~ alone (eval mode)
    for (name, buf), (_, buf_ref) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(buf, buf_ref, rtol=1e-5, atol=1e-6, msg=name)


def test_bn_mode_train_moves_the_running_statistics_with_b_and_eval_does_not():
    for bn_mode in ("train", "eval"):
        cfg = pof.PofConfig(checkpoint="-", bn_mode=bn_mode)
        model, ref, _, _, b, _ = _one_step_setup(cfg)
        pof.search_features(model, b[0], bn_mode)
        same = torch.equal(model.bn1.running_mean, ref.bn1.running_mean)
        assert same == (bn_mode == "eval")
        assert model.bn1.num_batches_tracked == (1 if bn_mode == "train" else 0)


def test_a_step_at_the_cap_is_skipped_and_touches_nothing():
    # cap 2: the search tries xi0 only; xi0 = 1e-9 x |theta0| cannot raise the loss, so the step is skipped
    cfg = pof.PofConfig(checkpoint="-", lr=0.05, xi0=1e-9, search_cap=2, bn_mode="eval")
    model, ref, theta0, opt, b, bt = _one_step_setup(cfg)
    r = pof.pof_step(model, theta0, opt, b, bt, cfg)
    assert r == {"loss": None, "xi": None} and not opt.state
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), name


def test_the_loss_is_read_from_the_checkpoint_config():
    cfg = pof.PofConfig(checkpoint="-")
    assert pof.resolve_loss(cfg, {"label_smoothing": 0.1}, "a.pt")[0] == 0.1
    assert "label smoothing 0.1" in pof.resolve_loss(cfg, {"label_smoothing": 0.1}, "a.pt")[1]
    assert pof.resolve_loss(cfg, {"label_smoothing": 0.0}, "a.pt")[0] == 0.0
    ce = pof.PofConfig(checkpoint="-", loss="ce")
    assert pof.resolve_loss(ce, {"label_smoothing": 0.1}, "a.pt") == (0.0, "plain cross-entropy (--loss ce)")
    from seal_fast.errors import ConfigError
    with pytest.raises(ConfigError, match="records no label_smoothing.*--loss ce"):
        pof.resolve_loss(cfg, {"method": "normal"}, "a.pt")


def test_default_lr_is_the_official_schedule_after_its_fourth_drop():
    assert pof.PofConfig(checkpoint="-").lr == pytest.approx(0.1 * 0.2 ** 4)


def small(source, out, *extra):
    return ["--checkpoint", str(source), "--out", str(out), "--epochs", "3", "--batch-size", "16",
            "--search-batch", "32", "--lr", "0.01", "--workers", "0", "--device", "cpu",
            "--search-cap", "1e9", *extra]  # the 2-epoch source is far from a minimum: its loss falls past the cap


def test_cli_writes_a_seal_fast_checkpoint_with_the_classifier_unchanged(source, tmp_path, capsys):
    out = tmp_path / "pof"
    assert pof.main(small(source, out)) == 0
    text = capsys.readouterr().out
    assert "before PoF: normal @ epoch 2" in text and "done: val top-1" in text
    assert "loss: cross-entropy with label smoothing 0.1 (the checkpoint's, --loss checkpoint)" in text
    assert "B's BatchNorm in train mode" in text and "steps skipped at the search cap" in text
    st = checkpoint.read(out / "last.pt", resumable=True)
    src = checkpoint.read(source)
    assert src.config["label_smoothing"] == 0.1 and st.config["pof"]["label_smoothing"] == 0.1
    assert st.config["pof"]["loss"] == "checkpoint" and st.config["pof"]["bn_mode"] == "train"
    assert json.loads((out / "config.json").read_text())["pof"]["loss_used"].startswith("cross-entropy with label")
    assert st.next_epoch == 3 and st.config["method"] == "normal+pof" and st.config["pof"]["scale"] == 2.0
    assert torch.equal(st.model["fc.weight"], src.model["fc.weight"]) and torch.equal(st.model["fc.bias"],
                                                                                     src.model["fc.bias"])
    assert not torch.equal(st.model["conv1.weight"], src.model["conv1.weight"])
    model, cfg, label = load_model(str(out / "last.pt"), torch.device("cpu"))  # what every study does
    assert label.startswith("normal+pof @ epoch 3")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["xi_mean"] > 0 for r in rows)
    assert all(r["label_smoothing"] == 0.1 and r["bn_mode"] == "train" and r["skipped"] + r["steps"] == 6
               for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_counts_the_steps_skipped_at_the_cap_and_plain_ce(source, tmp_path, capsys):
    out = tmp_path / "capped"
    assert pof.main(small(source, out, "--xi0", "1e-9", "--search-cap", "2", "--loss", "ce", "--bn-mode", "eval",
                          "--epochs", "1")) == 0
    text = capsys.readouterr().out
    assert "loss: plain cross-entropy (--loss ce)" in text and "B's BatchNorm in eval mode" in text
    assert "6 of 6 steps skipped at the search cap" in text
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped"] == 6 and row["steps"] == 0 and row["label_smoothing"] == 0.0 and row["bn_mode"] == "eval"
    st = checkpoint.read(out / "last.pt")
    src = checkpoint.read(source)
    for k, v in src.model.items():  # every step skipped, eval-mode BN: nothing moved, running statistics included
        assert torch.equal(v, st.model[k]), k


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
    (["--checkpoint", "{src}", "--search-cap", "1"], "--search-cap 1.0: must be above 1"),
    (["--checkpoint", "{src}", "--data", "{other}", "--out", "{tmp}/o"], "predicts 4 classes"),
])
def test_bad_input_is_one_line(source, tmp_path, capsys, args, words):
    from seal_fast.data.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "other", num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=1)
    args = [a.format(src=source, other=other, tmp=tmp_path) for a in args]
    assert pof.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
