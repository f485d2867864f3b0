"""A graphed step never replays through stale addresses (seal_fast/step.py, issue 20 item 4).

A CUDA graph replays its kernels on the addresses it captured. On the CPU no graph can be captured, so
`FakeGraphed` stands in for the four device calls of step._Graphed (warm, capture, replay, release) and
everything else (which call warms up, captures, replays, re-captures or stops) is the production code. At
capture the fake takes an `Oracle`: every tensor a real replay would read or write (the model's parameters
and buffers at their addresses, held so no address is reused; the gradients, by weak reference; the
optimizer's table with its momentum buffers; the modules' train / eval mode). Each fake replay first asserts
that an eager step would touch exactly those (a full O(n) comparison, independent of the production check),
then runs the step eagerly. So a test fails whenever the production code would have replayed stale
addresses on a GPU: with the new checks switched off (step._Capture.stale returning None, the train / eval
mode out of the key, optim._Watch without its address compare), every trigger test below fails, at that
assertion or (the short-batch test) on the weights. The @gpu test at the end captures real graphs."""

import copy
import time
import weakref

import pytest
import torch
from torch import nn

from seal_fast.config import Config
from seal_fast.errors import SealError
from seal_fast.models import build_model, llf_names, reinit_in_place
from seal_fast.optim import SignedSGD
from seal_fast.step import EvalStep, TrainStep, _Capture
from seal_fast.train import Trainer, make_criterion


class Oracle:
    """What a real replay of the step captured now would touch, and whether an eager step still would."""

    def __init__(self, model, opt):
        self.model_tensors = [(mn, kind, n, t.detach(), t.data_ptr())  # detach(): holds the storage (no reuse)
                              for mn, m in model.named_modules() for kind in ("_parameters", "_buffers")
                              for n, t in getattr(m, kind).items() if t is not None]
        self.modes = [m.training for m in model.modules()]
        self.table = opt._table if opt is not None else None
        if self.table is not None:
            t = self.table
            self.slots = [(p, p.detach(), p.data_ptr(), weakref.ref(p.grad), b) for p, b in zip(t.params, t.bufs)]
            self.nesterov = opt.param_groups[0]["nesterov"]

    def problems(self, model, opt) -> list[str]:
        out = []
        modules = dict(model.named_modules())
        for mn, kind, n, _, ptr in self.model_tensors:
            now = getattr(modules.get(mn), kind, {}).get(n)
            if now is None or now.data_ptr() != ptr:
                out.append(f"{mn}.{n}: the forward reads the captured storage, an eager step another")
        if [m.training for m in model.modules()] != self.modes:
            out.append("train / eval mode differs from the capture")
        if self.table is None:
            return out
        live = {p for g in opt.param_groups for p in g["params"] if p.grad is not None}
        if live != {p for p, *_ in self.slots}:
            out.append("the parameters with gradients differ from the captured table's")
        for p, _, ptr, grad, buf in self.slots:
            if p.data_ptr() != ptr:
                out.append("a parameter's update goes to its old storage")
            if p.grad is None or p.grad is not grad():
                out.append("backward writes a gradient that is not p.grad")
            if self.table.momentum and opt.state[p].get("momentum_buffer") is not buf:
                out.append("the update reads a momentum buffer that is not the optimizer's")
        if opt.param_groups[0]["nesterov"] != self.nesterov:
            out.append("nesterov differs from the captured launch")
        return out


class FakeGraphed:
    """step._Graphed's device calls, on the CPU: a capture takes an Oracle, a replay checks it and steps eagerly."""

    fake_captures = 0

    def _warm(self, x, y):
        return self._eager(x, y)

    def _capture(self):
        self.oracle = Oracle(self.model, getattr(self, "optimizer", None))
        self.fake_captures += 1
        return object(), None

    def _replay(self):
        problems = self.oracle.problems(self.model, getattr(self, "optimizer", None))
        assert not problems, "a real replay would use stale tensors: " + "; ".join(sorted(set(problems)))
        self.static_out = self._eager(self.static_x, self.static_y)

    def _release(self):
        pass


class FakeTrainStep(FakeGraphed, TrainStep):
    pass


