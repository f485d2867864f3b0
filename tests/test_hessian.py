"""seal_fast.studies.hessian: products vs the explicit fp64 Hessian, power iteration vs a plain one, a softmax regression
and a quadratic whose Hessians are known in closed form, the sampled images, the CLI end to end and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seal_fast import checkpoint
from seal_fast.errors import ConfigError
from seal_fast.studies.hessian import load_samples, main, sample_indices
from seal_fast.studies.hessian_math import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    select_params,
    slq_density,
    top_eigenvalues,
    tridiagonal_quadrature,
)
from seal_fast.models import build_model
from seal_fast.studies.hessian_plots import density_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


def explicit_hessian(op: HessianOperator) -> torch.Tensor:
    """The whole Hessian of the operator's loss, by torch.autograd.functional.hessian (the reference only)."""
    def loss(theta):
        logits = torch.func.functional_call(op.model, (op.unflatten(theta), op.buffers), (op.inputs,))
        return F.cross_entropy(logits, op.labels)
    return torch.autograd.functional.hessian(loss, op.flat_params(), vectorize=True)


def plain_power_iteration(h: torch.Tensor, top: int, iters: int = 4000) -> list[float]:
    """Textbook power iteration on an explicit matrix, Hotelling deflation, a fixed number of steps."""
    h = h.clone()
    gen = torch.Generator().manual_seed(123)
    values = []
    for _ in range(top):
        v = torch.randn(h.shape[0], generator=gen, dtype=h.dtype)
        for _ in range(iters):
            v = h @ v
            v /= v.norm()
        lam = float(v @ h @ v)
        values.append(lam)
        h -= lam * torch.outer(v, v)
    return values


