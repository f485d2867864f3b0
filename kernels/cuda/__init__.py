"""The optional native CUDA backend: finds, loads and reports on the library CMakeLists.txt builds.

    make cuda        # builds kernels/cuda/lib/libseal_fast_cuda.so (see CMakeLists.txt)

`load()` registers the operators `torch.ops.seal_fast.fused_sgd_update` / `fused_sgd_nonfinite` (sources
here: fused_sgd.cu, the kernels; ops.cpp, the operator registration) and raises `NativeUnavailable` with one
line that says what is missing and how to fix it. The package never needs the library: nothing imports this
module unless the native backend is asked for. Where it looks: $SEAL_FAST_CUDA_LIB (a file) if set, else
kernels/cuda/lib/.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY = "libseal_fast_cuda.so"
DEFAULT_DIR = Path(__file__).resolve().parent / "lib"
BUILD_HINT = "build it with `make cuda` (CMake + nvcc, see README 'Native CUDA backend')"

_loaded: Path | None = None


class NativeUnavailable(RuntimeError):
    """The native backend cannot be used here; the message says why and what to do."""


def library_path() -> Path:
    """Where the library is looked for: $SEAL_FAST_CUDA_LIB, else kernels/cuda/lib/libseal_fast_cuda.so."""
    env = os.environ.get("SEAL_FAST_CUDA_LIB")
    return Path(env).expanduser() if env else DEFAULT_DIR / LIBRARY


def load() -> Path:
    """Load the operator library once (idempotent); the path it came from."""
    global _loaded
    if _loaded is not None:
        return _loaded
    import torch

    path = library_path()
    if not path.is_file():
        where = "$SEAL_FAST_CUDA_LIB" if os.environ.get("SEAL_FAST_CUDA_LIB") else "kernels/cuda/lib/"
        raise NativeUnavailable(f"the native CUDA backend is not built ({path} not found via {where}); {BUILD_HINT}")
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:  # built against another torch, or a CUDA runtime this machine lacks
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NativeUnavailable(f"the native CUDA backend at {path} does not load with torch {torch.__version__} "
                                f"({first}); rebuild it: `make cuda`") from None
    _loaded = path
    return path


def build(out: Path, architectures: str = "90;80", jobs: int | None = None, timeout: float = 900) -> Path:
    """What `make cuda` does, into `out` (out/build, out/lib): configure CMakeLists.txt against this torch and
    build; returns the library's path. Raises RuntimeError with the tail of CMake's output on failure."""
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[2]
    out = Path(out)
    lib_dir = out / "lib"
    steps = [["cmake", "-S", str(root), "-B", str(out / "build"), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
              f"-DSEAL_FAST_CUDA_ARCHITECTURES={architectures}", f"-DSEAL_FAST_CUDA_OUTPUT_DIR={lib_dir}"],
             ["cmake", "--build", str(out / "build"), "-j", str(jobs or os.cpu_count() or 2)]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
    lib = lib_dir / LIBRARY
    if not lib.is_file():
        raise RuntimeError(f"the CMake build finished but did not produce {lib}")
    return lib


def available() -> bool:
    """The library loads here (a GPU is a separate question: torch.cuda.is_available())."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def require(device) -> None:
    """Raise NativeUnavailable unless the library loads and `device` is a CUDA device that torch can use."""
    import torch

    load()
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise NativeUnavailable(f"the native CUDA backend runs on a CUDA device only, and the parameters are on "
                                f"{device}{'' if torch.cuda.is_available() else ' (this machine has no usable GPU)'}; "
                                "use backend 'triton' or 'torch' (--sgd-backend auto)")
