"""Shared helpers of the bench scripts: timing, the machine and versions, CSV rows."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# Where rows are appended: bench/results/, or $SEAL_FAST_BENCH_RESULTS (gpu_check.py --smoke and the tests use a
# scratch folder so that trial rows never land in the committed CSVs).
RESULTS = Path(os.environ.get("SEAL_FAST_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def environment() -> dict:
    """Device, versions, date and commit: every recorded number carries these."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing is recorded, not fatal
        triton_version = "none"
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip():
            commit += "+dirty"
    except Exception:  # noqa: BLE001 - e.g. the device machine's copy of the tree has no .git
        commit = "unknown"
    commit = os.environ.get("SEAL_FAST_COMMIT") or commit  # gpu_check: the hash the caller ran
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if cuda else f"cpu: {platform.processor() or platform.machine()}, "
                                                             f"{os.cpu_count()} cores",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }


def time_us(fn, warmup: int = 10, reps: int = 100) -> dict:
    """Median and 20/80% quantiles in microseconds. CUDA: triton.testing.do_bench (CUDA events, L2 flushed
    between runs); CPU: perf_counter around each call."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup, rep=reps, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return {"median_us": q[0] * 1e3, "p20_us": q[1] * 1e3, "p80_us": q[2] * 1e3}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()

    def q(f):
        return times[min(len(times) - 1, int(f * len(times)))]

    return {"median_us": q(0.5), "p20_us": q(0.2), "p80_us": q(0.8)}


def append_rows(name: str, rows: list[dict]) -> Path:
    """Append rows to bench/results/<name>.csv (header written once; new columns extend it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    fields = list(dict.fromkeys(k for r in rows for k in r))  # every column of every row, first-seen order
    old = []
    if path.exists():
        with open(path) as f:
            reader = csv.DictReader(f)
            old = list(reader)
            fields = list(reader.fieldnames or []) + [k for k in fields if k not in (reader.fieldnames or [])]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in old + rows:
            w.writerow(r)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    width = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(width[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(width[c]) for c in columns))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "" if v is None else str(v)
