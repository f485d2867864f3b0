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
    memory format are kept, so SignedSGD's table of tensor addresses and captured CUDA graphs stay valid.
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


# ---- probes: the ResNet forward pass stopped after any block (the KNN probes of depth.py and the studies) ----


def probe_names(model) -> list[str]:
    """The KNN probes of a torchvision ResNet, input to last block: input, stem, block.1.0 ... block.4.Y."""
    names = ["input", "stem"]
    for stage in range(1, 5):
        names += [f"block.{stage}.{b}" for b in range(len(getattr(model, f"layer{stage}")))]
    return names


def _embed(t: torch.Tensor, pooled: bool) -> torch.Tensor:
    return t.mean(dim=(2, 3)) if pooled else t.flatten(1)


@torch.no_grad()
def forward_probes(model, x: torch.Tensor, wanted: set[str], pooled: bool) -> dict[str, torch.Tensor]:
    """Embeddings [B, D] of the wanted probes (and "output": the logits, if wanted); the forward pass stops
    after the deepest one."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, t: torch.Tensor) -> bool:
        if name in wanted:
            out[name] = _embed(t, pooled)
        return len(out) == len(wanted)

    if keep("input", x):
        return out
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    if keep("stem", h):
        return out
    for stage in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{stage}")):
            h = block(h)
            if keep(f"block.{stage}.{b}", h):
                return out
    out["output"] = model.fc(torch.flatten(model.avgpool(h), 1))
    return out
