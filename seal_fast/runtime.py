"""Run helpers every command shares (train, depth, and the studies to come): the device, the number of
loader workers, the output folder and the memory there is to use."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError


def pick_device(requested: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """--device auto|cpu|cuda -> the device; cuda:<local rank> under torchrun with several processes."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    cuda = requested in ("auto", "cuda") and torch.cuda.is_available()
    return torch.device(f"cuda:{local_rank}" if cuda and world > 1 else "cuda" if cuda else "cpu")


def default_workers(requested: int) -> int:
    """--workers N, or (N < 0) one fewer than the CPU cores, at most 8."""
    return requested if requested >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))


def make_out_folder(out: str | os.PathLike) -> Path:
    """Create --out and prove it writable now, before any work is done."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                          "write to") from None
    return out


def free_memory(device: torch.device) -> int:
    """Bytes free now: on the GPU for a CUDA device, else the available RAM (8 GB when the OS will not say)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return int(8e9)
