"""ResNet as the recipe builds it: torchvision's model, unchanged ImageNet stem, the authors' init.

Init (amiiir-sarfi/SEAL models/resnet.py): every conv weight and fc.weight kaiming_normal_(fan_in, relu);
BN weight 1, bias 0; fc.bias PyTorch's default; no zero-init of residual BN.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .schedule import llf_reinit_names, param_names, split_partitions

_BLOCKS = {
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
}


def build_model(arch: str = "resnet50", num_classes: int = 200) -> nn.Module:
    """The recipe's ResNet (torchvision parameter names) with the recipe's init. Seed torch first."""
    block, layers = _BLOCKS[arch]
    model = ResNet(block, layers, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    nn.init.kaiming_normal_(model.fc.weight, mode="fan_in", nonlinearity="relu")
    names = [n for n, _ in model.named_parameters()]
    assert names == param_names(arch), "torchvision's ResNet parameter names changed; update schedule.param_names"
    return model


def partitions(model: nn.Module, threshold: str) -> tuple[list[str], list[str]]:
    """(early names, later names) of the model's parameters, split at the threshold layer."""
    return split_partitions([n for n, _ in model.named_parameters()], threshold)


@torch.no_grad()
def reinit_in_place(model: nn.Module, names: list[str], generator: torch.Generator) -> None:
    """LLF forgetting: re-initialize the named weights with PyTorch's default conv/linear init
    (kaiming_uniform_(a=sqrt(5))), writing into the existing tensors: storage, device, dtype and
    memory format are kept, so optimizers holding flat views and captured graphs stay valid.
    Values are drawn on the CPU from `generator` in logical (contiguous) order, so they do not
    depend on the device or memory format."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"cannot re-initialize unknown parameters: {missing}")
    for n in names:
        p = params[n]
        fresh = torch.empty(p.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        p.copy_(fresh)


def llf_names(model: nn.Module, threshold: str) -> list[str]:
    """The tensors LLF re-initializes for this model and threshold."""
    return llf_reinit_names(partitions(model, threshold)[1])
