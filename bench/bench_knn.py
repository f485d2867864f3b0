"""k-nearest neighbours, the KNN probe's search: fused kernel vs the torch ways of writing it.

    python bench/bench_knn.py [--q 10000 --n 100000 --d 256 2048 16384 --k 30 --dtypes fp32 bf16 --reps 10]

Cases, each on the same random queries [Q, D] and support [N, D]:
  fused         kernels.knn.knn_topk (distance on tensor cores + top-k per tile; never Q x N)
  fused:dist    kernels.knn.knn_distance_pass: the same kernel launch (tiles, D-loop, distance epilogue)
                with the top-k selection replaced by a row minimum: the distance part alone (CUDA only;
                --no-split skips it). The fused row then also shows selection_share = 1 - dist / fused.
  cdist+topk    torch.cdist then torch.topk, queries in chunks whose Q x N matrix fits --chunk-gb
  mm+topk       |q|^2 - 2 q.x^T + |x|^2 with torch.mm then torch.topk, same chunks
  faiss         faiss.knn_gpu (brute force) when faiss is installed
Reported: median ms (CUDA events via triton.testing.do_bench), achieved TFLOP/s of the distance part
(2 Q N D flops), that as a share of the device's dense peak for the input dtype (the roofline: bf16
tensor cores, TF32 for fp32 if enabled, else fp32 FMA), and the peak extra memory of one call; for the
fused cases, the kernel configuration that ran (BLOCK_Q x BLOCK_N x BLOCK_D, warps, stages): the
autotuner's winner for the shape's key (its first call, the warm-up, times the candidates), or with
--no-autotune the table's default. Rows go to bench/results/knn.csv.

Without CUDA the Triton kernel would run in the interpreter, which times numpy, not the kernel: the
fused case is then skipped and only the torch baselines are timed, at reduced default sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.utils import append_rows, environment, print_table, time_us  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense peak TFLOP/s (no sparsity) from the vendors' data sheets: bf16/fp16 tensor cores, tf32, fp32 FMA
PEAKS = {"H100 80GB HBM3": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
         "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
         "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
         "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}}


def peak(device_name: str, dtype: str) -> float | None:
    from seal_fast.kernels.knn import _tf32_allowed  # the new torch API too (reading allow_tf32 can raise)

    key = "tf32" if dtype == "fp32" and _tf32_allowed() else dtype
    for name, peaks in PEAKS.items():
        if name in device_name:
            return peaks[key]
    return None


def chunked(queries, support, k, chunk, how):
    dists, idxs = [], []
    xn = (support.float() ** 2).sum(1) if how == "mm" else None
    for lo in range(0, queries.shape[0], chunk):
        q = queries[lo:lo + chunk]
        if how == "cdist":
            d = torch.cdist(q, support)
        else:
            d = (q.float() ** 2).sum(1, keepdim=True) - 2 * (q @ support.T).float() + xn[None, :]
        v, i = torch.topk(d, k, dim=1, largest=False)
        dists.append(v)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def extra_memory(fn) -> float:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak_bytes = torch.cuda.max_memory_allocated() - base
    del out
    return peak_bytes


def parse_args(cuda: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q", type=int, default=10_000 if cuda else 500)
    p.add_argument("--n", type=int, default=100_000 if cuda else 5_000)
    p.add_argument("--d", type=int, nargs="+", default=[256, 2048, 16384] if cuda else [256, 2048])
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--chunk-gb", type=float, default=2.0, help="memory for one chunk's Q x N distances (baselines)")
    p.add_argument("--reps", type=int, default=10, help="timed calls (CPU) / ms of timing (CUDA: x100)")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="do not time the distances-only kernel (fused:dist) beside the fused one")
    p.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="run the KNN table's default configurations (as SEAL_FAST_KNN_AUTOTUNE=0 does)")
    return p.parse_args()


def faiss_usable(cuda: bool) -> bool:
    """faiss (with its torch bridge) importable, and a GPU to run faiss.knn_gpu on."""
    try:
        import faiss  # noqa: F401
        import faiss.contrib.torch_utils  # noqa: F401
        return cuda
    except ImportError:
        return False


def config_used(queries, support, k: int) -> str:
    """The configuration the fused kernel ran with (after its first call): BLOCK_Q x BLOCK_N x BLOCK_D, warps,
    stages, and whether the autotuner chose it."""
    import seal_fast.kernels.knn as knn

    dtype = queries.dtype
    arch, precision = knn.arch_of(queries.device), knn._precision(dtype)
    aligned = knn._aligned(queries) and knn._aligned(support)
    c = knn.pick_config(arch, dtype, precision, k, queries.shape[1], aligned)
    tuned = knn._tune_key(arch, dtype, precision, knn.list_slots(k), queries.shape[1], aligned) in knn._WINNERS
    return f"{c.block_q}x{c.block_n}x{c.block_d} w{c.num_warps} s{c.num_stages} {'tuned' if tuned else 'default'}"


def make_cases(queries, support, args, name: str, chunk: int, cuda: bool, faiss_ok: bool) -> dict:
    """Case name -> a call returning (dist, index) (fused:dist: the nearest distances only), fused cases first."""
    from seal_fast.kernels.knn import knn_distance_pass, knn_topk

    cases = {"cdist+topk": lambda: chunked(queries, support, args.k, chunk, "cdist"),
             "mm+topk": lambda: chunked(queries, support, args.k, chunk, "mm")}
    if cuda:
        fused = {"fused": lambda: knn_topk(queries, support, args.k)}
        if args.split:
            fused["fused:dist"] = lambda: knn_distance_pass(queries, support, args.k)
        cases = {**fused, **cases}
    if faiss_ok:
        import faiss

        res = faiss.StandardGpuResources()
        cases["faiss"] = lambda: faiss.knn_gpu(res, queries.float(), support.float(), args.k)
    if name != "fp32" and not cuda:
        cases.pop("cdist+topk")  # cdist has no bf16/fp16 CPU kernel
    return cases


def run_cases(cases: dict, queries, support, args, env: dict, d: int, name: str, chunk: int, cuda: bool) -> list:
    """One row per case: its time, TFLOP/s and share of peak, extra memory, agreement with the first case."""
    rows = []
    reference = ref_near = None
    for case, fn in cases.items():
        try:
            out = fn()
            dist, idx = (out, None) if case == "fused:dist" else out[:2]
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            rows.append(dict(env, bench="knn", case=case, q=args.q, n=args.n, d=d, k=args.k, dtype=name,
                             note=f"failed: {str(exc).splitlines()[0][:120]}"))
            continue
        agree = ""
        if idx is None:  # distances only: its minimum must be the fused case's nearest distance
            agree = float(torch.isclose(dist, ref_near, rtol=1e-3, atol=1e-3).float().mean()) \
                if ref_near is not None else ""
        elif reference is None:
            reference, ref_near = idx, dist[:, 0]
        else:  # share of neighbours found by both this case and the first case (near-ties may differ)
            agree = float((reference[:, :, None] == idx[:, None, :]).any(2).float().mean())
        t = time_us(fn, warmup=2 if not cuda else 5, reps=args.reps if not cuda else 100 * args.reps)
        config = config_used(queries, support, args.k) if case.startswith("fused") else ""
        flops = 2.0 * args.q * args.n * d
        tflops = flops / (t["median_us"] * 1e-6) / 1e12
        pk = peak(env["device"], name)
        rows.append(dict(env, bench="knn", case=case, q=args.q, n=args.n, d=d, k=args.k, dtype=name,
                         median_ms=t["median_us"] / 1e3, p20_ms=t["p20_us"] / 1e3, p80_ms=t["p80_us"] / 1e3,
                         tflops=tflops, peak_tflops=pk, frac_of_peak=tflops / pk if pk else "",
                         extra_mem_gb=extra_memory(fn) / 1e9, chunk=chunk if case != "fused" else "",
                         agree_with_first=agree, config=config,
                         note="" if cuda else "CPU: baselines only"))
    return rows


def add_fused_shares(rows: list) -> None:
    """On the fused row of one (D, dtype): speedup_vs_best_torch and (with fused:dist) selection_share."""
    by_case = {r["case"]: r for r in rows if "median_ms" in r}
    if "fused" in by_case:
        best = min((r["median_ms"] for c, r in by_case.items() if c in ("cdist+topk", "mm+topk")), default=None)
        if best:
            by_case["fused"]["speedup_vs_best_torch"] = best / by_case["fused"]["median_ms"]
        if "fused:dist" in by_case:  # the share of the fused call that the top-k selection costs
            by_case["fused"]["selection_share"] = 1 - by_case["fused:dist"]["median_ms"] / \
                by_case["fused"]["median_ms"]


def bench_shape(args, env: dict, d: int, name: str, cuda: bool, faiss_ok: bool) -> list:
    """Every case on one (D, dtype): random queries [Q, D] and support [N, D], the same for all cases."""
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    support = torch.randn(args.n, d, generator=g, device=device).to(dtype)
    queries = torch.randn(args.q, d, generator=g, device=device).to(dtype)
    chunk = max(1, int(args.chunk_gb * 1e9 // (args.n * 4)))
    cases = make_cases(queries, support, args, name, chunk, cuda, faiss_ok)
    rows = run_cases(cases, queries, support, args, env, d, name, chunk, cuda)
    add_fused_shares(rows)
    return rows  # the inputs (and the cases holding them) are freed on return, before the next size


def main() -> None:
    cuda = torch.cuda.is_available()
    args = parse_args(cuda)
    env = environment()
    faiss_ok = faiss_usable(cuda)
    import seal_fast.kernels.knn as knn

    knn.AUTOTUNE = args.autotune
    rows = []
    for d in args.d:
        for name in args.dtypes:
            rows += bench_shape(args, env, d, name, cuda, faiss_ok)
    print_table(rows, ["case", "d", "dtype", "median_ms", "tflops", "peak_tflops", "frac_of_peak", "extra_mem_gb",
                       "speedup_vs_best_torch", "selection_share", "agree_with_first", "config", "note"])
    path = append_rows("knn", rows)
    print(f"appended {len(rows)} rows to {path} ({env['device']}, torch {env['torch']}, triton {env['triton']})")


if __name__ == "__main__":
    main()
