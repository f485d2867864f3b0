"""Which autocast dtype `--amp` means on this device, and why: one rule for the trainer, the studies and
the benchmarks.

- CUDA: bf16 where the GPU supports it, else fp16 (the trainer adds loss scaling).
- CPU: bf16 only where the CPU computes it natively (x86: AVX512_BF16 or AMX; Arm: the BF16 extension).
  Elsewhere bf16 autocast is emulated, about 10x slower than fp32 (a ResNet-50 step at batch 32, 64x64:
  5.5 s against 0.52 s on a 2-core EPYC capped to AVX2; 12.4 s against 0.95 s on a user's 2-core CPU without
  AVX512_BF16), so `--amp` runs fp32 there and says so.

`ONEDNN_MAX_CPU_ISA` (oneDNN's own switch) is honoured: capping oneDNN below its bf16 ISA makes bf16
emulated on any CPU, so the probe answers "not native" then too.
"""

from __future__ import annotations

import os
import platform

import torch

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) under which oneDNN has bf16 instructions.
_BF16_ISAS = {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
              "AVX2_VNNI_2", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
              "AVX10_2_512_AMX_2"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """(does this CPU run bf16 natively, what the answer rests on)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in _BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} caps oneDNN below its bf16 instructions"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if probe is not None:
            if probe():
                return True, "the CPU has AVX512_BF16"
            if amx is not None and amx():
                return True, "the CPU has AMX"
            return False, "the CPU has neither AVX512_BF16 nor AMX"
        flags = _cpu_flags()
        if flags & {"avx512_bf16", "amx_bf16"}:
            return True, "the CPU has " + ("AVX512_BF16" if "avx512_bf16" in flags else "AMX")
        return False, "the CPU has neither AVX512_BF16 nor AMX"
    if machine in ("aarch64", "arm64"):
        if "bf16" in _cpu_flags():
            return True, "the CPU has the Arm BF16 extension"
        return False, "the CPU lacks the Arm BF16 extension"
    return False, f"no native bf16 known for {machine or 'this'} CPUs"


def amp_dtype(device: torch.device, amp: bool) -> tuple[torch.dtype | None, str]:
    """The autocast dtype `--amp` gives on `device` (None = fp32), and a one-line reason for the choice."""
    if not amp:
        return None, "amp off: fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "amp: bf16 autocast (the GPU supports bf16)"
        return torch.float16, "amp: fp16 autocast with loss scaling (this GPU has no bf16)"
    native, why = cpu_native_bf16()
    if native:
        return torch.bfloat16, f"amp: bf16 autocast ({why})"
    return None, (f"amp: fp32, not bf16: {why}, so bf16 would be emulated (about 10x slower than fp32); "
                  "--amp takes effect on a GPU or a CPU with native bf16")
