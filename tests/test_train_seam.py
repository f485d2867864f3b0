"""The optimizer seam applies the plan with torch.optim.SGD's exact semantics, and SEAL's ascent forgets."""

import copy
import dataclasses

import pytest
import torch

from seal_fast.config import Config
from seal_fast.data.cache_loader import CacheLoader
from seal_fast.data.layout import scan_train
from seal_fast.schedule import Entry, Group, build_plan
from seal_fast.train import Trainer, apply_entry, make_optimizer


def test_apply_entry_signed_lr_wd_and_reset_match_hand_written_sgd():
    """Two groups, one ascending with wd 0, one descending with wd; a reset in the middle."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    names = [n for n, _ in model.named_parameters()]
    cfg = Config(momentum=0.9, weight_decay=0.01, lr=0.1)
    early, later = names[:2], names[2:]

    def entry(early_lr, early_wd, later_lr, reset):
        return Entry(0, 0, 0, "descent", reset, (), False,
                     (Group("early", early_lr, early_wd, tuple(early)), Group("later", later_lr, 0.01, tuple(later))))

    schedule = [entry(-0.001, 0.0, 0.1, True)] * 3 + [entry(0.05, 0.01, 0.05, True)] + [entry(0.05, 0.01, 0.05, False)] * 2
    opt = make_optimizer(model, schedule[0], cfg)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = {}
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for e in schedule:
        apply_entry(opt, e)
        if e.reset_momentum:
            buf = {}
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for g in e.groups:
            for n in g.params:
                d_p = grads[n] + g.weight_decay * ref[n]
                buf[n] = d_p.clone() if n not in buf else 0.9 * buf[n] + d_p
                ref[n] = ref[n] - g.lr * buf[n]
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=0, atol=1e-6)


def _train_mode_loss(model, batches, grad=False):
    """Mean loss over fixed batches with batch-statistics BN, on a copy (the model's buffers are untouched).
    With grad=True: the full-batch gradient of that loss, by parameter name."""
    m = copy.deepcopy(model).train()
    with torch.set_grad_enabled(grad):
        loss = sum(torch.nn.functional.cross_entropy(m(x), y, reduction="sum") for x, y in batches)
        loss = loss / sum(len(y) for _, y in batches)
    if not grad:
        return float(loss)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _ascent_epoch(tiny_data, tmp_path, scale):
    """Train generation 0, then generation 1's first epoch as the trainer does. Returns the loss on fixed
    un-augmented training images before, the loss with only the early partition's update applied, and
    the cosine of each partition's update with the full-batch gradient taken before the epoch."""
    cfg = Config(data=str(tiny_data), arch="resnet10", generations=2, epochs=3, ascent_epochs=1, warmup=1,
                 batch_size=16, workers=0, ascent_lr_scale=scale)
    tr = Trainer(cfg, tmp_path, say=lambda m: None)
    for entry in tr.plan[:3]:  # generation 0: normal training
        apply_entry(tr.optimizer, entry)
        tr.train_epoch(entry)
    plain = CacheLoader(scan_train(tiny_data), 96, train=False, seed=0, workers=0, device=tr.device)
    batches = list(plain.epoch(0))  # the training images without augmentation
    entry = tr.plan[3]
    early = set(entry.early.params)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    loss_before, grad = _train_mode_loss(tr.model, batches), _train_mode_loss(tr.model, batches, grad=True)
    apply_entry(tr.optimizer, entry)
    tr.train_epoch(entry)
    after = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    only_early = copy.deepcopy(tr.model)
    with torch.no_grad():
        for n, p in only_early.named_parameters():
            p.copy_(after[n] if n in early else before[n])

    def cosine(names):
        d = torch.cat([(after[n] - before[n]).flatten() for n in names])
        g = torch.cat([grad[n].flatten() for n in names])
        return float(d @ g / (d.norm() * g.norm()))

    later = [n for n in before if n not in early]
    return entry, loss_before, _train_mode_loss(only_early, batches), cosine(sorted(early)), cosine(later)


def test_one_seal_ascent_epoch_forgets_in_early_layers_while_later_layers_descend(tiny_data, tmp_path):
    """Over one SEAL ascent epoch (the real plan entry through the real trainer) the early partition moves
    up its full-batch gradient and its update alone raises the training loss (forgetting), while the
    later partition moves down its gradient. A control run whose "ascent" scale is +1 (plain descent)
    moves the early partition down and its update alone lowers the loss, so the sign is what makes
    the difference. The scale is -0.1 rather than the recipe's -0.01: one epoch at -0.01 on this tiny
    set raises the loss by ~0.1%, too close to rounding to assert; the direction checks hold at both."""
    entry, loss_before, loss_early_only, cos_early, cos_later = _ascent_epoch(tiny_data, tmp_path / "a", -0.1)
    assert entry.phase == "ascent" and entry.early.lr < 0 < entry.later.lr
    assert loss_early_only > loss_before, (loss_before, loss_early_only)
    assert cos_early > 0.1, cos_early
    assert cos_later < -0.1, cos_later
    _, control_before, control_early_only, control_early, control_later = _ascent_epoch(tiny_data, tmp_path / "b", 1.0)
    assert control_before == loss_before  # the same generation 0
    assert control_early_only < loss_before, (loss_before, control_early_only)
    assert control_early < -0.1 and control_later < -0.1, (control_early, control_later)


def test_momentum_reset_equals_a_new_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    names = [n for n, _ in model.named_parameters()]
    e = Entry(0, 0, 0, "descent", False, (), False,
              (Group("early", 0.1, 0.0, tuple(names[:1])), Group("later", 0.1, 0.0, tuple(names[1:]))))
    opt = make_optimizer(model, e, Config())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    twin = copy.deepcopy(model)
    fresh = make_optimizer(twin, e, Config())
    apply_entry(fresh, e)
    apply_entry(opt, dataclasses.replace(e, reset_momentum=True))
    x = torch.randn(3, 4)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["seal", "llf", "normal"])
def test_trainer_plan_is_the_dry_run_plan(tiny_data, tmp_path, method):
    cfg = Config(method=method, data=str(tiny_data), arch="resnet50", generations=2, epochs=3, ascent_epochs=1,
                 workers=0)
    tr = Trainer(cfg, tmp_path, say=lambda m: None)
    assert tr.plan == build_plan(cfg)


def test_criterion_equals_the_published_label_smoothing_loss():
    """The authors' LabelSmoothing: (1 - s) * NLL + s * mean over classes of -log p."""
    from seal_fast.train import make_criterion

    torch.manual_seed(0)
    logits, y = torch.randn(7, 200, dtype=torch.float64), torch.randint(0, 200, (7,))
    logp = torch.log_softmax(logits, -1)
    published = (0.9 * -logp.gather(1, y[:, None])[:, 0] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(make_criterion(Config())(logits, y), published, rtol=1e-12, atol=0)