class FakeEvalStep(FakeGraphed, EvalStep):
    pass


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def groups(model):
    params = list(model.parameters())
    return [{"params": params[:3]}, {"params": params[3:]}]


class Pair:
    """A fake-graphed step and an eager twin on identical copies; `both(change)` applies a change to each."""

    def __init__(self, backend="torch", twin_backend="torch", warmup=2):
        model = tiny_model()
        self.models = [model, copy.deepcopy(model)]
        self.opts = [SignedSGD(groups(m), lr=0.05, momentum=0.9, weight_decay=5e-4, backend=b)
                     for m, b in zip(self.models, (backend, twin_backend))]
        self.exact = backend == twin_backend
        crit = nn.CrossEntropyLoss()
        self.graphed = FakeTrainStep(self.models[0], crit, self.opts[0], None, graphed=True, warmup=warmup)
        self.eager = TrainStep(self.models[1], crit, self.opts[1], None, graphed=False)
        g = torch.Generator().manual_seed(1)
        self.batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g))
                        for _ in range(3)]
        self.calls = 0

    def step(self, n=1, batch=None):
        for _ in range(n):
            x, y = batch or self.batches[self.calls % len(self.batches)]
            self.calls += 1
            a, b = self.graphed(x, y), self.eager(x, y)
            tol = dict(rtol=0, atol=0) if self.exact else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[0], b[0], **tol)

    def both(self, change):
        for m, o in zip(self.models, self.opts):
            change(m, o)

    def assert_same(self):
        tol = dict(rtol=0, atol=0) if self.exact else dict(rtol=1e-5, atol=1e-6)
        for p, q in zip(*(m.state_dict().values() for m in self.models)):
            torch.testing.assert_close(p, q, **tol)


def test_fake_graph_replays_and_an_unchanged_step_never_recaptures():
    pair = Pair()
    pair.step(8)
    g = pair.graphed
    assert (g.captures, g.replays, g.recaptures, g.fake_captures) == (1, 6, 0, 1)
    pair.assert_same()


def test_zero_grad_set_to_none_then_new_gradients_recaptures():
    from torch.nn.modules import module as nn_module

    pair = Pair()
    pair.step(4)
    hooks = len(nn_module._global_buffer_registration_hooks)
    pair.both(lambda m, o: o.zero_grad(set_to_none=True))
    pair.step(4)            # stale -> 2 warm-up steps (backward makes new gradients), capture, replay
    g = pair.graphed
    assert (g.captures, g.recaptures) == (2, 1) and "gradient was freed" in g.stale[0], g.stale
    pair.both(lambda m, o: o.zero_grad(set_to_none=True))
    pair.step(4)
    assert (g.captures, g.recaptures) == (3, 2)
    assert len(nn_module._global_buffer_registration_hooks) == hooks  # a dropped graph removes its hooks
    pair.assert_same()


def test_optimizer_load_state_dict_recaptures():
    pair = Pair()
    pair.step(4)
    saved = [copy.deepcopy(o.state_dict()) for o in pair.opts]
    pair.step(2)
    for o, sd in zip(pair.opts, saved):
        o.load_state_dict(sd)
    pair.step(4)
    g = pair.graphed
    assert (g.captures, g.recaptures) == (2, 1) and "load_state_dict" in g.stale[0], g.stale
    pair.assert_same()


def _swap_conv_weight(m, o):
    m[0].weight.data = m[0].weight.data.clone()


def _swap_bn_buffer(m, o):
    m[1].running_mean.data = m[1].running_mean.data.clone()


def _assign_bn_buffer(m, o):
    m[1].running_var = m[1].running_var.clone()


def _assign_module(m, o):
    fc = nn.Linear(8, 4)
    fc.load_state_dict(m[5].state_dict())
    m[5] = fc


def _llf_by_replacement(m, o):
    """An LLF re-initialization written as `p.data = fresh` (not how the trainer does it: see below)."""
    gen = torch.Generator().manual_seed(3)
    for p in (m[0].weight, m[5].weight):
        p.data = torch.empty_like(p).uniform_(-0.1, 0.1, generator=gen)


