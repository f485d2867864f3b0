"""The training step (seal_fast/step.py): eager, it is exactly zero_grad + forward + loss + backward + step;
without CUDA a clean fallback; on a GPU, graph replays equal eager steps across a phase change, a momentum
reset and an LLF re-initialization."""

import pytest
import torch

from seal_fast.config import Config
from seal_fast.errors import ConfigError
from seal_fast.models import build_model, llf_names, reinit_in_place
from seal_fast.optim import SignedSGD
from seal_fast.step import EvalStep, TrainStep, graph_support
from seal_fast.train import Trainer, apply_entry, make_criterion


def test_graph_support_says_why_not():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    model = torch.nn.Linear(2, 2)
    signed = SignedSGD(model.parameters(), lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert graph_support(cpu, signed, None, 1) == (False, "CUDA graphs need a CUDA device; eager steps on the CPU")
    assert not graph_support(cuda, plain, None, 1)[0]
    assert not graph_support(cuda, signed, torch.float16, 1)[0]
    assert not graph_support(cuda, signed, torch.bfloat16, 2)[0]
    assert graph_support(cuda, signed, torch.bfloat16, 1)[0]


def test_cpu_trainer_falls_back_to_eager_steps(tiny_data, tmp_path):
    cfg = Config(data=str(tiny_data), arch="resnet10", method="seal", generations=2, epochs=2, ascent_epochs=1,
                 warmup=1, batch_size=16, workers=0, device="cpu")
    tr = Trainer(cfg, tmp_path, say=lambda m: None)
    assert not tr.graphed and "eager" in tr.graph_why
    apply_entry(tr.optimizer, tr.plan[0])
    row = tr.train_epoch(tr.plan[0])
    assert row["train_loss"] > 0 and tr.train_step.replays == 0
    with pytest.raises(ConfigError, match="--cuda-graph on: CUDA graphs need a CUDA device"):
        Trainer(Config(**dict(cfg.to_dict(), cuda_graph="on")), tmp_path, say=lambda m: None)


def test_eager_step_is_the_plain_training_step():
    """TrainStep(graphed=False) is zero_grad + forward + loss + backward + step, nothing else."""
    torch.manual_seed(0)
    a, b = build_model("resnet10", 4), build_model("resnet10", 4)
    b.load_state_dict(a.state_dict())
    crit = make_criterion(Config())
    opt_a = SignedSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_b = SignedSGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(a, crit, opt_a, None, graphed=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for _ in range(3):
        loss, correct = step(x, y)
        opt_b.zero_grad()
        logits = b(x)
        ref = crit(logits, y)
        ref.backward()
        opt_b.step()
        assert torch.equal(loss, ref.detach()) and correct == (logits.argmax(1) == y).sum()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_captured_step_equals_eager_across_phase_change_reset_and_reinit(amp):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    models = [build_model("resnet18", 10).cuda().to(memory_format=torch.channels_last) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    crit = make_criterion(Config())
    opts, steps = [], []
    for m, graphed in zip(models, (False, True)):
        early = [p for n, p in m.named_parameters() if not n.startswith(("layer3", "layer4", "fc"))]
        later = [p for n, p in m.named_parameters() if n.startswith(("layer3", "layer4", "fc"))]
        opt = SignedSGD([{"params": early}, {"params": later}], lr=0.05, momentum=0.9, weight_decay=5e-4)
        opts.append(opt)
        steps.append(TrainStep(m, crit, opt, amp, graphed=graphed, warmup=2))
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (32,), device="cuda", generator=g)) for _ in range(4)]
    for i in range(14):
        if i == 6:      # SEAL's ascent: the early group's lr turns negative, wd 0, momentum restarts
            for opt in opts:
                opt.reset_momentum()
                opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = -0.0005, 0.0
        if i == 10:     # LLF: later layers re-initialized in place, lr back to descent
            for m, opt in zip(models, opts):
                reinit_in_place(m, llf_names(m, "layer3"), torch.Generator().manual_seed(3))
                opt.reset_momentum()
                opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = 0.05, 5e-4
        x, y = batches[i % 4]
        out = [s(x, y) for s in steps]
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    assert steps[1].replays >= 11 and steps[0].replays == 0
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    ev = [EvalStep(m.eval(), crit, amp, graphed=e) for m, e in zip(models, (False, True))]
    for _ in range(4):
        a, b = (e(*batches[0]) for e in ev)
        torch.testing.assert_close(b[0], a[0])
        assert torch.equal(b[1], a[1])
    assert ev[1].replays >= 1
