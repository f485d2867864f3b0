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
