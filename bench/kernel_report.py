"""Every Triton kernel configuration compiled for its GPU architecture on this machine (no GPU needed), and
every instantiation of the native CUDA kernels (kernels/cuda/, by nvcc; module "kernels.cuda"), and what the
compiler made of it: registers, spills, shared memory, global access widths, tensor-core instructions,
the occupancy the registers allow.

    python bench/kernel_report.py [--arch 90|80] [--modules kernels.fused_sgd kernels.knn_kernel] [--quick]
                                  [--csv bench/results/kernels.csv] [--no-csv] [--path DIR] [--jobs N]

Each module of kernels/ that holds a @triton.jit kernel exposes `compile_specs() -> list[KernelSpec]`
(kernels/compile_spec.py): every configuration its launcher can pick. Each is compiled with
`triton.compile` for GPUTarget("cuda", arch, 32) with a fresh, private Triton cache (a cached kernel would
skip ptxas and so its log). arch: the spec's own (KernelSpec.arch: a launcher whose table depends on the
GPU, e.g. the KNN's sm_90 and sm_80 tables), sm_90 for a spec that names none; with --arch A, only the
specs for A (and those for any architecture), all compiled for A; the native kernels for A (default 90).
Then read:

  regs, spill_st/spill_ld, stack   the `ptxas -v` log of the compile itself (Triton runs ptxas -v; the log
                                   is captured through TRITON_DUMP_PTXAS_LOG), cross-checked against
                                   `cuobjdump --dump-resource-usage` of the cubin; "n/a" when unavailable
  shared                           bytes of shared memory Triton allocates (metadata.shared)
  ld / st                          PTX ld.global / st.global counts by vector width: scalar/v2/v4(/v8),
                                   and the widest access in bits (vector count x element bits: .v4.b32 and
                                   .v8.b16 are 128-bit, .v2.b32 and .v4.b16 are 64-bit)
  tensor_ld / tensor_st            the narrowest global access (bits) issued for a *tensor* load/store of
                                   the Triton IR (matched through the source locations that TTGIR and the
                                   PTX .loc lines share); cp.async copies count as loads; scalar loads of
                                   tables and hyper-parameters are left out
  cp_async                         cp.async global->shared copies, count and widest (bits); tma:N counts
                                   cp.async.bulk.tensor (TMA) copies
  wgmma / mma                      PTX `wgmma.mma_async` and `mma.sync` counts; SASS HGMMA / HMMA counts
  warps_regs / warps_sm            resident warps per SM allowed by the registers alone, and by registers,
                                   shared memory and the 32-block limit together (cuda_occupancy.h; sm_90,
                                   and sm_80 with its 164 KiB of shared memory per SM):
      regs_per_warp  = ceil(regs * 32 / 256) * 256                 (allocation unit 256 registers per warp)
      warps_regs     = floor(floor(16384 / regs_per_warp) * 4 / num_warps) * num_warps
                       (65536 registers in 4 sub-partitions of 16384; whole blocks only)
      blocks_smem    = floor(233472 / ceil((shared + 1024) / 128) * 128)   (228 KiB per SM, 1 KiB reserved
                                                                             per block)
      warps_sm       = min(64, num_warps * min(blocks_regs, blocks_smem, 32))

Another Triton (the GPU machine has 3.6): `pip install --target DIR triton==3.6.0`, then
`PYTHONPATH=DIR python bench/kernel_report.py --no-csv` compiles the same configurations with it.

Rows are appended to bench/results/kernels.csv (or --csv) with the compiler (Triton version, the ptxas
Triton used), target, date and git commit, and the short git hash of each kernel file (`source`), so a
row names exactly the code it was compiled from. Nothing is cached between runs.

The compiling and reading is kernels/compile_report.py (seal_fast.kernels.compile_report), beside the kernels it
inspects; this file is the command: it prints the table and appends the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seal_fast.kernels.compile_report import COLUMNS, _collect_here  # noqa: E402

CSV_NAME = "kernels"


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=None,
                   help="compile only the configurations for this compute capability (e.g. 90: sm_90a, 80), and "
                        "those for any, for it (default: each for its own, sm_90 where it names none)")
    p.add_argument("--modules", nargs="+", help="modules to report (default: every kernels/ module with a kernel)")
    p.add_argument("--csv", default=None, help="CSV file to append to (default bench/results/kernels.csv)")
    p.add_argument("--no-csv", action="store_true", help="print only, append no rows")
    p.add_argument("--quick", action="store_true", help="only the first configuration of each kernel")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--path", default=None, help="import the kernels package from DIR instead of this checkout "
                                                  "(e.g. a copy of an older commit's kernels/)")
    p.add_argument("--tag", default="", help="a word stored in the rows' tag column (e.g. before)")
    p.add_argument("--json", default=None, help="also write the full result as JSON to this file")
    args = p.parse_args(argv)

    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled code, not the interpreter's functions
    sys.path.insert(0, str(Path(args.path).resolve()) if args.path else str(ROOT))
    if args.path:  # bench.utils still comes from this checkout
        sys.path.insert(1, str(ROOT))
    t = time.perf_counter()
    result = _collect_here(args.modules, args.arch, args.quick, args.jobs)
    wall = time.perf_counter() - t
    if args.json:
        Path(args.json).write_text(json.dumps(result, default=str))
    rows, env = result["rows"], result["env"]
    from bench.utils import environment, print_table

    ok = [r for r in rows if "error" not in r]
    targets = ", ".join(sorted({r["target"] for r in ok if r.get("target")})) or f"sm_{args.arch or 90}"
    print(f"# Triton {env['triton']}, ptxas {env['ptxas']}, targets {targets}"
          f", kernels from {env['kernels_root']}; {len(rows)} configs in {wall:.1f} s")
    native = sorted({r["ptxas"] for r in ok if r.get("module") == "kernels.cuda"})
    if native:
        print(f"# the native kernels (module kernels.cuda) by {', '.join(native)} and its ptxas, 256 threads a block")
    if ok:
        print_table(ok, COLUMNS)
    for r in ok:
        if r.get("ptxas_notes"):
            print(f"# {r['kernel']} / {r['label']}: {r['ptxas_notes']}")
    for r in rows:
        if "error" in r:
            print(f"# FAILED {r['module']} / {r['label']}: {r['error']}")
    for e in result["errors"]:
        print(f"# FAILED {e}")
    missing = {m: sorted(set(ks) - {r["kernel"] for r in rows if r["module"] == m})
               for m, ks in result["kernels"].items()}
    for m, ks in missing.items():
        if ks and not args.quick:
            print(f"# {m}: kernel(s) without any spec: {', '.join(ks)}")
    if not args.no_csv and rows:
        e = environment()
        common = {"date": e["date"], "commit": e["commit"], "host": e["device"], "triton": env["triton"],
                  "ptxas": env["ptxas"].split(" ")[0], "tag": args.tag}
        out = []
        for r in rows:
            row = dict(common, target=r.get("target", f"sm_{args.arch or 90}"))
            row.update({k: v for k, v in r.items() if k not in ("tensor_accesses", "target")})
            out.append(row)
        if args.csv:
            import bench.utils as bu

            csv = Path(args.csv).resolve()
            old = bu.RESULTS
            bu.RESULTS = csv.parent
            try:
                path = bu.append_rows(csv.stem, out)
            finally:
                bu.RESULTS = old
        else:
            from bench.utils import append_rows

            path = append_rows(CSV_NAME, out)
        print(f"# {len(out)} rows appended to {path}")
    return 1 if result["errors"] or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
