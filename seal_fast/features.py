"""What every study of a trained network shares (depth, transfer, few-shot, Hessian, PoF): load a
seal_fast checkpoint into its model, frozen, on a device.

A study never imports the trainer: it reads checkpoints through checkpoint.read (the RunState schema)
and rebuilds the model from the checkpoint's own config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .models import build_model


def load_model(path: str, device: torch.device, channels_last: bool = False):
    """(model in eval mode on `device`, the run's config dict, a label "method @ epoch N (run/file)")."""
    ckpt = checkpoint.read(path)
    cfg = ckpt.config
    model = build_model(cfg.get("arch", "resnet50"), num_classes=ckpt.model["fc.weight"].shape[0])
    model.load_state_dict(ckpt.model)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    label = f"{cfg.get('method', '?')} @ epoch {ckpt.next_epoch} ({Path(path).parent.name}/{Path(path).name})"
    return model, cfg, label
