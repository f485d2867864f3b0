"""Optimizer step on ResNet-50's 161 real parameter shapes (23.9M fp32 parameters), split as the recipe
splits them (72 early tensors ascending with wd 0, 89 later descending with wd 5e-4), momentum 0.9.

    python bench/bench_sgd.py [--reps 100] [--no-save]

Cases: SignedSGD (one fused Triton launch) vs torch.optim.SGD with foreach=False (the published code),
foreach=True and fused=True (torch._fused_sgd_, multi_tensor_apply), each with the same two groups; the
fp16 loss-scaling case (fp32 master weights, scaled gradients): SignedSGD.step(inv_scale) and GradScaler +
SignedSGD vs GradScaler.unscale_ + the fused torch step. On CUDA with the native backend built (`make cuda`, or
$SEAL_FAST_CUDA_LIB), the same cases with SignedSGD(backend="cuda") beside Triton.

Two timings on CUDA, so host and device time come apart:
  eager  one step() per timed call (triton.testing.do_bench: CUDA events, L2 flushed between calls): what
         a training loop without graphs pays, host launch overhead included when the host is the slower;
  graph  the same step() captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph): the
         device time alone, as the trainer's graphed step runs it.
`host_us` is the host side of one eager call alone (median of single calls, synchronized before each).

The primary figure is `frac_of_copy`: the time of a device-to-device copy that moves the same bytes
(20 per parameter: read param, grad, momentum; write param, momentum), measured in the same run (the
faster of its eager and graphed timings), divided by the case's time; `gbps` is those 20 bytes per
parameter over the case's time. Rows go to bench/results/sgd.csv (--no-save: print only).

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set here) for one correctness-checked step
only; its time is the interpreter's, not a performance figure, and the row says so. No graph rows there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.utils import append_rows, environment, print_table, time_us  # noqa: E402
from seal_fast.models import build_model, partitions  # noqa: E402
from seal_fast.optim import SignedSGD  # noqa: E402

BYTES_PER_PARAM = 20
EARLY_LR, LATER_LR, WD, MOMENTUM = -0.001, 0.1, 5e-4, 0.9
INTERPRETER_NOTE = "TRITON_INTERPRET=1 on the CPU: proves it runs; not a performance figure"


def setup(device):
    torch.manual_seed(0)
    model = build_model("resnet50", 200).to(device)
    names = dict(model.named_parameters())
    early, later = partitions(model, "layer3")
    params = [names[n] for n in early + later]
    g = torch.Generator(device=device).manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device)
    return params, len(early)


def groups(params, split):
    return [{"params": params[:split], "lr": EARLY_LR, "weight_decay": 0.0},
            {"params": params[split:], "lr": LATER_LR, "weight_decay": WD}]


def torch_sgd(params, split, **kw):
    opt = torch.optim.SGD([dict(g, lr=abs(g["lr"])) for g in groups(params, split)], lr=0.1, momentum=MOMENTUM, **kw)
    opt.param_groups[0]["lr"] = EARLY_LR  # torch.optim.SGD refuses a negative lr in its constructor only
    return opt


def max_diff_after_two_steps(params, split, backend, time_first=None) -> float:
    """Two steps (the second uses the momentum buffers) of SignedSGD vs torch.optim.SGD from the same state.
    time_first(fn), when given, runs (and times) SignedSGD's first step."""
    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for x, y, p in zip(a, b, params):
        x.grad, y.grad = p.grad.clone(), p.grad.clone()
    ours, ref = SignedSGD(groups(a, split), lr=0.1, momentum=MOMENTUM, backend=backend), torch_sgd(b, split)
    for i in range(2):
        if i == 0 and time_first is not None:
            time_first(ours.step)
        else:
            ours.step()
        ref.step()
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def graph_us(fn, rep_ms: int) -> dict:
    """fn captured (unrolled) in a CUDA graph and replayed: median and 20/80% quantiles, microseconds."""
    from triton.testing import do_bench_cudagraph

    q = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
    return {"median_us": q[0] * 1e3, "p20_us": q[1] * 1e3, "p80_us": q[2] * 1e3}


def host_us(fn, trials: int = 11) -> float:
    """Host time of one call alone (the device drained before each, so no queue back-pressure)."""
    times = []
    for _ in range(trials):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


