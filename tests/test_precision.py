"""`--amp` on a CPU: bf16 only where the CPU runs it natively, else fp32 and a line that says so."""

import json

import pytest
import torch

from seal_fast import precision, train

CPU = torch.device("cpu")


def fake_x86(monkeypatch, avx512_bf16: bool, amx: bool = False):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_cpu_without_native_bf16_runs_fp32_and_says_why(monkeypatch):
    fake_x86(monkeypatch, avx512_bf16=False)
    dtype, why = precision.amp_dtype(CPU, True)
    assert dtype is None
    assert why.startswith("amp: fp32, not bf16") and "neither AVX512_BF16 nor AMX" in why and "emulated" in why


@pytest.mark.parametrize("avx512_bf16, amx, word", [(True, False, "AVX512_BF16"), (False, True, "AMX")])
def test_cpu_with_native_bf16_keeps_bf16(monkeypatch, avx512_bf16, amx, word):
    fake_x86(monkeypatch, avx512_bf16, amx)
    dtype, why = precision.amp_dtype(CPU, True)
    assert dtype == torch.bfloat16 and word in why


def test_onednn_isa_cap_below_bf16_means_not_native(monkeypatch):
    fake_x86(monkeypatch, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    dtype, why = precision.amp_dtype(CPU, True)
    assert dtype is None and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert precision.amp_dtype(CPU, True)[0] == torch.bfloat16


@pytest.mark.parametrize("features, native", [("fp asimd bf16 sve", True), ("fp asimd sve", False)])
def test_arm_reads_the_bf16_feature(monkeypatch, features, native):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set(features.split()))
    assert (precision.amp_dtype(CPU, True)[0] == torch.bfloat16) is native


def test_amp_off_is_fp32_everywhere(monkeypatch):
    fake_x86(monkeypatch, avx512_bf16=True)
    assert precision.amp_dtype(CPU, False)[0] is None


def test_the_real_probe_answers():
    native, why = precision.cpu_native_bf16()
    assert isinstance(native, bool) and why


def test_trainer_amp_on_a_cpu_without_bf16_trains_fp32_and_says_so_first(tiny_data, tmp_path, capsys, monkeypatch):
    """The demo's shape (no --data, --amp) with the probe forced to 'no native bf16': the third line names the
    choice and the run is fp32 (the device line says so)."""
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: (False, "the CPU has neither AVX512_BF16 nor AMX"))
    monkeypatch.setattr(train, "ensure_synthetic", lambda: (tiny_data, False))
    out = tmp_path / "run"
    code = train.main(["--amp", "--channels-last", "--method", "normal", "--arch", "resnet10", "--generations", "1",
                       "--epochs", "1", "--warmup", "0", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                       "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "built-in synthetic dataset" in lines[0] and lines[1].startswith("demo schedule")
    assert lines[2].startswith("amp: fp32, not bf16: the CPU has neither AVX512_BF16 nor AMX"), lines[:3]
    assert any(line.startswith("device cpu, fp32, channels-last True") for line in lines), lines
    assert json.loads((out / "config.json").read_text())["amp"] is True  # the request is kept; the device decides
