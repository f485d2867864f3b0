"""The recipe's ResNet-50: names, size, init, partitions, LLF re-initialization in place."""

import math

import pytest
import torch

from seal_fast.models import build_model, llf_names, partitions, reinit_in_place
from seal_fast.schedule import param_names


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_model("resnet50", num_classes=200)


def test_resnet50_matches_the_recipe(resnet50):
    names = [n for n, _ in resnet50.named_parameters()]
    assert len(names) == 161 and names == param_names("resnet50")
    assert sum(p.numel() for p in resnet50.parameters()) == 23_917_832
    # unchanged ImageNet stem: 7x7 stride 2 pad 3, and the 3x3 stride-2 max-pool is kept
    assert resnet50.conv1.kernel_size == (7, 7) and resnet50.conv1.stride == (2, 2) and resnet50.conv1.padding == (3, 3)
    assert isinstance(resnet50.maxpool, torch.nn.MaxPool2d) and resnet50.maxpool.stride == 2
    assert resnet50(torch.zeros(2, 3, 64, 64)).shape == (2, 200)
    early, later = partitions(resnet50, "layer3")
    assert (len(early), len(later)) == (72, 89)


@pytest.mark.parametrize("arch", ["resnet18", "resnet10"])
def test_small_archs_have_torch_free_names(arch):
    assert [n for n, _ in build_model(arch, 10).named_parameters()] == param_names(arch)


def test_recipe_init(resnet50):
    sd = dict(resnet50.named_parameters())
    for name, p in sd.items():
        if ".bn" in name or name.startswith("bn1") or "downsample.1" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name  # BN weight 1, bias 0, no zero-init of the last BN
    # kaiming_normal_(fan_in, relu): std = sqrt(2 / fan_in) (mode fan_in, not torchvision's fan_out)
    for name in ("layer4.0.conv2.weight", "layer3.0.conv3.weight", "fc.weight"):
        w = sd[name]
        fan_in = w[0].numel()
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05), name
    assert sd["fc.bias"].abs().max() <= 1 / math.sqrt(2048)  # PyTorch's default Linear bias


@pytest.mark.parametrize("channels_last", [False, True])
def test_llf_reinit_touches_exactly_its_tensors_in_place(channels_last):
    torch.manual_seed(0)
    model = build_model("resnet50", 200)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    names = llf_names(model, "layer3")
    assert len(names) == 30
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    reinit_in_place(model, names, torch.Generator().manual_seed(1))
    for n, p in model.named_parameters():
        ptr, old = before[n]
        assert p.data_ptr() == ptr, f"{n} lost its storage"
        if n in names:
            assert not torch.equal(p, old), n
            bound = 1 / math.sqrt(p[0].numel())  # kaiming_uniform_(a=sqrt(5)) bound
            assert p.abs().max() <= bound + 1e-7 and p.abs().max() > 0.9 * bound, n
        else:
            assert torch.equal(p, old), f"{n} changed but LLF must keep it"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"BN statistic {n} changed"
    if channels_last:
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert model.layer4[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_llf_reinit_values_do_not_depend_on_memory_format():
    a = build_model("resnet10", 10)
    b = build_model("resnet10", 10).to(memory_format=torch.channels_last)
    names = llf_names(a, "layer3")
    reinit_in_place(a, names, torch.Generator().manual_seed(3))
    reinit_in_place(b, names, torch.Generator().manual_seed(3))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in names:
        assert torch.equal(pa[n], pb[n])
