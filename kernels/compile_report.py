"""What the compiler made of every kernel configuration (no GPU needed): compile each KernelSpec of each
kernels/ module (compile_spec.py: what a launcher can pick) for its GPU architecture, and the native CUDA
kernels (cuda/) by nvcc, and read registers, spills, shared memory, global access widths, tensor-core
instructions and the occupancy the registers allow. The command that prints and records it is
bench/kernel_report.py (its docstring says every column); the tests (tests/test_kernel_static.py,
tests/test_cuda_backend.py) read the same rows through collect() and native_rows(). Reading the PTX, TTGIR,
ptxas logs and SASS is kernels/ptx_facts.py's; compiling, occupancy and the rows are here.

Run as a script (`python kernels/compile_report.py --json OUT [...]`) it is collect()'s fresh process: the
rows as JSON, nothing printed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # imported as kernels.compile_report (the tests, bench/kernel_report.py)
    from .ptx_facts import (_COMMENT, _width_summary, cuobjdump_resources, ptx_accesses, ptxas_resources, sass_mma,
                            tensor_access_widths, ttgir_tensor_accesses)
except ImportError:  # run as a script (collect()'s fresh process): its own folder kernels/ leads sys.path
    from ptx_facts import (_COMMENT, _width_summary, cuobjdump_resources, ptx_accesses, ptxas_resources, sass_mma,
                           tensor_access_widths, ttgir_tensor_accesses)

ROOT = Path(__file__).resolve().parent.parent  # the checkout: kernels/ is ROOT/kernels

# sm_90 (H100 / H200) limits, from cuda_occupancy.h (CUDA 13) and the H100 data sheet
REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_ALLOC_UNIT = 256          # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 233472          # 228 KiB
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128
SMEM_MAX_PER_BLOCK = 232448   # 227 KiB (opt-in above 48 KiB; Triton opts in)
# what differs on sm_80 (A100): 164 KiB of shared memory per SM, 163 KiB per block; registers, warps and
# blocks per SM as on sm_90
SMEM_BY_ARCH = {90: (SMEM_PER_SM, SMEM_MAX_PER_BLOCK), 80: (167936, 166912)}

COLUMNS = ["kernel", "label", "target", "num_warps", "num_stages", "regs", "spill_st", "spill_ld", "shared",
           "ld", "ld_bits", "st", "st_bits", "tensor_ld", "tensor_st", "cp_async", "wgmma", "mma", "sass_mma",
           "warps_regs", "warps_sm"]


# ----------------------------------------------------------------------------------------------------
# Which files hold kernels (static: the AST, no import)

def _is_jit(dec) -> bool:
    node = dec.func if isinstance(dec, ast.Call) else dec
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name == "jit"


def triton_functions(path: Path) -> tuple[set[str], set[str]]:
    """(every @triton.jit function of a file, the kernels among them). A kernel is a jit function that the
    file launches (`name[grid](...)`) or that no other jit function of the file calls; the rest are device
    helpers inlined into a kernel (e.g. `_ptr`)."""
    tree = ast.parse(Path(path).read_text())
    jit = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and any(map(_is_jit, n.decorator_list))}
    called = set()
    for name, fn in jit.items():
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in jit \
                    and node.func.id != name:
                called.add(node.func.id)
    launched = {node.func.value.id for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in jit}
    return set(jit), {n for n in jit if n in launched or n not in called}


def defines_compile_specs(path: Path) -> bool:
    tree = ast.parse(Path(path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "compile_specs" for n in tree.body)


def kernel_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file of every Python file under kernels/ that holds a @triton.jit function or defines
    compile_specs()."""
    out = {}
    for path in sorted((Path(root) / "kernels").rglob("*.py")):
        if triton_functions(path)[0] or defines_compile_specs(path):
            rel = path.relative_to(root).with_suffix("")
            out[".".join(rel.parts)] = path
    return out


