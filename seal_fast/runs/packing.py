"""K runs packed on each GPU: the slots they run in (which GPU, how much of its memory) and NVIDIA's MPS daemon
that lets their kernels overlap instead of time-slicing.

Each run gets `CUDA_VISIBLE_DEVICES` (its GPU), `SEAL_FAST_CUDA_MEMORY_FRACTION` (about 0.95 / K: the trainer
caps its caching allocator with torch.cuda.set_per_process_memory_fraction) and, while MPS runs,
`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` (the same share in MB, enforced by MPS itself). MPS is started once for the
sweep with its pipe and log folders inside the sweep folder and stopped when the sweep ends or is killed; where
the binary is absent or refuses, the sweep says so in one line and the runs time-slice.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MPS_CONTROL = "nvidia-cuda-mps-control"
HEADROOM = 0.95  # of each GPU's memory shared by its K runs; the rest is the CUDA contexts' and MPS's own


def parse_gpus(text: str | None) -> list[str] | None:
    """`--gpus 0,1` as ["0", "1"]; None when not given."""
    if text is None:
        return None
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text!r}: give distinct GPU indices separated by commas, e.g. --gpus 0,1")
    return gpus


def memory_fraction(k: int) -> float:
    return round(HEADROOM / k, 4)


def gpu_memory_mb(gpu: str) -> int | None:
    """Total memory of GPU `gpu` in MB from nvidia-smi (None when nvidia-smi is absent or fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def slots(gpus: list[str], k: int, mps_on: bool) -> list[dict[str, str]]:
    """The environment of each of the K * len(gpus) run slots, GPU by GPU."""
    out = []
    for gpu in gpus:
        env = {"CUDA_VISIBLE_DEVICES": gpu, "SEAL_FAST_CUDA_MEMORY_FRACTION": str(memory_fraction(k))}
        total = gpu_memory_mb(gpu) if mps_on else None
        if total:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={int(total * HEADROOM / k)}M"  # device 0 of what it sees
        out.extend(dict(env) for _ in range(k))
    return out


@dataclass
class MPS:
    """NVIDIA's MPS control daemon for one sweep: `start()` returns whether it runs; `stop()` is safe to repeat."""
    folder: Path
    running: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> bool:
        if shutil.which(MPS_CONTROL) is None:
            print(f"MPS: {MPS_CONTROL} not found; the packed runs time-slice the GPU", flush=True)
            return False
        pipe, log = self.folder / "mps" / "pipe", self.folder / "mps" / "log"
        pipe.mkdir(parents=True, exist_ok=True)
        log.mkdir(parents=True, exist_ok=True)
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
        try:
            res = subprocess.run([MPS_CONTROL, "-d"], env=dict(os.environ, **self.env), capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            res = subprocess.CompletedProcess([MPS_CONTROL], 1, "", str(exc))
        if res.returncode != 0:
            why = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit {res.returncode}"]
            print(f"MPS: {MPS_CONTROL} -d refused ({why[0]}); the packed runs time-slice the GPU", flush=True)
            self.env = {}
            return False
        self.running = True
        print(f"MPS: control daemon started (pipe {pipe}, log {log}); stopped when the sweep ends", flush=True)
        return True

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            subprocess.run([MPS_CONTROL], input="quit\n", env=dict(os.environ, **self.env), capture_output=True,
                           text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"MPS: could not stop the daemon ({exc}); stop it with: echo quit | "
                  f"CUDA_MPS_PIPE_DIRECTORY={self.env['CUDA_MPS_PIPE_DIRECTORY']} {MPS_CONTROL}")


def open_slots(k: int, gpus: list[str], folder: Path) -> tuple[list[dict[str, str] | None], MPS | None]:
    """K slots on each of `gpus` with MPS started in `folder` (None: not started), or, with no GPU, K plain slots
    sharing the CPU. A local sweep and a packed Slurm job both train in these."""
    if not gpus:
        print(f"{k} runs per GPU: no GPU here; {k} runs share the CPU", flush=True)
        return [None] * k, None
    mps = MPS(folder)
    on = mps.start()
    return [dict(s, **mps.env) for s in slots(gpus, k, on)], mps


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (Slurm sets it for a job's GPUs)."""
    import torch

    n = torch.cuda.device_count()
    names = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return names[:n] if len(names) >= n else [str(i) for i in range(n)]


def launch(run, threads: int, slot: dict[str, str] | None = None, note: str = "") -> subprocess.Popen:
    """Start one sweep run's trainer (`python -m seal_fast.train ... --resume auto`), its output appended to its
    folder's train.log; `slot` is the environment of its packed slot (its GPU and memory share)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(slot or {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "seal_fast.train", *run.argv]
    log = open(run.folder / "train.log", "a")
    log.write(f"\n$ {' '.join(cmd)}{'  ' + note if note else ''}\n"
              + (f"# slot: {' '.join(f'{k}={v}' for k, v in slot.items())}\n" if slot else ""))
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # closed when the run ends
    return proc


def train_in_slots(todo: list, free: list[dict[str, str] | None], threads: int, start=launch) -> dict[str, int]:
    """Train the runs `todo`, one per free slot at a time (`start(run, threads, slot)` starts one): a run that ends
    frees its slot for the next, one that fails does not stop the others. Returns {run name: exit code} of the runs
    that failed."""
    running: list[tuple] = []
    failed: dict[str, int] = {}
    queue = list(todo)
    while queue or running:
        while queue and free:
            r, slot = queue.pop(0), free.pop(0)
            state, done, _ = r.state()
            print(f"start  {r.name} ({'resuming at epoch ' + str(done) if state == 'partial' else 'new'})", flush=True)
            running.append((r, start(r, threads, slot), time.time(), slot))
        time.sleep(0.2)
        for item in list(running):
            r, proc, t0, slot = item
            if proc.poll() is None:
                continue
            proc.log.close()
            running.remove(item)
            free.append(slot)
            if proc.returncode == 0:
                print(f"done   {r.name} in {(time.time() - t0) / 60:.1f} min", flush=True)
            else:
                failed[r.name] = proc.returncode
                print(f"FAILED {r.name} (exit {proc.returncode}); see {r.folder / 'train.log'}", flush=True)
    return failed


def pack_csv() -> Path:
    """bench/bench_pack.py's rows (or $SEAL_FAST_BENCH_RESULTS/pack.csv, as bench/utils.py writes them)."""
    root = Path(__file__).resolve().parents[2] / "bench" / "results"
    return Path(os.environ.get("SEAL_FAST_BENCH_RESULTS") or root) / "pack.csv"


def measured_packing(device: str | None, k: int, batch: int = 32) -> dict | None:
    """The best measured row of K packed runs at `batch` on `device` (MPS on or off, the last of each), with
    float 'aggregate' and 'gain' (None when K = 1 was not measured with it); None when there is none."""
    path = pack_csv()
    if device is None or not path.exists():
        return None
    last: dict[str, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("device") == device and r.get("k") == str(k) and r.get("batch") == str(batch):
                last[r.get("mps", "?")] = r
    if not last:
        return None
    best = max(last.values(), key=lambda r: float(r["aggregate_images_per_s"]))
    gain = best.get("gain_vs_k1") or ""
    return dict(best, aggregate=float(best["aggregate_images_per_s"]), gain=float(gain) if gain else None)
