"""SignedSGD (Triton kernel under the interpreter on CPU, and the torch reference) against torch.optim.SGD.

Accuracy rule (flash-attention's): |ours - fp64 reference| <= 2 * |torch.optim.SGD in the same dtype -
fp64 reference| + atol, per dtype, over 50+ steps. Gradients are synthetic (a seeded function of the
step), so every optimizer sees the same ones.
"""

import copy

import pytest
import torch

from seal_fast.optim import SignedSGD

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BACKENDS = ["triton", "torch"]


def make_params(shapes, dtype=torch.float32, channels_last=(), device="cpu"):
    g = torch.Generator().manual_seed(0)
    params = []
    for i, s in enumerate(shapes):
        p = torch.randn(s, generator=g).to(device=device, dtype=dtype)
        if i in channels_last:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(p))
    return params


def clone(params, dtype=None):
    out = []
    for p in params:
        q = p.detach().clone()
        if dtype is not None:
            q = q.to(dtype)
        out.append(torch.nn.Parameter(q))
    return out


def grads_for(step, params, bad=None):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if bad is not None and i == bad:
            x.view(-1)[0] = float("inf")
        out.append(x)
    return out


def set_grads(params, grads, scale=1.0):
    for p, g in zip(params, grads):
        gg = (g * scale).to(p.dtype)
        if p.grad is None:
            p.grad = torch.empty_like(p)  # same layout as the param (the autograd contract)
        p.grad.copy_(gg)


def two_groups(params, split, lr=0.1, wd=5e-4, ascent=-0.01):
    return [{"params": params[:split], "lr": lr * ascent, "weight_decay": 0.0},   # early: ascent, no wd
            {"params": params[split:], "lr": lr, "weight_decay": wd}]             # later: descent


def torch_sgd(groups, **kw):
    lrs = [g["lr"] for g in groups]
    opt = torch.optim.SGD([dict(g, lr=abs(g["lr"])) for g in groups], lr=0.1, **kw)
    for g, lr in zip(opt.param_groups, lrs):  # SGD refuses a negative lr in its constructor only
        g["lr"] = lr
    return opt


def run(opt, params, steps, reset_at=(), lr_change_at=None):
    for step in range(steps):
        if step in reset_at:
            if isinstance(opt, SignedSGD):
                opt.reset_momentum()
            else:
                opt.state.clear()  # what the published code does: a new torch.optim.SGD
        if lr_change_at is not None and step == lr_change_at:
            for g in opt.param_groups:
                g["lr"] = -g["lr"] * 0.5  # flip the sign of every group mid-run
        set_grads(params, grads_for(step, params))
        opt.step()


def assert_close_to_reference(ours, theirs, ref, dtype):
    for a, b, r in zip(ours, theirs, ref):
        err = (a.detach().double() - r.detach()).abs().max().item()
        torch_err = (b.detach().double() - r.detach()).abs().max().item()
        assert err <= 2 * torch_err + ATOL[dtype], (err, torch_err)