# ----------------------------------------------------------------------------------------------------
# Occupancy (the reading of the compiler's output, PTX, TTGIR, ptxas logs, SASS: kernels/ptx_facts.py)

def arch_of_target(target: str) -> int:
    """"sm_90a" -> 90, "sm_80" -> 80 (90 when unreadable)."""
    m = re.search(r"sm_(\d+)", str(target))
    return int(m.group(1)) if m else 90


def occupancy(regs, num_warps: int, shared, arch: int = 90) -> tuple:
    """(warps per SM allowed by the registers alone, warps per SM allowed by registers, shared memory and
    the block limit together), the rules of cuda_occupancy.h for sm_90 (or sm_80: its smaller shared memory);
    None where regs is unknown."""
    if not isinstance(regs, int):
        return None, None
    smem_per_sm, smem_max_per_block = SMEM_BY_ARCH.get(arch, SMEM_BY_ARCH[90])
    per_warp = math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks_regs = (REGS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // num_warps if per_warp else 10**9
    if regs > 255 or per_warp * math.ceil(num_warps / SUB_PARTITIONS) * SUB_PARTITIONS > REGS_PER_SM:
        blocks_regs = 0
    smem = math.ceil((int(shared or 0) + SMEM_RESERVED_PER_BLOCK) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    blocks_smem = smem_per_sm // smem if (shared or 0) <= smem_max_per_block else 0
    warps_regs = min(MAX_WARPS_PER_SM, blocks_regs * num_warps)
    warps = min(MAX_WARPS_PER_SM, num_warps * min(blocks_regs, blocks_smem, MAX_BLOCKS_PER_SM))
    return warps_regs, warps


# ----------------------------------------------------------------------------------------------------
# Compiling

def _git_short(path: Path) -> str:
    try:
        return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()[:10]
    except Exception:  # noqa: BLE001 - no git: unknown, said so
        return "unknown"


def analyse(spec, kernel, arch: int) -> dict:
    """Compile one KernelSpec and read everything the report shows. Raises whatever triton.compile raises."""
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log of its own ptxas call
    triton.knobs.compilation.always_compile = True  # never a cache hit (which would skip ptxas and its log)
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        k = spec.compile(arch)
    seconds = time.perf_counter() - t
    ptx, cubin, ttgir = k.asm["ptx"], k.asm["cubin"], k.asm["ttgir"]
    name = k.metadata.name
    res = ptxas_resources(buf.getvalue(), name)
    cub = cuobjdump_resources(cubin, name)
    row = {"kernel": kernel, "label": spec.label, "facts": json.dumps(spec.facts, sort_keys=True),
           "num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages,
           "target": (re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE) or [None, f"sm_{arch}?"])[1]}
    if "regs" in res:
        row["regs"] = res["regs"]
        row["regs_source"] = "ptxas -v"
    elif "reg" in cub:
        row["regs"] = cub["reg"]
        row["regs_source"] = "cuobjdump"
    else:
        row["regs"] = "n/a: no ptxas log, no cuobjdump"
    for key in ("spill_st", "spill_ld", "stack"):
        row[key] = res.get(key, "n/a: no ptxas -v log")
    if "reg" in cub and "regs" in res and cub["reg"] != res["regs"]:
        res["ptxas_notes"] = (res["ptxas_notes"] + " | " if res["ptxas_notes"] else "") + \
            f"cuobjdump says REG:{cub['reg']}"
    row["local"] = cub.get("local", "n/a")
    row["shared"] = k.metadata.shared
    acc = ptx_accesses(ptx)
    row["ld"], row["ld_bits"] = _width_summary(acc, "ld")
    row["st"], row["st_bits"] = _width_summary(acc, "st")
    cps = [a["bits"] for a in acc if a["op"] == "cp.async"]
    row["cp_async"] = f"{len(cps)}x{max(cps)}b" if cps else "0"
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor\b", "\n".join(_COMMENT.sub("", ln) for ln in ptx.splitlines())))
    if tma:  # TMA copies (tensor descriptors): whole tiles, no per-thread width
        row["cp_async"] += f" tma:{tma}"
    tt_acc = ttgir_tensor_accesses(ttgir)
    tens = tensor_access_widths(acc, tt_acc)
    found = {("ld" if a["op"] in ("ld", "cp.async") else "st", a["loc"]) for a in tens}
    # tensor accesses of the IR with no PTX access matched to them (0 unless the location mapping failed or
    # the compiler removed an access): a check on the tensor_ld / tensor_st columns themselves
    row["tensor_unmatched"] = len({(a["op"], a["loc"]) for a in tt_acc} - found)
    row["tensor_accesses"] = [{"op": a["op"], "elem": a["elem"], "bits": a["bits"], "line": a["loc"][1]}
                              for a in tens]
    for op in ("ld", "st"):
        bits = [a["bits"] for a in tens if (a["op"] in ("ld", "cp.async")) == (op == "ld") and a["bits"]]
        row[f"tensor_{op}"] = min(bits) if bits else "-"
    code = "\n".join(_COMMENT.sub("", ln) for ln in ptx.splitlines())
    row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async\b", code))
    row["mma"] = len(re.findall(r"\bmma\.sync\b", code))
    sm = sass_mma(cubin)
    row["sass_mma"] = f"HGMMA:{sm['hgmma']} HMMA:{sm['hmma']}" if sm else "n/a: no cuobjdump"
    row["warps_regs"], row["warps_sm"] = occupancy(row["regs"], row["num_warps"], row["shared"],
                                                   arch_of_target(row["target"]))
    row["ptxas_notes"] = res.get("ptxas_notes", "")
    row["compile_s"] = round(seconds, 2)
    return row


# ----------------------------------------------------------------------------------------------------
# The native CUDA kernels (kernels/cuda/fused_sgd.cu): nvcc, not Triton, compiles them

NATIVE_SOURCE = Path(__file__).resolve().parent / "cuda" / "fused_sgd.cu"
NATIVE_THREADS = 256  # THREADS in fused_sgd.cu: 8 warps a block
# fused_sgd_kernel<T, MOMENTUM, NESTEROV, SCALED, ALIGNED> / nonfinite_kernel<T, ALIGNED>, as mangled names
_NATIVE_NAME = re.compile(r"(fused_sgd_kernel|nonfinite_kernel)I(f|6__half|13__nv_bfloat16)((?:Lb[01]E)+)E")
_NATIVE_DTYPE = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16"}
_GENERIC = re.compile(r"^\s*((?:ld|st)\.(?!global|param|shared|local|const)\S+)", re.MULTILINE)


def native_rows(arch: int = 90) -> list[dict]:
    """Every instantiation of the native kernels compiled by nvcc for sm_<arch> (PTX, then ptxas -v): the
    report's columns where they apply, plus `generic` (ld / st without a state space: slower than ld.global).
    One row with an `error` when nvcc is missing or fails."""
    import shutil

    base = {"module": "kernels.cuda", "source": _git_short(NATIVE_SOURCE)}
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [dict(base, kernel="fused_sgd.cu", label="native fused_sgd", error="nvcc not found on PATH")]
    version = re.search(r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                             text=True).stdout)
    compiler = f"nvcc {version.group(1) if version else '?'}"
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        ptx_path = Path(d) / "fused_sgd.ptx"
        steps = [[nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-ptx", str(NATIVE_SOURCE), "-o", str(ptx_path)],
                 [nvcc, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(ptx_path), "-o", str(Path(d) / "k.cubin")]]
        logs = []
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                return [dict(base, kernel="fused_sgd.cu", label="native fused_sgd",
                             error=f"{' '.join(cmd[:2])} failed: {(done.stderr or done.stdout).strip()[:300]}")]
            logs.append(done.stdout + done.stderr)
        ptx = ptx_path.read_text()
    seconds = time.perf_counter() - t
    target = (re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE) or [None, f"sm_{arch}?"])[1]
    rows = []
    for body in re.split(r"\.entry\s+", ptx)[1:]:
        name = body.split("(")[0].strip()
        m = _NATIVE_NAME.search(name)
        if not m:
            continue
        flags = [f == "1" for f in re.findall(r"Lb([01])E", m.group(3))]
        dtype = _NATIVE_DTYPE[m.group(2)]
        if m.group(1) == "fused_sgd_kernel":
            momentum, nesterov, scaled, aligned = flags
            facts = dict(kernel="update", dtype=dtype, aligned=aligned, momentum=momentum, nesterov=nesterov,
                         scaled=scaled)
            mode = "nesterov" if nesterov else "momentum" if momentum else "plain"
            label = f"native fused_sgd update {dtype} {mode}{' scaled' if scaled else ''} " \
                    f"{'aligned' if aligned else 'unaligned'}"
        else:
            aligned = flags[0]
            facts = dict(kernel="nonfinite", dtype=dtype, aligned=aligned)
            label = f"native fused_sgd nonfinite {dtype} {'aligned' if aligned else 'unaligned'}"
        res = ptxas_resources(logs[1], name)
        acc = ptx_accesses(body)
        row = dict(base, kernel=m.group(1), label=label, facts=json.dumps(facts, sort_keys=True),
                   num_warps=NATIVE_THREADS // 32, num_stages="-", target=target, ptxas=compiler,
                   regs=res.get("regs", "n/a: no ptxas -v log"), regs_source="ptxas -v", local="n/a", shared=0,
                   cp_async="0", tensor_ld="-", tensor_st="-", wgmma=0, mma=0, sass_mma="n/a",
                   generic=len(_GENERIC.findall(body)), ptxas_notes=res.get("ptxas_notes", ""),
                   compile_s=round(seconds, 2))
        for key in ("spill_st", "spill_ld", "stack"):
            row[key] = res.get(key, "n/a: no ptxas -v log")
        row["ld"], row["ld_bits"] = _width_summary(acc, "ld")
        row["st"], row["st_bits"] = _width_summary(acc, "st")
        row["warps_regs"], row["warps_sm"] = occupancy(row["regs"], row["num_warps"], 0, arch)
        rows.append(row)
    return rows