@pytest.mark.parametrize("change, why", [
    (_swap_conv_weight, "parameter's storage was replaced"),      # seen by the optimizer's table check
    (_swap_bn_buffer, "1.running_mean's storage was replaced"),   # a buffer: the model check
    (_assign_bn_buffer, "1.running_var was replaced by assignment"),
    (_assign_module, "5 was replaced by assignment"),
    (_llf_by_replacement, "parameter's storage was replaced"),
], ids=["p.data", "buffer.data", "buffer-assigned", "module-assigned", "llf-by-replacement"])
def test_replaced_model_tensors_recapture(change, why):
    pair = Pair()
    pair.step(4)
    pair.both(change)
    pair.step(4)
    g = pair.graphed
    assert (g.captures, g.recaptures) == (2, 1) and why in g.stale[0], g.stale
    pair.assert_same()


def test_in_place_changes_keep_the_graph():
    """What the trainer does between steps, all in place: model.load_state_dict, a SEAL phase change (momentum
    reset, negative lr, weight decay 0), LLF re-init (models.reinit_in_place). None re-captures."""
    pair = Pair()
    pair.step(4)
    sd = copy.deepcopy(pair.models[0].state_dict())
    pair.step(2)
    pair.both(lambda m, o: m.load_state_dict(sd))
    pair.step(2)

    def phase(m, o):
        o.reset_momentum()
        o.param_groups[0]["lr"], o.param_groups[0]["weight_decay"] = -0.005, 0.0

    pair.both(phase)
    pair.step(2)
    pair.both(lambda m, o: reinit_in_place(m, ["0.weight", "5.weight"], torch.Generator().manual_seed(3)))
    pair.step(2)
    g = pair.graphed
    assert (g.captures, g.recaptures) == (1, 0) and g.replays == 10
    pair.assert_same()


def test_train_eval_mode_is_part_of_the_key():
    pair = Pair()
    pair.step(4)
    pair.both(lambda m, o: m.eval())
    pair.step(2)            # eager: the graph recorded train-mode BatchNorm
    g = pair.graphed
    assert g.replays == 2 and g.recaptures == 0
    pair.both(lambda m, o: m.train())
    pair.step(2)
    assert g.replays == 4 and g.captures == 1
    pair.assert_same()


def test_short_batch_after_a_swap_steps_the_live_storage():
    """The Triton kernel writes through the table's raw addresses (here the interpreter on the CPU): after
    `p.data = ...` the next step, here an eager short batch between replays, must update the new storage."""
    pair = Pair(backend="triton")  # the twin: PyTorch ops on the live tensors
    pair.step(4)
    old = [m[0].weight.data for m in pair.models]  # keeps the old storage alive: stale writes land there
    pair.both(_swap_conv_weight)
    x, y = pair.batches[0]
    a, b = pair.graphed(x[:4], y[:4]), pair.eager(x[:4], y[:4])
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    pair.assert_same()
    assert not torch.equal(pair.models[0][0].weight, old[0])  # the update went to the live tensor
    assert pair.graphed.graph is None and "storage was replaced" in pair.graphed.stale[0]


def test_llf_reinit_as_the_trainer_does_it_keeps_one_graph(tiny_data, tmp_path):
    """The trainer's own LLF run (re-init in place at every generation, momentum resets, evaluation between
    epochs) through fake graphs: one capture per step kind for the whole run, never a stale replay, and the
    same weights as the eager trainer."""
    cfg = Config(data=str(tiny_data), arch="resnet10", method="llf", generations=2, epochs=2, warmup=1,
                 batch_size=16, workers=0, device="cpu", eval_every=1, keep_generations="none")
    trainers = []
    for name, fake in (("graphed", True), ("eager", False)):
        (tmp_path / name).mkdir()
        tr = Trainer(cfg, tmp_path / name, say=lambda m: None)
        if fake:
            tr.train_step = FakeTrainStep(tr.net, tr.criterion, tr.optimizer, tr.amp_dtype, True)
            tr.eval_step = FakeEvalStep(tr.model, tr.criterion, tr.amp_dtype, True)
        tr.fit()
        trainers.append(tr)
    assert sum(bool(e.reinit) for e in trainers[0].plan) >= 1
    ts, es = trainers[0].train_step, trainers[0].eval_step
    assert (ts.captures, ts.recaptures, es.captures, es.recaptures) == (1, 0, 1, 0)
    assert ts.replays > 0 and es.replays > 0
    for p, q in zip(*(t.model.state_dict().values() for t in trainers)):
        assert torch.equal(p, q)
    assert [r["val_loss"] for r in trainers[0].history] == [r["val_loss"] for r in trainers[1].history]