class Recorder:
    """Times cases into rows (`rows`): eager, and on CUDA also graph-replayed (`both`)."""

    def __init__(self, env: dict, n: int, tensors: int, reps: int, cuda: bool):
        self.env, self.n, self.tensors, self.reps, self.cuda = env, n, tensors, reps, cuda
        self.rows = []

    def record(self, case, fn, mode="eager", note="", reps=None, warmup=None):
        """Time fn; returns the row, or None when this mode cannot run it here (the reason is printed)."""
        reps = self.reps if reps is None else reps
        warmup = (10 if self.cuda else 2) if warmup is None else warmup
        try:
            t = time_us(fn, warmup=warmup, reps=reps) if mode == "eager" else graph_us(fn, max(reps, 5))
        except Exception as exc:  # noqa: BLE001 - one case failing (e.g. not capturable) keeps the others
            print(f"{case} [{mode}]: not measured: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        row = dict(self.env, bench="sgd", case=case, mode=mode, params=self.n, tensors=self.tensors, **t,
                   gbps=BYTES_PER_PARAM * self.n / (t["median_us"] * 1e-6) / 1e9, note=note)
        if self.cuda and mode == "eager":
            row["host_us"] = host_us(fn)
        self.rows.append(row)
        return row

    def both(self, case, fn, note=""):
        """Eager, and on CUDA also graph-replayed: (eager row, graph row or None)."""
        eager = self.record(case, fn, note=note)
        graph = self.record(f"{case} (graph replay)", fn, mode="graph", note=note) if self.cuda else None
        return eager, graph


def copy_roofline_us(rec: Recorder, n: int, device) -> float:
    """The roofline: a device-to-device copy that moves 20 bytes per parameter (10 read + 10 written); the
    faster of its eager and graphed timings, microseconds."""
    src = torch.empty(n * 10 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copies = [r for r in rec.both("copy (20 B/param)", lambda: dst.copy_(src)) if r is not None]
    return min(r["median_us"] for r in copies)


def torch_cases(rec: Recorder, params, split, device):
    """torch.optim.SGD: the per-tensor loop, foreach, fused (when this device has it). Returns (loop row,
    foreach row, (fused eager, fused graph) rows, the fused optimizer or None)."""
    loop = rec.record("torch SGD foreach=False (published)", torch_sgd(params, split, foreach=False).step)
    foreach, _ = rec.both("torch SGD foreach=True", torch_sgd(params, split, foreach=True).step)
    fused_opt = None
    try:
        fused_opt = torch_sgd(params, split, fused=True)
        fused_opt.step()
    except (RuntimeError, ValueError) as exc:
        fused_opt = None
        print(f"torch SGD fused=True unavailable on {device.type}: {exc}")
    fused = rec.both("torch SGD fused=True (torch._fused_sgd_)", fused_opt.step) if fused_opt is not None \
        else (None, None)
    return loop, foreach, fused, fused_opt


def signed_cases(rec: Recorder, params, split, cuda: bool):
    """SignedSGD with the Triton kernel (on the CPU: the PyTorch reference timed, the interpreter's first of two
    checked steps once); the Triton row notes its max |diff| vs torch SGD. Returns (optimizer, its rows)."""
    if cuda:
        ours = SignedSGD(groups(params, split), lr=0.1, momentum=MOMENTUM, backend="triton")
        ours_rows = rec.both("SignedSGD triton", ours.step)
        diff = max_diff_after_two_steps(params, split, "triton")
    else:
        ours = SignedSGD(groups(params, split), lr=0.1, momentum=MOMENTUM, backend="torch")
        ours_rows = (rec.record("SignedSGD torch reference (CPU default)", ours.step), None)
        # the interpreter is slow: its timed row is the first of the two checked steps, on copies
        diff = max_diff_after_two_steps(params, split, "triton", time_first=lambda fn: rec.record(
            "SignedSGD triton (interpreter)", fn, reps=1, warmup=0, note=INTERPRETER_NOTE))
    checked = ours_rows[0] if cuda and ours_rows[0] else rec.rows[-1]  # the Triton row the comparison is about
    checked["note"] = (checked["note"] + "; " if checked["note"] else "") + \
        f"max |diff| vs torch SGD after 2 steps {diff:.2e}"
    return ours, ours_rows


def native_cases(rec: Recorder, params, split, inv) -> tuple:
    """The native CUDA C++ twin (kernels/cuda/, opt-in: `make cuda` or $SEAL_FAST_CUDA_LIB), on the same table:
    (eager row, graph row), (None, None) when the library is not built."""
    from seal_fast.kernels import cuda as native

    try:
        native.load()
    except native.NativeUnavailable as exc:
        print(f"SignedSGD cuda (native): not measured: {exc}")
        return None, None
    nat = SignedSGD(groups(params, split), lr=0.1, momentum=MOMENTUM, backend="cuda")
    native_rows = rec.both("SignedSGD cuda (native)", nat.step)
    ndiff = max_diff_after_two_steps(params, split, "cuda")
    if native_rows[0]:
        native_rows[0]["note"] = f"max |diff| vs torch SGD after 2 steps {ndiff:.2e}"
    rec.both("fp16 scaling: SignedSGD cuda (native).step(inv_scale)", lambda: nat.step(inv_scale=inv))
    return native_rows


def scaling_cases(rec: Recorder, ours, fused_opt, params, split, device, inv):
    """The fp16 loss-scaling case: SignedSGD.step(inv_scale), GradScaler.unscale_ + the fused (else foreach)
    torch step, GradScaler + SignedSGD. Returns (SignedSGD's eager row, torch's row, "fused" / "foreach")."""
    scaled_ours, _ = rec.both("fp16 scaling: SignedSGD.step(inv_scale) (check + fused update)",
                              lambda: ours.step(inv_scale=inv))
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=10**9)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as scaling a loss would
    ref_opt = fused_opt if fused_opt is not None else torch_sgd(params, split, foreach=True)

    def unscale_then_step():
        scaler.unscale_(ref_opt)
        scaler.step(ref_opt)
        scaler.update()

    ref_name = "fused" if fused_opt is not None else "foreach"
    scaled_ref = rec.record(f"fp16 scaling: GradScaler.unscale_ + torch SGD {ref_name}", unscale_then_step)
    scaler2 = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=10**9)
    scaler2.scale(torch.ones((), device=device))

    def scaler_with_ours():
        scaler2.step(ours)
        scaler2.update()

    rec.record("fp16 scaling: GradScaler + SignedSGD (scaler's check, fused unscale/update)", scaler_with_ours)
    return scaled_ours, scaled_ref, ref_name