def _specs(module: str):
    mod = importlib.import_module(module)
    if not hasattr(mod, "compile_specs"):
        raise AttributeError(f"{module} has no compile_specs()")
    return list(mod.compile_specs())


def _compile_one(job) -> dict:
    module, index, arch = job
    spec = _specs(module)[index]
    try:
        kernel = spec.kernel
    except Exception:  # noqa: BLE001 - reported in the row
        kernel = getattr(spec.fn, "__name__", repr(spec.fn))
    base = {"module": module, "kernel": kernel, "label": spec.label, "facts": json.dumps(spec.facts, sort_keys=True),
            "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    try:
        fn = spec.fn
        while not hasattr(fn, "__code__"):  # autotune / heuristics / jit wrappers each keep .fn
            fn = fn.fn
        base["source_file"] = fn.__code__.co_filename
    except Exception:  # noqa: BLE001
        base["source_file"] = str(sys.modules[module].__file__)
    try:
        return dict(analyse(spec, kernel, arch), module=module, source_file=base["source_file"])
    except Exception as e:  # noqa: BLE001 - one broken config must not hide the others
        return dict(base, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])


def collect(modules: list[str] | None = None, arch: int | None = None, quick: bool = False,
            jobs: int | None = None, path: str | None = None) -> dict:
    """Compile every spec of every module (default: every kernels/ module with a kernel), each for its own
    architecture (arch None) or only those for `arch` (see the module docstring), in a fresh Python
    process without TRITON_INTERPRET (the tests' conftest sets it, which makes @triton.jit build interpreter
    functions; a fresh process also keeps a CUDA context, if any, out of the compiles). Returns {"rows": [one
    dict per config], "errors": [modules whose specs could not be listed], "kernels": {module: the kernels
    of its file}, "env": {"triton", "ptxas", "arch", "kernels_root"}}."""
    return _collect_subprocess(modules, arch, quick, jobs, path)