@pytest.fixture(scope="module")
def small():
    """A small conv net with BatchNorm (eval, non-trivial running statistics), tanh and max-pooling, in fp64:
    99 parameters, 6 images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).to(F64)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.3, 0.3)
    net.eval()
    x, y = torch.randn(6, 3, 5, 5, dtype=F64), torch.randint(0, 3, (6,))
    op = HessianOperator(net, x, y, batch_size=6)
    return net, x, y, explicit_hessian(op)


@pytest.mark.parametrize("batch_size,mode", [(6, "reverse"), (4, "reverse"), (1, "reverse"), (4, "forward")])
def test_products_equal_the_explicit_hessian(small, batch_size, mode):
    net, x, y, h = small
    op = HessianOperator(net, x, y, batch_size, mode)
    assert op.dim == h.shape[0] == 99 and torch.allclose(h, h.T, atol=1e-14)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=gen, dtype=F64)
        torch.testing.assert_close(op(v), h @ v, rtol=1e-11, atol=1e-13)
    assert op.loss() == pytest.approx(float(F.cross_entropy(net(x), y).detach()), rel=1e-13)


def test_power_iteration_matches_a_plain_fp64_one(small):
    net, x, y, h = small
    op = HessianOperator(net, x, y, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    found = top_eigenvalues(op, op.dim, top=3, max_iter=2000, tol=1e-12, gen=gen, dtype=F64)
    plain = plain_power_iteration(h, 3)
    exact = sorted(torch.linalg.eigvalsh(h).tolist(), key=abs, reverse=True)[:3]
    # the largest in magnitude, in order: here the third is negative (-0.985 beyond +0.969)
    assert exact[2] < 0 < exact[1] < exact[0]
    np.testing.assert_allclose(found.values, plain, rtol=1e-8)
    np.testing.assert_allclose(found.values, exact, rtol=1e-8)
    assert all(found.converged) and found.iterations[0] < 100
    torch.testing.assert_close(found.vectors @ found.vectors.T, torch.eye(3, dtype=F64), atol=1e-8, rtol=0)
    # PyHessian's defaults (100 products, relative tolerance 1e-3) give the top eigenvalue to about that tolerance
    gen.manual_seed(0)
    default = top_eigenvalues(op, op.dim, gen=gen, dtype=F64)
    assert default.values[0] == pytest.approx(exact[0], rel=2e-3)


def test_trace_and_density_match_the_explicit_hessian(small):
    net, x, y, h = small
    op = HessianOperator(net, x, y, batch_size=6)
    gen = torch.Generator().manual_seed(5)
    trace = hutchinson_trace(op, op.dim, max_iter=300, tol=0.0, gen=gen, dtype=F64)
    gen.manual_seed(5)
    again = hutchinson_trace(lambda v: h @ v, op.dim, max_iter=300, tol=0.0, gen=gen, dtype=F64)
    np.testing.assert_allclose(trace.estimates, again.estimates, rtol=1e-10)  # the same z^T H z, one by one
    assert len(trace.estimates) == 300 and not trace.converged
    assert abs(trace.mean - float(torch.trace(h))) < 4 * trace.std / np.sqrt(300)
    # Lanczos run to the full dimension: the quadrature nodes are H's eigenvalues (those the start vector sees)
    gen.manual_seed(6)
    dens = slq_density(op, op.dim, runs=1, steps=500, gen=gen, dtype=F64)
    exact = torch.linalg.eigvalsh(h).numpy()
    nodes, weights = np.array(dens.nodes[0]), np.array(dens.weights[0])
    assert dens.steps[0] <= op.dim and weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(nodes[:, None] - exact[None]).min(1).max() < 1e-8
    assert nodes.max() == pytest.approx(exact.max(), rel=1e-9) and nodes.min() == pytest.approx(exact.min(), rel=1e-9)


@pytest.mark.parametrize("prefixes", [["7"], ["1", "7"], ["0.weight"], ["4"]])
def test_a_parameter_subset_equals_the_explicit_hessian_of_that_subset(small, prefixes):
    """--params: the Hessian w.r.t. the selected parameters only (the others held), by torch.func.hessian of the loss
    as a function of those alone; it is also the full Hessian's principal submatrix on their coordinates."""
    net, x, y, h_full = small
    names = [n for n, _ in net.named_parameters()]
    chosen = select_params(names, prefixes)
    op = HessianOperator(net, x, y, batch_size=4, select=chosen)
    assert op.names == chosen and set(op.fixed) == set(names) - set(chosen)
    held = {n: p.detach() for n, p in net.named_parameters() if n not in chosen}
    buffers = dict(net.named_buffers())

    def loss(sub):
        return F.cross_entropy(torch.func.functional_call(net, (held, sub, buffers), (x,)), y)

    sub = {n: p.detach() for n, p in net.named_parameters() if n in chosen}
    blocks = torch.func.hessian(loss)(sub)
    h = torch.cat([torch.cat([blocks[a][b].reshape(sub[a].numel(), sub[b].numel()) for b in chosen], 1)
                   for a in chosen], 0)
    assert h.shape == (op.dim, op.dim)
    offsets = np.cumsum([0] + [p.numel() for p in net.parameters()])
    index = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in chosen])
    torch.testing.assert_close(h, h_full[index][:, index], rtol=1e-11, atol=1e-13)
    eye = torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(torch.stack([op(e) for e in eye], 1), h, rtol=1e-11, atol=1e-13)
    gen = torch.Generator().manual_seed(0)
    exact = sorted(torch.linalg.eigvalsh(h).tolist(), key=abs, reverse=True)
    found = top_eigenvalues(op, op.dim, top=1, max_iter=5000, tol=1e-13, gen=gen, dtype=F64)
    assert found.values[0] == pytest.approx(exact[0], rel=1e-7)
    trace = hutchinson_trace(op, op.dim, max_iter=400, tol=0.0, gen=gen, dtype=F64)
    assert abs(trace.mean - float(torch.trace(h))) <= 4 * trace.std / np.sqrt(400) + 1e-12