def _frac(r) -> str:
    return f"{r['frac_of_copy']:.2f}" if r else "n/a"


def _ratio(a, b) -> str:
    return f"{a['median_us'] / b['median_us']:.2f}x" if a and b else "n/a"


def print_summary(ours_rows, base, loop, scaled, ref_name, native_rows, cuda: bool) -> None:
    """The summary lines under the table: SignedSGD against the copy and torch (base: torch's (eager, graph)
    rows; scaled: (torch's, SignedSGD's) fp16-case rows), the native twin against Triton, the targets."""
    eager, graph = ours_rows
    base_eager, base_graph = base
    scaled_ref, scaled_ours = scaled
    print(f"SignedSGD of copy: eager {_frac(eager)}, graph {_frac(graph)}; vs torch SGD {ref_name}: eager "
          f"{_ratio(base_eager, eager)}, graph {_ratio(base_graph, graph)}; vs the per-tensor loop "
          f"{_ratio(loop, eager)}; fp16 case {_ratio(scaled_ref, scaled_ours)}"
          + (f"; host per eager step {eager['host_us']:.0f} us" if eager and "host_us" in eager else ""))
    if native_rows[0]:
        n_eager, n_graph = native_rows
        print(f"native cuda of copy: eager {_frac(n_eager)}, graph {_frac(n_graph)}; triton / native: eager "
              f"{_ratio(eager, n_eager)}, graph {_ratio(graph, n_graph)} (> 1: native faster; backend='auto' "
              "follows the graph-replay figure)")
    if cuda:
        print("targets (H100): >= 0.90 of copy, >= 1.1x fused, >= 1.3x in the fp16 case, >= 10x the loop")
    else:
        print("no CUDA: the targets (H100) are not evaluated here; the GPU figures remain to be measured")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100, help="timed repetitions per case (CUDA: milliseconds budget)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results/sgd.csv")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    env = environment()
    params, split = setup(device)
    # fp16 loss scaling: fp32 master weights, scaled gradients; scale 1.0 keeps values stable across reps
    inv = torch.ones((), device=device)
    n = sum(p.numel() for p in params)
    print(f"{env['device']} | torch {env['torch']} triton {env['triton']} | {len(params)} tensors "
          f"({split} early / {len(params) - split} later), {n:,} parameters, fp32")

    rec = Recorder(env, n, len(params), args.reps, cuda)
    copy_us = copy_roofline_us(rec, n, device)
    loop, foreach, fused, fused_opt = torch_cases(rec, params, split, device)
    ours, ours_rows = signed_cases(rec, params, split, cuda)
    native_rows = native_cases(rec, params, split, inv) if cuda else (None, None)
    scaled_ours, scaled_ref, ref_name = scaling_cases(rec, ours, fused_opt, params, split, device, inv)

    rows = rec.rows
    for r in rows:
        r["frac_of_copy"] = copy_us / r["median_us"]
    print_table(rows, ["case", "mode", "frac_of_copy", "median_us", "p20_us", "p80_us", "host_us", "gbps", "note"])
    print()
    print_summary(ours_rows, fused if fused[0] else (foreach, None), loop, (scaled_ref, scaled_ours), ref_name,
                  native_rows, cuda)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('sgd', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