def _collect_subprocess(modules, arch, quick, jobs, path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "report.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--json", str(out)]
        cmd += ["--arch", str(arch)] if arch else []
        cmd += ["--modules", *modules] if modules else []
        cmd += ["--quick"] if quick else []
        cmd += ["--jobs", str(jobs)] if jobs else []
        cmd += ["--path", str(path)] if path else []
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if not out.exists():
            raise RuntimeError(f"kernel_report subprocess failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def _collect_here(modules, arch, quick, jobs) -> dict:
    import triton

    root = Path(importlib.import_module("kernels").__file__).resolve().parent.parent
    found = kernel_modules(root)
    modules_given = list(modules or [])
    modules = [m for m in (modules or found) if m != "kernels.cuda"]
    jobs_list, errors, kernels, sources = [], [], {}, {}
    for module in modules:
        try:
            specs = _specs(module)
        except Exception as e:  # noqa: BLE001 - reported, the others still compile
            errors.append(f"{module}: {type(e).__name__}: {e}")
            continue
        kernels[module] = sorted(triton_functions(Path(sys.modules[module].__file__))[1])
        picked = range(len(specs))
        if quick:  # the first spec of each kernel
            first = {}
            for i, s in enumerate(specs):
                first.setdefault(s.kernel, i)
            picked = sorted(first.values())
        # each spec for its own architecture; with `arch`, only the specs for it (or for any)
        own = [getattr(s, "arch", None) for s in specs]  # (an older KernelSpec, via --path, has none)
        jobs_list += [(module, i, arch or own[i] or 90) for i in picked if arch is None or own[i] in (None, arch)]
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every config really goes through ptxas
        try:
            n = jobs or min(len(jobs_list), os.cpu_count() or 1) or 1
            if n > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(n) as pool:
                    rows = pool.map(_compile_one, jobs_list, chunksize=1)
            else:
                rows = [_compile_one(j) for j in jobs_list]
        finally:
            if old_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache
    for r in rows:  # the git blob hash of the file that defines the kernel: which code this row measured
        f = r.pop("source_file", None)
        if f not in sources:
            sources[f] = _git_short(Path(f)) if f else "unknown"
        r["source"] = sources[f]
    if not modules_given or "kernels.cuda" in modules_given:  # the native kernels: nvcc's, beside Triton's
        rows += native_rows(arch or 90)
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch or 90)
    env = {"triton": triton.__version__, "ptxas": f"{tool.version} ({tool.path})", "arch": arch,
           "kernels_root": str(root)}
    return {"rows": rows, "errors": errors, "kernels": kernels, "env": env}


def _json_main(argv=None) -> int:
    """collect()'s fresh process: compile, write the result as JSON to --json."""
    p = argparse.ArgumentParser(description="the rows of collect() as JSON (bench/kernel_report.py prints them)")
    p.add_argument("--json", required=True)
    p.add_argument("--arch", type=int, default=None)
    p.add_argument("--modules", nargs="+")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--path", default=None)
    args = p.parse_args(argv)
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled code, not the interpreter's functions
    sys.path.insert(0, str(Path(args.path).resolve()) if args.path else str(ROOT))
    Path(args.json).write_text(json.dumps(_collect_here(args.modules, args.arch, args.quick, args.jobs), default=str))
    return 0


if __name__ == "__main__":
    # a script's folder leads sys.path: kernels/ would hide the `cuda` package (and any other name) of site-packages
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(_json_main())
