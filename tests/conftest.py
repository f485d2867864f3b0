"""Test setup: the Triton interpreter on machines without CUDA, a private data cache, shared fixtures."""

import os
import shutil
import sys
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when it is imported: decide before anything imports it.
assert "triton" not in sys.modules, "conftest must run before triton is imported"
import torch  # noqa: E402  (torch does not import triton on import)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Synthetic datasets made by the code under test go to a private cache, not the user's.
    cache = Path(config.rootpath) / ".pytest_cache" / "seal_fast_data"
    os.environ["SEAL_FAST_CACHE"] = str(cache)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small learnable dataset in the real Tiny-ImageNet layout: 4 classes, 32x32 images."""
    from seal_fast.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("data") / "tiny-imagenet-200", num_classes=4,
                           train_per_class=24, val_per_class=6, size=32, seed=0)


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of tiny_data that a test may break."""
    dst = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def cli():
    """cli(*args) runs `python -m seal_fast.train ARGS` in a subprocess; returns a CompletedProcess (text)."""
    import subprocess

    def run(*args, timeout=600):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, "-m", "seal_fast.train", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)

    return run


def run_killing(command, checkpoint: Path, attempts: int, max_pause_s: float, seed) -> int:
    """Run `command(attempt)` (a subprocess argv) again and again, SIGKILLing each run at a random moment after
    it writes `checkpoint` (the first kill right after a save), until one run finishes; returns the kills.
    Asserts the finishing run exits 0 and at least one kill happened (else the test proved nothing)."""
    import random
    import signal
    import subprocess
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng, kills = random.Random(seed), 0
    for attempt in range(attempts):
        proc = subprocess.Popen(command(attempt), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        seen = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # until this run has written a checkpoint
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != seen:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, max_pause_s) if attempt else 0.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        _, err = proc.communicate()
        assert proc.returncode == 0, err
        break
    assert kills >= 1, "the run finished before it could be killed; the test proved nothing"
    return kills