def test_tensors_replaced_before_every_step_stop_with_one_line():
    pair = Pair()
    pair.step(4)
    with pytest.raises(SealError, match=r"^FakeTrainStep: cannot capture the CUDA graph: a gradient was freed"):
        for _ in range(20):
            pair.both(lambda m, o: o.zero_grad(set_to_none=True))
            pair.step()
    pair = Pair()
    with pytest.raises(SealError, match=r"went stale right after each of the last 3 captures \(1.running_var was"):
        for _ in range(30):
            pair.step()
            pair.both(_assign_bn_buffer)


def test_graphed_step_refuses_what_it_cannot_capture():
    model = tiny_model()
    crit = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        TrainStep(model, crit, SignedSGD(model.parameters(), lr=0.1), torch.float16, graphed=True,
                  scaler=torch.amp.GradScaler("cpu", enabled=True))
    with pytest.raises(ValueError, match="needs SignedSGD"):
        TrainStep(model, crit, torch.optim.SGD(model.parameters(), lr=0.1), None, graphed=True)
    TrainStep(model, crit, torch.optim.SGD(model.parameters(), lr=0.1), None, graphed=False,
              scaler=torch.amp.GradScaler("cpu", enabled=True))  # eager: both fine


def test_replay_check_host_cost_resnet50(capsys):
    """The per-replay check on ResNet-50 (161 parameters in the optimizer's table, 159 buffers): no walk of
    the module tree, one address compare per tensor. Printed with -s; bounded loosely (shared CPUs)."""
    torch.manual_seed(0)
    model = build_model("resnet50", 200)
    opt = SignedSGD(groups(model), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    cap = _Capture(model, opt)
    assert cap.stale(opt) is None and len(cap.tensors) == 159
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        for _ in range(100):
            cap.stale(opt)
        best = min(best, (time.perf_counter() - t) / 100)
    with capsys.disabled():
        print(f"\nreplay check, ResNet-50: {best * 1e6:.1f} us per replay")
    assert best < 300e-6
    cap.close()


# -- on a GPU: real graphs ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_graph_recaptures_after_each_replacement_and_equals_eager():
    """A captured graph, then each trigger in turn (zero_grad(set_to_none=True), optimizer.load_state_dict,
    p.data = ..., a buffer assigned, LLF in place): the next replays equal an eager twin's steps."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    models = [build_model("resnet10", 10).cuda().to(memory_format=torch.channels_last) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    crit = make_criterion(Config())
    opts = [SignedSGD(groups(m), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
    steps = [TrainStep(m, crit, o, None, graphed=g, warmup=2) for m, o, g in zip(models, opts, (False, True))]
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, device="cuda", generator=gen).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (16,), device="cuda", generator=gen)) for _ in range(3)]
    saved = []

    def load(m, o):
        o.load_state_dict(saved[models.index(m)])

    def swap(m, o):
        m.conv1.weight.data = m.conv1.weight.data.clone()

    def assign(m, o):
        m.bn1.running_var = m.bn1.running_var.clone()

    def llf(m, o):
        reinit_in_place(m, llf_names(m, "layer3"), torch.Generator().manual_seed(3))

    plan = {5: lambda m, o: o.zero_grad(set_to_none=True), 10: load, 15: swap, 20: assign, 25: llf}
    for i in range(30):
        if i == 3:
            saved.extend(copy.deepcopy(o.state_dict()) for o in opts)
        if i in plan:
            for m, o in zip(models, opts):
                plan[i](m, o)
        x, y = batches[i % 3]
        out = [s(x, y) for s in steps]
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()
    g = steps[1]
    assert g.recaptures == 4 and g.captures == 5, g.stale
    assert g.replays >= 30 - 5 * 3
    for p, q in zip(*(m.state_dict().values() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
