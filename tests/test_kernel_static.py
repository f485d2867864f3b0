"""What every shipped Triton kernel configuration must keep, checked on the compiled code without a GPU.

Every configuration a launcher can pick (each kernel file's `compile_specs()`) is compiled for sm_90a on
this machine by kernels/compile_report.py (in a subprocess without TRITON_INTERPRET: Triton's own ptxas, no
driver) and read back from the ptxas log, the PTX and the SASS. The KNN, whose tables depend on the GPU's
architecture, is also compiled for sm_80 (its sm_80 table: CMake targets sm_80 too): no spills, registers and
shared memory for two blocks per SM there as well. The same code prints the report table, so a failing check
here is a row of `python bench/kernel_report.py [--arch 80]`. Skipped only when Triton cannot compile for
CUDA here at all (no nvidia backend or no ptxas).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seal_fast.kernels import compile_report as kr
from seal_fast.kernels import ptx_facts as pf

ROOT = Path(__file__).resolve().parent.parent
ARCH = 90
ARCHS = (90, 80)   # sm_80: the modules whose tables depend on the architecture (ARCH_MODULES) only
ARCH_MODULES = ["kernels.knn_kernel"]
FLOAT_ELEMS = {"f32", "bf16", "f16"}

# Registers per thread, per kernel. The bound is an occupancy requirement (kr.occupancy: 65536 registers
# per SM in 4 sub-partitions, allocated 256 per warp), not today's count plus slack.
#
# fused_sgd, aligned (the launch that carries a model's parameters): <= 64 registers leaves >= 32 resident
# warps per SM, 8 blocks of 4 warps. The kernel is pure streaming and each block is short: one chunk of
# 2048 elements behind a dependent record -> address -> data load chain (two HBM round trips, estimated
# 1.5-2 us). To keep H200's 4.8 TB/s busy each of its 132 SMs must move ~36 KB/us; a bf16 momentum chunk
# moves 20 KB (3 reads, 2 writes), so ~4 resident blocks per SM just cover that latency: 8 leaves a 2x
# margin for the gaps while blocks start and retire.
# fused_sgd, unaligned (odd views and odd-length tails only: small launches): the scalar path keeps each
# of its 16 elements per tensor in its own register, each with its own 64-bit address, so it needs far
# more registers than the vector path; <= 128 keeps >= 16 warps (4 blocks) per SM, the latency-covering
# minimum above.
# knn: the top-k merge runs on the CUDA cores between a block's tile MMAs (nothing overlaps them inside one
# block); two resident blocks per SM let one block's merge overlap the other's wgmma, where one block per
# SM leaves the tensor cores idle during every merge. So: registers that let two blocks share an SM,
# <= 128 at 8 warps (<= 255 at 4 warps, where registers cannot stop it), and shared memory for two
# (checked with the registers through kr.occupancy).
# knn, the cap: every launch sets ptxas's register cap (kernels.knn_configs.MAXNREG = 240; without one ptxas sometimes
# spills to reach 3 or 4 blocks per SM), 15 below the hardware's 255: headroom for a compiler that needs a few
# more registers (raise the cap) before any configuration has to change.
SGD_ALIGNED_MAX_REGS = 64
SGD_UNALIGNED_MAX_REGS = 128
KNN_MIN_BLOCKS_PER_SM = 2
KNN_REG_CAP = 240


def knn_max_regs(num_warps: int) -> int:
    """The most registers per thread that still let KNN_MIN_BLOCKS_PER_SM blocks of num_warps share an SM, within
    the launches' register cap."""
    return max([r for r in range(1, KNN_REG_CAP + 1)
                if kr.occupancy(r, num_warps, 0)[0] >= KNN_MIN_BLOCKS_PER_SM * num_warps], default=0)


