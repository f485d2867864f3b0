"""What PyTorch sees of the fused SGD step (kernels/fused_sgd.py): the kernels write parameters and momentum
buffers through raw addresses, so the launchers must say so. Eagerly they bump the version counters (autograd
then refuses a backward through a weight the step changed, as with torch.optim.SGD); under torch.compile the
step is one operator, torch.ops.seal_fast_sgd.step, that declares what it writes, so a compiled function that
reads a parameter after the update reads the updated value. The native operator's side: test_cuda_backend.py.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from test_fused_sgd import grads_for, make_params  # tests/ is on sys.path

from seal_fast.kernels import fused_sgd
from seal_fast.optim import SignedSGD

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _compile_or_skip(backend: str) -> None:
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python / platform")
    if backend == "inductor" and not torch.cuda.is_available() and not (shutil.which("g++") or shutil.which("gcc")):
        pytest.skip("inductor on the CPU needs a C++ compiler (g++ / gcc)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_step_bumps_version_counters_as_torch_sgd_does(backend, device):
    """A weight saved for backward and then changed by step(): torch.optim.SGD's in-place ops bump its version
    counter, so the backward raises instead of using the new values; the fused step must do the same (the
    Triton kernel writes through the records' addresses, which no counter saw before the fix)."""
    for make_opt in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                     lambda ps: SignedSGD(ps, lr=0.1, momentum=0.9, backend=backend)):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 6, device=device))
        opt = make_opt([w])
        w.grad = torch.ones_like(w)
        opt.step()  # the buffer exists from here on
        buf = opt.state[w]["momentum_buffer"]
        y = (w * w).sum()  # saves w
        before = w._version, buf._version
        opt.step()
        assert w._version > before[0] and buf._version > before[1], (type(opt).__name__, before)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def _table(device, dtype=torch.float32):
    params = [p.detach() for p in make_params([(2**11 + 17,), (5, 3), (64,)], dtype=dtype, device=device)]
    grads = [g.to(device=device, dtype=dtype) for g in grads_for(0, params)]
    bufs = [torch.zeros_like(p) for p in params]
    t = fused_sgd.make_table(params, grads, bufs, [0, 1, 1], 2)
    t.set_hyperparameters([-0.01, 0.1], [0.0, 1e-3], 0.9, 0.3)
    return t, params, grads, bufs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_update_then_read_sees_the_update(compiler, device):
    """torch.compile(fullgraph=True) of a function that runs the fused step and then reads the parameters (one
    graph: only the declared mutation orders the read after the update) returns, step after step, the same
    parameters and buffers as the eager step, and what it returns is the updated parameters. aot_eager hands
    the operator copies of what it mutates (functionalization): the operator updates those and the restart
    flags follow. (Before the fix, tracing the Triton launch failed in dynamo on the CPU; on a GPU it becomes a
    kernel that mutates only its table, so nothing orders the parameter reads after it.)"""
    _compile_or_skip(compiler)
    torch._dynamo.reset()
    eager, compiled = _table(device), _table(device)
    t, params, grads, bufs = compiled

    def update_then_read():
        fused_sgd.step(t, grads=grads)
        return torch.cat([p.flatten() for p in params]), torch.cat([b.flatten() for b in bufs])

    fn = torch.compile(update_then_read, fullgraph=True, backend=compiler)
    for step in range(3):
        if step == 2:  # a restart requested between compiled calls is seen by the next one
            eager[0].request_restart()
            t.request_restart()
        fused_sgd.step(eager[0], grads=eager[2])
        got_p, got_b = fn()
        want_p = torch.cat([p.flatten() for p in eager[1]])
        want_b = torch.cat([b.flatten() for b in eager[3]])
        assert torch.equal(got_p, want_p) and torch.equal(got_b, want_b), step
        assert torch.equal(torch.cat([p.flatten() for p in params]), want_p), step
        assert t.pending() == eager[0].pending() == [False, False, False]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_with_signed_sgd_equals_eager(device):
    """A compiled training step (forward, backward, SignedSGD.step(), a read of the weight) equals the same
    step run eagerly, bit for bit (aot_eager: the forward and backward kernels round as in eager), with a
    momentum reset between steps."""
    _compile_or_skip("aot_eager")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)
    models = [model, copy.deepcopy(model)]
    opts = [SignedSGD([{"params": m[0].parameters(), "lr": -0.01}, {"params": m[2].parameters()}], lr=0.1,
                      momentum=0.9, dampening=0.2, weight_decay=1e-3, backend="triton") for m in models]

    def train_step(model, opt, x):
        model(x).square().sum().backward()
        opt.step()
        return model[2].weight * 1.0

    compiled = torch.compile(train_step, backend="aot_eager")
    for step in range(4):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)).to(device)
        if step == 2:
            for o in opts:
                o.reset_momentum()
        a = train_step(models[0], opts[0], x)
        b = compiled(models[1], opts[1], x)
        for o in opts:
            o.zero_grad()
        assert torch.equal(b, models[1][2].weight), step  # the compiled read is the updated weight
        for p, q in zip(models[0].parameters(), models[1].parameters()):  # (cuBLAS may pick other kernels)
            torch.testing.assert_close(p, q, rtol=0, atol=0 if device == "cpu" else 1e-6)
        torch.testing.assert_close(a, b, rtol=0, atol=0 if device == "cpu" else 2e-6)