def test_params_prefixes_select_whole_module_names():
    names = ["conv1.weight", "bn1.weight", "layer4.0.conv1.weight", "layer4.2.bn3.bias", "layer40.weight",
             "fc.weight", "fc.bias", "fc2.weight"]
    assert select_params(names, None) == names
    assert select_params(names, ["fc"]) == ["fc.weight", "fc.bias"]
    assert select_params(names, ["layer4"]) == ["layer4.0.conv1.weight", "layer4.2.bn3.bias"]
    assert select_params(names, ["fc", "layer4.2"]) == ["layer4.2.bn3.bias", "fc.weight", "fc.bias"]  # model order
    assert select_params(names, ["fc.bias"]) == ["fc.bias"]
    with pytest.raises(ConfigError, match=r"--params fc\.: matches no parameter of the model; its top-level names "
                                          r"are conv1, bn1, layer4, layer40, fc, fc2"):
        select_params(names, ["fc."])
    with pytest.raises(ConfigError, match="--params classifier: matches no parameter"):
        select_params(names, ["fc", "classifier"])


def test_softmax_regression_closed_form():
    """Cross-entropy of a linear model: H = mean_i kron(diag(p_i) - p_i p_i^T, z_i z_i^T), z_i = [x_i, 1]."""
    torch.manual_seed(1)
    n, c = 7, 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, c)).to(F64).eval()
    x, y = torch.randn(n, 3, 2, 2, dtype=F64), torch.randint(0, c, (n,))
    d = 12
    p = torch.softmax(model(x), 1).detach()
    z = torch.cat([x.flatten(1), torch.ones(n, 1, dtype=F64)], 1)
    h = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(z[i], z[i])) for i in range(n)) / n
    order = [k * (d + 1) + j for k in range(c) for j in range(d)] + [k * (d + 1) + d for k in range(c)]
    h = h[order][:, order]  # weight (row-major), then bias: named_parameters() order
    closed_trace = float(sum((p[i] - p[i] ** 2).sum() * (z[i] @ z[i]) for i in range(n)) / n)
    assert float(torch.trace(h)) == pytest.approx(closed_trace, rel=1e-12)

    op = HessianOperator(model, x, y, batch_size=3)
    eye = torch.eye(op.dim, dtype=F64)
    torch.testing.assert_close(torch.stack([op(e) for e in eye], 1), h, rtol=1e-11, atol=1e-13)
    exact = torch.linalg.eigvalsh(h).flip(0)
    gen = torch.Generator().manual_seed(0)
    found = top_eigenvalues(op, op.dim, top=2, max_iter=2000, tol=1e-12, gen=gen, dtype=F64)
    np.testing.assert_allclose(found.values, exact[:2].numpy(), rtol=1e-8)
    trace = hutchinson_trace(op, op.dim, max_iter=400, tol=0.0, gen=gen, dtype=F64)
    assert abs(trace.mean - closed_trace) < 4 * trace.std / np.sqrt(400)
    # the softmax shift (the same change to every class's weights) is a null space: the nodes include ~0
    dens = slq_density(op, op.dim, steps=100, gen=gen, dtype=F64)
    assert abs(min(dens.nodes[0])) < 1e-8 and max(dens.nodes[0]) == pytest.approx(float(exact[0]), rel=1e-9)