SHAPES_ODD = [(1,), (7,), (13, 17), (2**11 + 17,), (2**12 + 17,), (31, 3, 3, 3), (5, 1, 1, 1), (4099,)]
SHAPES_MANY = [(k % 9 + 1, k % 5 + 2) for k in range(40)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov, dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("shapes", [SHAPES_ODD, SHAPES_MANY], ids=["odd-sizes", "40-small-tensors"])
def test_matches_torch_sgd_over_many_steps(backend, nesterov, dampening, shapes):
    params = make_params(shapes, channels_last=(5, 6) if shapes is SHAPES_ODD else ())
    theirs, ref = clone(params), clone(params, torch.float64)
    split = len(params) // 2
    kw = dict(momentum=0.9, dampening=dampening, nesterov=nesterov)
    ours = SignedSGD(two_groups(params, split), lr=0.1, backend=backend, **kw)
    run(ours, params, 55, reset_at=(20,), lr_change_at=35)
    run(torch_sgd(two_groups(theirs, split), **kw), theirs, 55, reset_at=(20,), lr_change_at=35)
    run(torch_sgd(two_groups(ref, split), **kw), ref, 55, reset_at=(20,), lr_change_at=35)
    assert_close_to_reference(params, theirs, ref, torch.float32)
    for i in (5, 6) if shapes is SHAPES_ODD else ():
        assert params[i].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters(backend):
    params = make_params([(33,), (5, 7), (2**11 + 17,)], dtype=torch.bfloat16)
    theirs, ref = clone(params), clone(params, torch.float64)
    ours = SignedSGD(two_groups(params, 1), lr=0.1, momentum=0.9, backend=backend)
    run(ours, params, 50, reset_at=(25,))
    run(torch_sgd(two_groups(theirs, 1), momentum=0.9), theirs, 50, reset_at=(25,))
    run(torch_sgd(two_groups(ref, 1), momentum=0.9), ref, 50, reset_at=(25,))
    assert_close_to_reference(params, theirs, ref, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_momentum(backend):
    params = make_params(SHAPES_ODD[:4])
    theirs = clone(params)
    run(SignedSGD(two_groups(params, 2), lr=0.1, backend=backend), params, 10)
    run(torch_sgd(two_groups(theirs, 2)), theirs, 10)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_with_torch_sgd(backend):
    """SignedSGD -> torch.optim.SGD -> SignedSGD mid-run, including a pending reset, equals one SignedSGD."""
    params = make_params(SHAPES_ODD, channels_last=(5,))
    a, b = clone(params), clone(params)
    kw = dict(momentum=0.9, dampening=0.2)
    straight = SignedSGD(two_groups(a, 3), lr=0.1, backend=backend, **kw)
    run(straight, a, 30, reset_at=(10,))
    first = SignedSGD(two_groups(b, 3), lr=0.1, backend=backend, **kw)
    run(first, b, 10)
    first.reset_momentum()  # pending restart: exported as momentum_buffer None, like a new torch SGD
    sd = first.state_dict()
    assert all(st["momentum_buffer"] is None for st in sd["state"].values())
    middle = torch_sgd(two_groups(b, 3), **kw)
    middle.load_state_dict(sd)
    for step in range(10, 20):
        set_grads(b, grads_for(step, b))
        middle.step()
    last = SignedSGD(two_groups(b, 3), lr=0.1, backend=backend, **kw)
    last.load_state_dict(middle.state_dict())
    for step in range(20, 30):
        set_grads(b, grads_for(step, b))
        last.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-6)
    assert b[5].is_contiguous(memory_format=torch.channels_last)
    assert last.state[b[5]]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_parameter_changes_are_seen(backend):
    """LLF re-initializes weights in place and model.load_state_dict copies in place: the next step uses them."""
    params = make_params([(6, 4), (9,)])
    theirs = clone(params)
    ours = SignedSGD(two_groups(params, 1), lr=0.1, momentum=0.9, backend=backend)
    ref = torch_sgd(two_groups(theirs, 1), momentum=0.9)
    run(ours, params, 3)
    run(ref, theirs, 3)
    with torch.no_grad():
        for p, q in zip(params, theirs):
            p.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
            q.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    run(ours, params, 3)
    run(ref, theirs, 3)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradients_under_loss_scaling_skip_the_step(backend):
    params = make_params([(5, 3), (7,), (2**11 + 17,)]) + make_params([(4, 4)], dtype=torch.bfloat16)
    opt = SignedSGD(two_groups(params, 2), lr=0.1, momentum=0.9, dampening=0.1, backend=backend)
    scale = 1024.0
    inv = torch.tensor(1 / scale)
    for step in range(3):
        set_grads(params, grads_for(step, params), scale)
        opt.step(inv_scale=inv)
        assert opt.found_inf_flag.item() == 0
    opt.reset_momentum()
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    set_grads(params, grads_for(3, params, bad=3), scale)  # an inf in the bf16 tensor, checked before fp32 updates
    opt.step(inv_scale=inv)
    assert opt.found_inf_flag.item() == 1
    for p, b, q in zip(params, before, bufs):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["momentum_buffer"], q)
    # the skipped step kept the pending restart: the next finite step starts the buffers at d_p
    twin = clone(before[:3])
    ref = torch_sgd(two_groups(twin, 2), momentum=0.9, dampening=0.1)
    g = grads_for(4, params)
    set_grads(params, g, scale)
    opt.step(inv_scale=inv)
    set_grads(twin, g[:3])
    ref.step()
    assert opt.found_inf_flag.item() == 0
    for a, b in zip(params[:3], twin):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_contract(backend):
    """With torch.amp.GradScaler, SignedSGD unscales and skips itself, matching GradScaler + torch.optim.SGD."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    ours = SignedSGD(two_groups(list(model.parameters()), 2), lr=0.1, momentum=0.9, backend=backend)
    theirs = torch_sgd(two_groups(list(twin.parameters()), 2), momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2) for _ in range(2)]
    for step in range(8):
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        if step == 5:
            x[0, 0] = float("inf")  # an overflow step: skipped by both, and the scale backs off
        for m, opt, sc in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            sc.scale(torch.nn.functional.cross_entropy(m(x), y)).backward()
            sc.step(opt)
            sc.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_shared_settings_and_backend_errors():
    p = make_params([(3,), (4,)])
    with pytest.raises(ValueError, match="share momentum"):
        SignedSGD([{"params": p[:1], "momentum": 0.9}, {"params": p[1:], "momentum": 0.5}], lr=0.1).step()
    with pytest.raises(ValueError, match="backend"):
        SignedSGD(p, lr=0.1, backend="metal")
    with pytest.raises(RuntimeError, match="native extension"):
        SignedSGD(p, lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="Nesterov"):
        SignedSGD(p, lr=0.1, nesterov=True)


# ---- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("nesterov, dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_cuda_matches_torch_sgd(nesterov, dampening):
    params = make_params(SHAPES_ODD + SHAPES_MANY, channels_last=(5, 6), device="cuda")
    theirs, ref = clone(params), clone(params, torch.float64)
    kw = dict(momentum=0.9, dampening=dampening, nesterov=nesterov)
    run(SignedSGD(two_groups(params, 20), lr=0.1, backend="triton", **kw), params, 55, reset_at=(20,), lr_change_at=35)
    run(torch_sgd(two_groups(theirs, 20), **kw), theirs, 55, reset_at=(20,), lr_change_at=35)
    run(torch_sgd(two_groups(ref, 20), **kw), ref, 55, reset_at=(20,), lr_change_at=35)
    assert_close_to_reference(params, theirs, ref, torch.float32)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_hyperparameters_matches_eager():
    params = make_params(SHAPES_ODD, channels_last=(5,), device="cuda")
    eager_params = clone(params)
    graphed = SignedSGD(two_groups(params, 3), lr=0.1, momentum=0.9, dampening=0.1, backend="triton")
    eager = SignedSGD(two_groups(eager_params, 3), lr=0.1, momentum=0.9, dampening=0.1, backend="triton")
    set_grads(params, grads_for(0, params))
    set_grads(eager_params, grads_for(0, eager_params))
    graphed.step()  # eager warm-up step: builds the table, compiles the kernel
    eager.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(1, 30):
        if step == 10:  # ascent becomes descent, a new weight decay, and a momentum reset
            for opt in (graphed, eager):
                opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = 0.05, 1e-3
                opt.reset_momentum()
        g = grads_for(step, params)
        set_grads(params, g)
        set_grads(eager_params, g)
        graphed.sync_hyperparameters()
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
