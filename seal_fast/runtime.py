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


MEMORY_FRACTION_VAR = "SEAL_FAST_CUDA_MEMORY_FRACTION"


def memory_fraction(environ=None) -> float | None:
    """SEAL_FAST_CUDA_MEMORY_FRACTION (runs packed on one GPU): None when unset or empty, else a number in (0, 1];
    anything else is a ConfigError naming the variable."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MEMORY_FRACTION_VAR, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # nan fails too
        raise ConfigError(f"{MEMORY_FRACTION_VAR}={raw!r}: must be a number in (0, 1], the share of the GPU's memory "
                          "this run may use; set it so, or unset it")
    return value


def apply_memory_fraction(device: torch.device) -> float | None:
    """Cap this process's share of a CUDA device's memory when SEAL_FAST_CUDA_MEMORY_FRACTION is set (no-op on
    a CPU). Returns the fraction applied."""
    value = memory_fraction()
    if value is None or device.type != "cuda":
        return None
    torch.cuda.set_per_process_memory_fraction(value, device)
    return value


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


def provenance(argv: list[str] | None) -> dict:
    """Where a run came from: its command line, the versions, the GPUs and the git commit of a checkout."""
    import platform
    import subprocess
    import sys

    info = {"command": [sys.executable, "-m", "seal_fast.train", *(argv if argv is not None else sys.argv[1:])],
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "host_cpus": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except Exception:  # noqa: BLE001 - missing or broken DALI: recorded as absent
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        info["driver"] = driver() if driver else None
    else:
        info["gpus"] = []
    repo = Path(__file__).resolve().parent.parent
    info["git_commit"] = None
    if (repo / ".git").exists():
        try:
            r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            info["git_commit"] = r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def lock_folder(out: Path):
    """Hold an exclusive lock on out/.lock for the life of the process (released when it exits, even on SIGKILL):
    two trainers never write into one folder."""
    import fcntl

    f = open(Path(out) / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(f"--out {out}: another process is training in this folder right now; wait for it, or "
                          "choose another --out") from None
    return f