def test_quadratic_with_a_known_spectrum():
    """L = 1/2 theta^T A theta, A = Q diag(lambda) Q^T: what PyHessian's algorithms give on a known answer."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.tensor([100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.1, -0.3] + [0.01 * k + 0.005 for k in range(30)],
                       dtype=F64)
    dim = len(lam)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    a = q @ torch.diag(lam) @ q.T
    # power iteration with PyHessian's defaults: top 3 within the 1e-3 tolerance (gap ratio 1/2, 2/5)
    found = top_eigenvalues(lambda v: a @ v, dim, top=3, gen=gen, dtype=F64)
    np.testing.assert_allclose(found.values, [100.0, 50.0, 20.0], rtol=1e-3)
    assert all(found.converged) and max(found.iterations) < 100
    # Hutchinson on a diagonal matrix: every Rademacher z gives z^T A z = trace exactly; it stops after 2 vectors
    diag = torch.diag(lam)
    exact = hutchinson_trace(lambda v: diag @ v, dim, gen=gen, dtype=F64)
    assert exact.estimates == pytest.approx([float(lam.sum())] * 2, rel=1e-14) and exact.converged
    assert exact.std == pytest.approx(0.0, abs=1e-12)
    # on the rotated matrix it is unbiased: the mean over 2000 vectors within 4 standard errors of the trace
    est = hutchinson_trace(lambda v: a @ v, dim, max_iter=2000, tol=0.0, gen=gen, dtype=F64)
    assert abs(est.mean - float(lam.sum())) < 4 * est.std / np.sqrt(2000)
    # Lanczos from v0: the quadrature matches v0^T A^k v0 (k < 2m) exactly; m = dim: nodes = the spectrum and
    # weights = the squared components of v0 on the eigenvectors
    v0 = torch.randn(dim, generator=gen, dtype=F64)
    v0 /= v0.norm()
    alphas, betas = lanczos(lambda v: a @ v, v0, steps=6)
    nodes, weights = map(np.array, tridiagonal_quadrature(alphas, betas))
    for k in range(12):
        assert (weights * nodes ** k).sum() == pytest.approx(float(v0 @ torch.linalg.matrix_power(a, k) @ v0),
                                                            rel=1e-9)
    alphas, betas = lanczos(lambda v: a @ v, v0, steps=100)
    assert len(alphas) == dim
    nodes, weights = map(np.array, tridiagonal_quadrature(alphas, betas))
    order = torch.argsort(lam)
    np.testing.assert_allclose(nodes, lam[order].numpy(), atol=1e-9)
    np.testing.assert_allclose(weights, ((q.T @ v0) ** 2)[order].numpy(), atol=1e-9)
    # PyHessian's smoothed density integrates to 1 over its grid and peaks at the nodes
    grid, density = density_curve([nodes.tolist()], [weights.tolist()])
    assert density.sum() * (grid[1] - grid[0]) == pytest.approx(1.0, rel=1e-9)
    assert grid[0] == pytest.approx(-0.31) and grid[-1] == pytest.approx(100.01)
    assert density_curve([nodes.tolist()], [weights.tolist()], grid=np.array([100.0]))[1][0] > \
        density_curve([nodes.tolist()], [weights.tolist()], grid=np.array([99.0]))[1][0] * 1e6


def test_sampled_images_are_the_defined_ones(tiny_data):
    from seal_fast.data.images import load_rgb
    from seal_fast.data.layout import scan_train
    from seal_fast.errors import ConfigError

    split = scan_train(tiny_data)
    assert sample_indices(96, 10) == [0, 9, 19, 28, 38, 48, 57, 67, 76, 86]
    images, labels, n, classes = load_samples(tiny_data, 10)
    assert n == 96 and classes == split.classes and images.dtype == torch.uint8 and images.shape == (10, 3, 32, 32)
    assert labels.tolist() == [split.labels[i] for i in sample_indices(96, 10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert torch.equal(images[7], torch.from_numpy(load_rgb(split.files[67]).copy()).permute(2, 0, 1))
    assert len(load_samples(tiny_data, 96)[1]) == 96
    with pytest.raises(ConfigError, match="--samples 97: the training set of .* has only 96 images"):
        load_samples(tiny_data, 97)


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory):
    """Two resnet10 checkpoints (RunState written directly, as the trainer writes them), on the tiny data."""
    folder = tmp_path_factory.mktemp("runs")
    out = []
    for seed, method in ((0, "seal"), (1, "llf")):
        torch.manual_seed(seed)
        run = folder / method
        run.mkdir()
        state = checkpoint.RunState(model=build_model("resnet10", 4).state_dict(), next_epoch=3,
                                    config={"arch": "resnet10", "method": method, "data": str(tiny_data)})
        checkpoint.write_last(state, run)
        out.append(run / "last.pt")
    return out


def test_cli_end_to_end(ckpts, tiny_data, tmp_path):
    out = tmp_path / "h"
    cmd = [sys.executable, "-m", "seal_fast", "hessian", "--checkpoint", *ckpts, "--samples", "4", "--batch-size", "3",
           "--top", "2", "--max-iter", "3", "--trace-max-iter", "2", "--slq-steps", "3", "--out", out]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("Hessian of the mean cross-entropy over 4 of 96 training images (indices i * 96 // 4)")
    assert lines[1].startswith("seal @ epoch 3 (seal/last.pt): loss ") and "top eigenvalues" in lines[1]
    assert lines[2].startswith("llf @ epoch 3 (llf/last.pt)") and lines[3].startswith("wrote ")
    doc = json.loads((out / "hessian.json").read_text())
    assert isinstance(doc, list) and [r["checkpoint"] for r in doc] == list(map(str, ckpts))
    for r in doc:
        assert len(r["top_eigenvalues"]) == 2 and r["top_eigenvalues"][0] >= r["top_eigenvalues"][1]
        assert r["trace"]["samples"] <= 2 and set(r["trace"]) >= {"mean", "std"}
        assert len(r["density"]["nodes"]) == 1 and len(r["density"]["nodes"][0]) == 3
        assert sum(r["density"]["weights"][0]) == pytest.approx(1.0, abs=1e-9)
        assert r["parameters"] == 4_907_844 and r["hessian_vector_products"] <= 2 * 3 + 2 + 3
        assert r["settings"]["samples"] == 4 and r["settings"]["tol"] == 1e-3 and r["settings"]["slq_runs"] == 1
    # the loss is the defined one: mean plain cross-entropy of the eval-mode model on the 4 sampled images
    from seal_fast.data.images import normalize
    from seal_fast.studies.features import load_model

    model, _, _ = load_model(str(ckpts[0]), torch.device("cpu"))
    images, labels, _, _ = load_samples(tiny_data, 4)
    with torch.no_grad():
        loss = F.cross_entropy(model(normalize(images, torch.device("cpu"), False)), labels)
    assert doc[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    table = (out / "table.md").read_text().splitlines()
    assert table[2].startswith("| checkpoint | run | loss | top eigenvalue |") and len(table) == 6
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_params_fc_records_the_subset(ckpts, tiny_data, tmp_path, capsys):
    out = tmp_path / "fc"
    assert main(list(map(str, ["--checkpoint", ckpts[0], "--samples", "4", "--params", "fc", "--max-iter", "200",
                               "--tol", "1e-9", "--trace-max-iter", "3", "--slq-steps", "5", "--dtype", "float64",
                               "--out", out]))) == 0
    text = capsys.readouterr().out
    assert "(the parameters under fc (2 tensors, 2,052 of 4,907,844))" in text
    doc = json.loads((out / "hessian.json").read_text())[0]
    assert doc["parameter_names"] == ["fc.weight", "fc.bias"] and doc["parameters"] == 512 * 4 + 4
    assert doc["settings"]["params"] == ["fc"]
    assert "w.r.t. the parameters under fc (2,052 of them)" in (out / "table.md").read_text()
    # the same number as the closed form of a softmax regression on the checkpoint's pooled features
    from seal_fast.data.images import normalize
    from seal_fast.studies.features import load_model
    from seal_fast.studies.pof import backbone

    model, _, _ = load_model(str(ckpts[0]), torch.device("cpu"))
    model = model.to(F64).eval()
    images, labels, _, _ = load_samples(tiny_data, 4)
    with torch.no_grad():
        feats = backbone(model, normalize(images, torch.device("cpu"), False, dtype=F64))
    head = nn.Linear(512, 4).to(F64)
    head.load_state_dict(model.fc.state_dict())
    op = HessianOperator(nn.Sequential(head).eval(), feats, labels, batch_size=4)
    h = torch.stack([op(e) for e in torch.eye(op.dim, dtype=F64)], 1)
    assert doc["top_eigenvalues"][0] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)


def test_cli_params_matching_nothing_is_one_line_exit_2(ckpts, tiny_data, tmp_path, capsys):
    code = main(list(map(str, ["--checkpoint", ckpts[0], "--data", tiny_data, "--samples", "4", "--params", "fc",
                               "head", "--out", tmp_path / "o"])))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --params head: matches no parameter of the model; its top-level names are conv1, "
                          "bn1, layer1, layer2, layer3, layer4, fc")
    assert not (tmp_path / "o").exists()


def _junk(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    return junk


def _text(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    return text


def _other_arch(tmp_path, tiny_data):
    """A config naming resnet50 over resnet10 weights."""
    run = tmp_path / "mixed"
    run.mkdir()
    checkpoint.write_last(checkpoint.RunState(model=build_model("resnet10", 4).state_dict(), next_epoch=1,
                                              config={"arch": "resnet50", "method": "seal"}), run)
    return run / "last.pt"


def _unknown_arch(tmp_path, tiny_data):
    run = tmp_path / "vit"
    run.mkdir()
    checkpoint.write_last(checkpoint.RunState(model={"fc.weight": torch.zeros(4, 8)}, next_epoch=1,
                                              config={"arch": "vit_b_16", "method": "seal"}), run)
    return run / "last.pt"


def _other_data(tmp_path, tiny_data):
    from seal_fast.data.synthetic import write_synthetic

    return write_synthetic(tmp_path / "other", num_classes=3, train_per_class=2, val_per_class=1, size=16, seed=1)


@pytest.mark.parametrize("case,words", [
    ("missing dataset", "--data /nonexistent/tiny-imagenet-200: no such folder"),
    ("no wnids", "wnids.txt: missing"),
    ("too many samples", "--samples 500: the training set of"),
    ("missing checkpoint", "--checkpoint missing.pt: no such file"),
    ("not a checkpoint", "not a seal_fast checkpoint"),
    ("not even torch", "cannot read this checkpoint"),
    ("other architecture", "its weights are not a resnet50's (the architecture its config names)"),
    ("unknown architecture", "names the architecture 'vit_b_16', which seal_fast does not build"),
    ("other classes", "predicts 4 classes but"),
    ("bad flag", "--samples 0: must be at least 1"),
])
def test_cli_errors_are_one_line(ckpts, tiny_data, tmp_path, capsys, case, words):
    ckpt, data, extra = ckpts[0], tiny_data, []
    if case == "missing dataset":
        data = "/nonexistent/tiny-imagenet-200"
    elif case == "no wnids":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "too many samples":
        extra = ["--samples", "500"]
    elif case == "missing checkpoint":
        ckpt = "missing.pt"
    elif case == "not a checkpoint":
        ckpt = _junk(tmp_path)
    elif case == "not even torch":
        ckpt = _text(tmp_path)
    elif case == "other architecture":
        ckpt = _other_arch(tmp_path, tiny_data)
    elif case == "unknown architecture":
        ckpt = _unknown_arch(tmp_path, tiny_data)
    elif case == "other classes":
        data = _other_data(tmp_path, tiny_data)
        extra = ["--samples", "4"]
    elif case == "bad flag":
        extra = ["--samples", "0"]
    code = main(list(map(str, ["--checkpoint", ckpt, "--data", data, "--out", tmp_path / "o", *extra])))
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert words in err and "Traceback" not in err


def test_python_m_error_has_no_traceback(ckpts, tmp_path):
    res = subprocess.run([sys.executable, "-m", "seal_fast", "hessian", "--checkpoint", str(ckpts[0]), "--data",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                         text=True, check=False, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "no such folder" in res.stderr and not (tmp_path / "o" / "hessian.json").exists()


def test_data_folder_of_the_config_gone(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.write_last(checkpoint.RunState(model=build_model("resnet10", 4).state_dict(), next_epoch=1,
                                              config={"arch": "resnet10", "data": str(tmp_path / "gone")}), run)
    assert main(["--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gone: the data folder" in err and "pass --data" in err and len(err.strip().splitlines()) == 1
