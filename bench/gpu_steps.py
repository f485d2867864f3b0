"""The steps of bench/gpu_check.py that are no bench of their own, each a command run in its own process:

    python bench/gpu_steps.py env                  # one JSON line: GPU, driver, clocks, versions, date, commit
    python bench/gpu_steps.py native DIR           # build the native CUDA backend (sm_90) into DIR
    python bench/gpu_steps.py sanitize             # compute-sanitizer memcheck / racecheck / synccheck on the kernels
    python bench/gpu_steps.py data CLASSES PER_CLASS VAL   # the generated 64 px set; prints "data: FOLDER"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def environment_report() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version()), "cpu_cores": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"missing ({exc})"
    try:
        from seal_fast.data.dali_loader import dali_available
        info["dali"] = "yes" if dali_available() else "no"
    except Exception as exc:  # noqa: BLE001
        info["dali"] = f"error ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(total / 1e9, 1), free_gb=round(free / 1e9, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
            r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=20)
            info["nvidia_smi"] = (r.stdout or r.stderr).strip()
    else:
        info["gpu"] = "none (CPU only)"
    from bench.utils import environment

    e = environment()
    return dict(info, date=e["date"], commit=e["commit"])


SANITIZED = """import os, torch
from seal_fast.optim import SignedSGD
from seal_fast.kernels.knn import knn_topk
ps = [torch.nn.Parameter(torch.randn(s, device='cuda')) for s in [(7,), (4099,), (13, 17), (31, 3, 3, 3)]]
for p in ps: p.grad = torch.randn_like(p)
o = SignedSGD([{'params': ps[:1], 'lr': -0.001, 'weight_decay': 0.0}, {'params': ps[1:], 'lr': 0.1,
              'weight_decay': 5e-4}], lr=0.1, momentum=0.9, nesterov=True, backend=os.environ['BE'])
o.step(); o.reset_momentum(); o.step()
for dt in (torch.float32, torch.bfloat16):
    q, x = torch.randn(100, 45, device='cuda', dtype=dt), torch.randn(1000, 45, device='cuda', dtype=dt)
    knn_topk(q, x, 30); knn_topk(q, x, 70)
torch.cuda.synchronize(); print(os.environ['BE'], 'ran')
"""


def sanitizer_exe() -> str | None:
    return shutil.which("compute-sanitizer") or next(
        (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer")) if p.exists()), None)


def sanitize() -> int:
    """compute-sanitizer's memcheck, racecheck, synccheck on the kernels (the fused SGD, Triton then the native
    build of the native step, and the KNN), most valuable first: each result is printed as it comes."""
    bad = 0
    backends = ["triton"] + (["cuda"] if Path(os.environ.get("SEAL_FAST_CUDA_LIB", "/nonexistent")).exists() else [])
    for tool in ("memcheck", "racecheck", "synccheck"):
        for be in backends:
            r = subprocess.run([sanitizer_exe(), "--tool", tool, "--error-exitcode", "9", sys.executable, "-c",
                                SANITIZED], env=dict(os.environ, BE=be), capture_output=True, text=True)
            tail = [ln for ln in (r.stdout + r.stderr).splitlines() if "SUMMARY" in ln or "rror" in ln][-3:]
            print(f"{tool} {be}: exit {r.returncode}: {' | '.join(tail) or 'no summary line'}", flush=True)
            bad += r.returncode != 0
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what == "env":
        print(json.dumps(environment_report()))
    elif what == "native" and len(rest) == 1:
        from seal_fast.kernels import cuda

        t = time.perf_counter()
        print(f"built {cuda.build(Path(rest[0]), architectures='90')} in {time.perf_counter() - t:.1f} s")
    elif what == "sanitize":
        return sanitize()
    elif what == "data" and len(rest) == 3:
        from seal_fast.data.synthetic import ensure_synthetic

        classes, per_class, val = map(int, rest)
        folder = ensure_synthetic(num_classes=classes, train_per_class=per_class, val_per_class=val, size=64)[0]
        print(f"data: {folder}")
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