def _no_cuda_compiler() -> str | None:
    """Why Triton cannot compile for CUDA on this machine, or None when it can."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(ARCH)
    except Exception as e:  # noqa: BLE001 - no nvidia backend at all
        return f"Triton has no usable CUDA backend here: {type(e).__name__}: {e}"
    if tool is None or not tool.path or not os.path.exists(tool.path):
        return "Triton's ptxas is missing: cannot compile for CUDA on this machine"
    return None


@pytest.fixture(scope="module")
def report() -> dict:
    reason = _no_cuda_compiler()
    if reason:
        pytest.skip(reason)
    return kr.collect(arch=ARCH)


@pytest.fixture(scope="module")
def report_sm80() -> dict:
    reason = _no_cuda_compiler()
    if reason:
        pytest.skip(reason)
    return kr.collect(modules=ARCH_MODULES, arch=80)


@pytest.fixture(params=ARCHS, ids=lambda a: f"sm_{a}")
def any_report(request) -> dict:
    """The sm_90 report (every module), then the sm_80 one (ARCH_MODULES)."""
    return request.getfixturevalue("report" if request.param == 90 else "report_sm80")


def _rows(report, module=None, **facts):
    out = []
    for r in report["rows"]:
        if module and r["module"] != module:
            continue
        f = json.loads(r.get("facts") or "{}")
        if all(f.get(k) == v for k, v in facts.items()):
            out.append(dict(r, facts=f))
    return out


def _name(r) -> str:
    return f"{r['module']} / {r['label']}"


# -- the report covers every kernel ------------------------------------------------------------------

def test_every_kernel_module_exposes_compile_specs():
    with_kernels = {m: p for m, p in kr.kernel_modules(ROOT).items() if kr.triton_functions(p)[1]}
    assert {"kernels.fused_sgd", "kernels.knn_kernel"} <= set(with_kernels), with_kernels
    missing = sorted(m for m, p in with_kernels.items() if not kr.defines_compile_specs(p))
    assert not missing, f"kernel files without compile_specs(): {missing}"


def test_every_kernel_has_a_spec_and_compiles(any_report):
    report = any_report
    assert not report["errors"], report["errors"]
    with_kernels = {m for m, p in kr.kernel_modules(ROOT).items() if kr.triton_functions(p)[1]}
    if report["env"]["arch"] != ARCH:
        with_kernels &= set(ARCH_MODULES)
    assert with_kernels <= set(report["kernels"]), f"not reported: {sorted(with_kernels - set(report['kernels']))}"
    uncovered = {m: sorted(set(ks) - {r["kernel"] for r in report["rows"] if r["module"] == m})
                 for m, ks in report["kernels"].items()}
    assert not any(uncovered.values()), f"@triton.jit kernels that no spec compiles: {uncovered}"
    failed = [f"{_name(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not failed, f"configurations that do not compile for sm_{report['env']['arch']}:\n" + "\n".join(failed)
    targets = {r["target"] for r in report["rows"] if "error" not in r and r["module"] != "kernels.cuda"}
    assert targets == {"sm_90a" if report["env"]["arch"] == 90 else f"sm_{report['env']['arch']}"}, targets


# -- what every configuration keeps ------------------------------------------------------------------

def test_no_spills(any_report):
    rows = [r for r in any_report["rows"] if "error" not in r]
    assert rows
    bad = [f"{_name(r)}: {r['regs']} regs, spill stores {r['spill_st']} B, spill loads {r['spill_ld']} B"
           for r in rows if r["spill_st"] != 0 or r["spill_ld"] != 0]
    assert not bad, "register spills (or no ptxas log to tell):\n" + "\n".join(bad)


def test_one_block_fits_an_sm(any_report):
    """Registers and shared memory of every configuration allow at least one block per SM (else the launch
    fails with 'out of resources')."""
    bad = [f"{_name(r)}: {r['num_warps']} warps, {r['regs']} regs, {r['shared']} B shared -> {r['warps_sm']} warps/SM"
           for r in any_report["rows"] if "error" not in r and not (isinstance(r["warps_sm"], int)
                                                                 and r["warps_sm"] >= r["num_warps"])]
    assert not bad, "\n".join(bad)


def _reg_bound(r) -> int | None:
    if r["module"] == "kernels.fused_sgd":
        return SGD_ALIGNED_MAX_REGS if json.loads(r["facts"]).get("aligned") else SGD_UNALIGNED_MAX_REGS
    if r["module"] == "kernels.knn_kernel":
        return knn_max_regs(r["num_warps"])
    return None


def test_registers_within_occupancy_bounds(any_report):
    rows = [r for r in any_report["rows"] if "error" not in r and _reg_bound(r) is not None]
    assert rows
    bad = [f"{_name(r)}: {r['regs']} regs > {_reg_bound(r)} ({r['warps_regs']} warps/SM by registers)"
           for r in rows if not (isinstance(r["regs"], int) and r["regs"] <= _reg_bound(r))]
    assert not bad, "\n".join(bad)


# -- fused_sgd ----------------------------------------------------------------------------------------

def test_sgd_aligned_accesses_are_128_bit(report):
    """The aligned variant moves params, grads and momentum buffers (the kernel's only floating-point tensor
    accesses) with 128-bit loads and stores only: .v4.b32 for fp32 and for packed bf16 / fp16 pairs."""
    rows = _rows(report, "kernels.fused_sgd", aligned=True)
    for dtype in ("fp32", "bf16", "fp16"):
        assert any(r["facts"].get("kernel") == "update" and r["facts"].get("dtype") == dtype for r in rows), \
            f"no aligned update configuration for {dtype}"
    bad = []
    for r in rows:
        if "error" in r:
            continue
        acc = [a for a in r["tensor_accesses"] if a["elem"] in FLOAT_ELEMS]
        loads = [a for a in acc if a["op"] in ("ld", "cp.async")]
        stores = [a for a in acc if a["op"] == "st"]
        narrow = sorted({(a["op"], a["bits"], a["line"]) for a in acc if a["bits"] != 128})
        if not loads or (r["facts"].get("kernel") == "update" and not stores):
            bad.append(f"{_name(r)}: no tensor load/store found in the PTX ({r['ld']} / {r['st']})")
        elif narrow or r["tensor_unmatched"]:
            bad.append(f"{_name(r)}: accesses (op, bits, line) {narrow}; unmatched IR accesses {r['tensor_unmatched']}")
    assert not bad, "\n".join(bad)


# -- knn ----------------------------------------------------------------------------------------------

def test_knn_16bit_tensor_core_configs_issue_wgmma(report):
    rows = [r for r in _rows(report, "kernels.knn_kernel", tensor_cores=True) if r["facts"].get("dtype") in ("bf16", "fp16")]
    assert {r["facts"]["dtype"] for r in rows} == {"bf16", "fp16"}, "no 16-bit tensor-core KNN configuration"
    bad = [f"{_name(r)}: PTX wgmma.mma_async {r['wgmma']}, mma.sync {r['mma']}; SASS {r['sass_mma']}"
           for r in rows if "error" not in r and not (r["wgmma"] > 0 and "HGMMA:0" not in r["sass_mma"]
                                                       and "n/a" not in r["sass_mma"])]
    assert not bad, "16-bit KNN configurations without wgmma on sm_90:\n" + "\n".join(bad)


def test_knn_wgmma_not_serialized(report):
    """ptxas serializes wgmma (waits after each) when it cannot prove the pipeline safe, and says so in its
    log: the tensor cores then idle between instructions."""
    rows = [r for r in _rows(report, "kernels.knn_kernel") if "error" not in r and r["wgmma"]]
    assert rows, "no KNN configuration issues wgmma"
    bad = [f"{_name(r)}: {r['ptxas_notes']}" for r in rows if "serializ" in r.get("ptxas_notes", "").lower()]
    assert not bad, "\n".join(bad)


def test_knn_two_blocks_share_an_sm(any_report):
    """Registers and shared memory together (see KNN_MIN_BLOCKS_PER_SM above; sm_80 has less shared memory)."""
    rows = [r for r in _rows(any_report, "kernels.knn_kernel") if "error" not in r]
    assert rows
    bad = [f"{_name(r)}: {r['num_warps']} warps, {r['regs']} regs, {r['shared']} B shared -> {r['warps_sm']} warps/SM"
           for r in rows if not (isinstance(r["warps_sm"], int)
                                 and r["warps_sm"] >= KNN_MIN_BLOCKS_PER_SM * r["num_warps"])]
    assert not bad, "\n".join(bad)


def test_knn_covers_both_architectures(any_report):
    """The report of each architecture holds the KNN table of that architecture, every flavour of it, and only
    that one (a spec made for sm_80 is never judged as sm_90 code, nor the other way round)."""
    arch = any_report["env"]["arch"]
    rows = [r for r in _rows(any_report, "kernels.knn_kernel", kernel="knn") if "error" not in r]
    assert rows and {r["facts"]["arch"] for r in rows} == {arch}
    assert {r["facts"]["flavour"] for r in rows} == {"plain", "full", "distances"}
    assert {r["facts"]["dtype"] for r in rows} == {"fp32", "bf16", "fp16"}
    assert any(r["facts"]["default"] for r in rows) and any(not r["facts"]["default"] for r in rows)
    from seal_fast.kernels.knn_configs import MAXNREG

    assert MAXNREG == KNN_REG_CAP


# -- the report's own reading of the compiler output ---------------------------------------------------

def test_ptx_access_parser():
    ptx = "\n".join([
        '\t.loc\t1 10 5',
        '\tld.param.u64 \t%rd1, [k_param_0];',
        '\t// begin inline asm',
        '\t.loc\t1 12 9',
        '\tmov.u32 %r1, %r5;',
        '\t.loc\t1 13 9',                      # LLVM's line numbering inside an inline asm string
        '\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd9 + 0 ];',
        '\t// end inline asm',
        '\t.loc\t1 10 5',
        '\tld.global.L1::evict_last.b64 { %rd3 }, [ %rd4 + 0 ];',
        '\tst.global.v2.b16 [ %rd5 + 0 ], { %rs1, %rs2 };',
        '\tst.shared.v4.b32 [ %r9 + 0 ], { %r1, %r2, %r3, %r4 };',
        '\t.loc\t1 20 3',
        '\tcp.async.cg.shared.global [ %r98 + 0 ], [ %rd23 + 0 ], 0x10, %r99;',
        '\t.file\t1 "/x/k.py"',
    ])
    acc = pf.ptx_accesses(ptx)
    assert [(a["op"], a["vec"], a["elem_bits"], a["bits"]) for a in acc] == [
        ("ld", 4, 32, 128), ("ld", 1, 64, 64), ("st", 2, 16, 32), ("cp.async", 1, 128, 128)]
    assert acc[0]["loc"] == ("/x/k.py", 12, 9)
    ttgir = "\n".join([
        '    %p = tt.load %a, %m, %c : tensor<2048x!tt.ptr<f32>, #blocked> loc(#loc48)',
        '    %s = tt.load %b : !tt.ptr<i64> loc(#loc3)',
        '#loc17 = loc("/x/k.py":12:9)',
        '#loc48 = loc("p"(#loc17))',
        '#loc3 = loc("/x/k.py":10:5)',
    ])
    tens = pf.tensor_access_widths(acc, pf.ttgir_tensor_accesses(ttgir))
    assert [(a["op"], a["elem"], a["bits"]) for a in tens] == [("ld", "f32", 128)]


def test_ptxas_log_parser():
    log = "\n".join([
        "ptxas info    : 0 bytes gmem",
        "ptxas info    : Compiling entry function '_knn_kernel' for 'sm_90a'",
        "ptxas info    : Function properties for _knn_kernel",
        "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads",
        ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
         "the presence of Extern calls in the function '_knn_kernel'."),
        "ptxas info    : Used 255 registers, used 1 barriers, 624 bytes cmem[0]",
    ])
    res = pf.ptxas_resources(log, "_knn_kernel")
    assert (res["regs"], res["spill_st"], res["spill_ld"], res["stack"]) == (255, 8, 4, 0)
    assert "serialized" in res["ptxas_notes"]


def test_occupancy_formula():
    assert kr.occupancy(32, 4, 0) == (64, 64)
    assert kr.occupancy(64, 4, 0) == (32, 32)
    assert kr.occupancy(40, 4, 0) == (48, 48)      # 1280 regs/warp: 12 warps per 16384-register sub-partition
    assert kr.occupancy(136, 4, 0) == (12, 12)     # 4352/warp: 3 per sub-partition (not 65536 // 4352 = 15)
    assert kr.occupancy(255, 8, 0) == (8, 8)
    assert kr.occupancy(32, 4, 100_000) == (64, 8)  # 101,120 B a block with the reserved 1 KiB: 2 blocks
    assert kr.occupancy(32, 4, 240_000) == (64, 0)  # over the 227 KiB a block may have
    assert kr.occupancy(32, 4, 100_000, arch=80) == (64, 4)   # sm_80: 164 KiB per SM, one such block
    assert kr.occupancy(32, 4, 170_000, arch=80) == (64, 0)   # over the 163 KiB a block may have on sm_80
    assert kr.arch_of_target("sm_90a") == 90 and kr.arch_of_target("sm_80") == 80
    assert knn_max_regs(8) == 128 and knn_max_regs(4) == KNN_REG_CAP == 240
