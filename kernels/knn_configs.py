"""Launch configurations of the fused KNN kernel (`_knn_kernel`, kernels/knn_kernel.py): `Config` (tile,
warps, pipeline stages), the tables per GPU architecture, input dtype and dot precision, list slots (k) and row
alignment (`candidates`: the first entry of each is the default), the register cap every launch sets
(MAXNREG), and the keys the autotuner of kernels/knn.py times them under (`list_slots`, `d_class`, `_tune_key`)
with its record of winners (`_WINNERS`). No kernel here: kernels/knn.py launches, kernels/knn_kernel.py
compiles each table entry for the static report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

K_PER_PASS = 64        # list entries one pass keeps in registers; larger k runs ceil(k / 64) passes


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Config:
    """One launch configuration of `_knn_kernel`: tile, warps, pipeline stages."""
    block_q: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def triton(self) -> triton.Config:
        """The same as a triton.Config (one object per Config, so the autotuner's choice maps back)."""
        if self not in _TRITON_CONFIGS:
            _TRITON_CONFIGS[self] = triton.Config({"BLOCK_Q": self.block_q, "BLOCK_N": self.block_n,
                                                   "BLOCK_D": self.block_d}, num_warps=self.num_warps,
                                                  num_stages=self.num_stages, maxnreg=MAXNREG)
        return _TRITON_CONFIGS[self]

    @staticmethod
    def of(c: triton.Config) -> "Config":
        return Config(c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)


_TRITON_CONFIGS: dict[Config, triton.Config] = {}


_INTERPRETER = Config(16, 32, 32, 4, 1)  # under TRITON_INTERPRET=1: small tiles, where each op is numpy
# Every launch of `_knn_kernel` caps the registers (PTX .maxnreg) at 240: two 4-warp blocks per SM, 15 below the
# hardware's 255. Without a cap, ptxas may trade registers for occupancy: for a 128-thread block it sometimes
# stops at 168 or 128 registers (3 or 4 blocks per SM) and spills (e.g. sm_80 bf16 64x64x32 k = 10: 168
# registers, 36 bytes of spill stores; capped, 206 and none), and which configurations it does that to changes
# with the code and the compiler. Every shipped configuration compiles under the cap without spills (sm_90 and
# sm_80, Triton 3.6 / ptxas 12.8 and Triton 3.8 / ptxas 12.9); a compiler that needs more shows it as spills
# in tests/test_kernel_static.py, and the cap can rise to 255 before any configuration must change.
MAXNREG = 240


def arch_of(device) -> int | None:
    """The configuration table a device uses: 90 (Hopper: wgmma) for compute capability 9.x, 80 (mma.sync tiles,
    valid on every later GPU too) for every other CUDA device; None for the interpreter (CPU)."""
    if _interpreted() or torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


def list_slots(k: int) -> int:
    """KP: the power of two >= the list length of one pass (k, at most K_PER_PASS), at least 16."""
    return max(16, triton.next_power_of_2(min(k, K_PER_PASS)))


def d_class(d: int) -> int:
    """The feature-dimension class the autotuner keys on: the power of two >= D, within [16, 32768]."""
    return min(max(16, triton.next_power_of_2(d)), 32768)


def candidates(arch: int | None, dtype: torch.dtype, precision: str | None, kp: int,
               aligned: bool = True) -> tuple[Config, ...]:
    """The configurations the launcher may run for (architecture, input dtype, dot precision, list slots KP,
    16-byte aligned rows); the first is the default (no tuning), the others what the GPU autotuner also times.
    Every one compiles for its architecture without register spills (compile_specs; tests/test_kernel_static.py).

    Registers bound them: the accumulator (BLOCK_Q x BLOCK_N fp32) and the list (BLOCK_Q x KP int64) live in
    registers, and two blocks must share an SM (MAXNREG = 240 registers at 4 warps) so that one block's selection
    overlaps the other's MMAs. sm_90: BLOCK_Q = 64 with 4 warps is one warpgroup, wgmma (M = 64) for every k, and
    every row of a tile inside one warp, so the selection's row reductions are warp shuffles. The candidates of a
    key differ in tiles, stages and D steps only: each output element gets the same products accumulated in the
    same order along D, so the distances, and the result, do not depend on which one wins (on a GPU:
    test_cuda_every_candidate_agrees_and_the_winner_is_cached). Unaligned rows (not 16-byte: no 128-bit
    cp.async) are loaded element-wise through registers: short BLOCK_D steps. fp32 "ieee": the CUDA-core FMA
    dot, operands in registers."""
    if arch is None:
        return (_INTERPRETER,)
    return _TABLE[(arch, _kind(dtype, precision), kp, aligned)]


def _kind(dtype: torch.dtype, precision: str | None) -> str:
    return {torch.bfloat16: "16", torch.float16: "16"}.get(dtype, "ieee" if precision == "ieee" else "tf32")


def _build_table() -> dict:
    """(arch, kind, KP, aligned) -> candidates, the default first. kind: "16" (bf16 / fp16), "tf32", "ieee" (fp32
    on CUDA cores). Chosen on the compiled code (bench/kernel_report.py, both archs, Triton 3.6 and 3.8): no
    spills under the MAXNREG cap. sm_90's defaults for aligned rows are the configurations that ran on the H200
    (2026-12); its unaligned ones replace the old 254-255-register tiles (no headroom); the other candidates, and
    all of sm_80, are the autotuner's to judge (not yet timed on a GPU)."""
    C = Config
    t = {}
    for kp in (16, 32, 64):
        wide = kp <= 32  # KP = 64: the list takes the accumulator's registers
        # sm_90: wgmma, BLOCK_Q = 64 (one warpgroup) everywhere
        t[(90, "16", kp, True)] = ((C(64, 128, 64, 4, 3), C(64, 64, 64, 4, 3), C(64, 128, 64, 4, 4)) if wide else
                                   (C(64, 64, 64, 4, 3), C(64, 64, 64, 4, 4), C(64, 64, 128, 4, 3)))
        t[(90, "16", kp, False)] = ((C(64, 64, 16, 4, 2), C(64, 32, 32, 4, 2)) if wide else
                                    (C(64, 32, 16, 4, 2), C(64, 32, 32, 4, 2)))
        t[(90, "tf32", kp, True)] = ((C(64, 128, 32, 4, 3), C(64, 64, 32, 4, 3), C(64, 128, 32, 4, 4)) if wide else
                                     (C(64, 64, 32, 4, 3), C(64, 64, 32, 4, 4), C(64, 64, 64, 4, 3)))
        t[(90, "tf32", kp, False)] = ((C(64, 64, 16, 4, 2), C(64, 32, 16, 4, 2)) if wide else
                                      (C(64, 32, 16, 4, 2),))
        t[(90, "ieee", kp, True)] = (C(32, 64, 16, 4, 2), C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        t[(90, "ieee", kp, False)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        # sm_80: mma.sync; the accumulator layout costs more registers than wgmma's, so smaller tiles
        t[(80, "16", kp, True)] = ((C(64, 64, 32, 4, 3), C(32, 64, 64, 4, 3), C(64, 32, 64, 4, 3)) if wide else
                                   (C(32, 64, 64, 4, 3), C(64, 32, 64, 4, 3), C(32, 64, 32, 4, 3)))
        t[(80, "16", kp, False)] = ((C(32, 32, 32, 4, 2), C(64, 32, 16, 4, 2)) if wide else
                                    (C(32, 32, 32, 4, 2), C(32, 64, 16, 4, 2)))
        t[(80, "tf32", kp, True)] = (C(32, 64, 32, 4, 3), C(64, 32, 32, 4, 3))
        t[(80, "tf32", kp, False)] = (C(32, 32, 16, 4, 2), C(32, 64, 16, 4, 2) if wide else C(64, 32, 16, 4, 2))
        t[(80, "ieee", kp, True)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
        t[(80, "ieee", kp, False)] = (C(32, 32, 16, 4, 2), C(16, 64, 16, 4, 2))
    return t


ARCHS = (90, 80)  # the architectures the tables are made (and compiled, by knn_kernel.compile_specs) for
_TABLE = _build_table()


def _tune_key(arch, dtype, precision, kp, d, aligned) -> tuple:
    return arch, dtype, precision, kp, d_class(d), aligned


_WINNERS: dict[tuple, Config] = {}  # the autotuner's winners, by _tune_key (the launcher's own record of them)
