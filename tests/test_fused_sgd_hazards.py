"""The fused SGD kernels (kernels/fused_sgd.py, kernels/cuda/fused_sgd.cu) against hazards the step-by-step
comparisons with torch.optim.SGD cannot meet: special floating-point values at the narrowing to bf16 / fp16,
warps of one program racing on the RESTART flag (read on the compiled sm_90 code: no GPU needed), weight
decay 0 times an infinite weight, and tensors that share memory (every chunk is updated concurrently).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from seal_fast.kernels import fused_sgd
from seal_fast.kernels.fused_sgd import _narrow

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# -- 1. narrowing fp32 -> bf16 / fp16: every special bit pattern -----------------------------------------------


@triton.jit
def _narrow_bits(src, dst, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = the bits of _narrow(the fp32 whose bits are src[i]): the kernel's own conversion code."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(src + i, mask=m, other=0).to(tl.float32, bitcast=True)
    tl.store(dst + i, _narrow(x, DTYPE).to(tl.int16, bitcast=True), mask=m)


def _special_fp32_bits() -> list[int]:
    """NaNs of both signs (0x7FFFFFFF, the GPU's canonical NaN; 0x7FC00000; signalling 0x7F800001 / 0x7FBFFFFF;
    NaNs whose rounding would carry into the exponent or the sign), +-inf, +-0, the largest finite values
    (round to inf in bf16 / fp16, or just not), denormals of fp32 and of fp16, and ties to even."""
    base = [
        0x7FFFFFFF, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7F808000, 0x7F80FFFF, 0x7FFF8000, 0x7FFF7FFF,  # NaN
        0x7F800000, 0x00000000,                                                                   # inf, 0
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7E8000, 0x7F7E8001,      # bf16 overflow / max finite / ties
        0x477FEFFF, 0x477FF000, 0x477FE000, 0x477FE001, 0x477FDFFF,      # fp16: 65519.996.., 65520 (-> inf), 65504
        0x00000001, 0x007FFFFF, 0x00008000, 0x00018000, 0x00008001, 0x007F8000, 0x00800000,  # fp32 denormals
        0x33800000, 0x33000000, 0x33000001, 0x33C00000, 0x387FC000, 0x38800000,  # fp16 denormals, ties, min normal
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F801000, 0x3F803000, 0x3F800FFF,  # ties at 1.0
    ]
    return base + [b | 0x80000000 for b in base]  # both signs of everything


def _narrow_with_the_kernel(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = bits.numel()
    out = torch.empty(n, dtype=torch.int16, device=bits.device)
    block = 1024
    _narrow_bits[(triton.cdiv(n, block),)](bits, out, n, DTYPE=fused_sgd._DTYPE_CODE[dtype], BLOCK=block)
    return out


def _as_int32(values: list[int]) -> torch.Tensor:
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's fp16 cast, to inf
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_narrowing_matches_torch_bit_for_bit_on_every_special_value(dtype, device):
    """_narrow (run by a small kernel on loaded bit patterns: under the interpreter on CPU, compiled on a GPU)
    equals torch's .to(dtype) bit for bit on every non-NaN input: specials, ties, overflow, denormals, 65536
    random patterns. Every NaN stays a NaN: in bf16 the kernel gives 0x7FFF for all of them (CUDA's canonical
    NaN: what torch on CUDA and the native kernel give; torch on CPU gives 0xFFFF from its vectorized path,
    0x7FC0 from its scalar one). Before the fix, 0x7FFFFFFF came out -0.0, 0xFFFFFFFF +0.0, 0x7F800001 +inf."""
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(1 << 31), 1 << 31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    bits = torch.cat([_as_int32(_special_fp32_bits()), rand])
    x = bits.view(torch.float32)
    got = _narrow_with_the_kernel(bits.to(device), dtype).cpu()
    nan = torch.isnan(x)
    lost = nan & ~torch.isnan(got.view(dtype).float())
    assert not lost.any(), "NaN (fp32 bits) narrowed to a number (bits): " + ", ".join(
        f"{b & 0xFFFFFFFF:#010x} -> {o & 0xFFFF:#06x}" for b, o in zip(bits[lost].tolist()[:12], got[lost].tolist()))
    want = x.to(dtype).view(torch.int16)  # torch on the CPU
    bad = (got != want) & ~nan
    assert not bad.any(), "fp32 bits -> torch's bits, the kernel's bits: " + ", ".join(
        f"{b & 0xFFFFFFFF:#010x} -> {w & 0xFFFF:#06x}, {o & 0xFFFF:#06x}"
        for b, w, o in zip(bits[bad].tolist()[:12], want[bad].tolist(), got[bad].tolist()))
    if dtype == torch.bfloat16:
        assert got[nan].eq(0x7FFF).all(), sorted({hex(v & 0xFFFF) for v in got[nan].tolist()})
    if device == "cuda":  # torch on the GPU: the same bits for everything, NaNs included
        assert torch.equal(got, x.to(device).to(dtype).view(torch.int16).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_nan_gradient_makes_nan_bf16_weights_not_zeros(backend, device):
    """A diverging bf16 run must show NaN: a NaN gradient gives NaN weights and buffers, never +-0. (Before the
    fix a GPU zeroed them: its arithmetic makes every NaN 0x7FFFFFFF, which the rounding carried into -0.0. On
    the CPU the interpreter's numpy keeps the gradient's payload, 0x7FC00000, which rounded to a NaN: only the
    test above shows the bug without a GPU.)"""
    from seal_fast.optim import SignedSGD

    p = torch.nn.Parameter(torch.linspace(-1, 1, 40, device=device).to(torch.bfloat16))
    opt = SignedSGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    p.grad.fill_(float("nan"))
    opt.step()
    assert torch.isnan(p.detach().float()).all() and torch.isnan(opt.state[p]["momentum_buffer"].float()).all()


# -- 2. RESTART: read by every warp, cleared by one thread ------------------------------------------------------


def _source_line(fn, needle: str) -> int:
    """The line number (in its file) of the one line of `fn`'s source that contains `needle`."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, text in enumerate(lines) if needle in text]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def _no_cuda_compiler() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(90)
    except Exception as e:  # noqa: BLE001 - no nvidia backend at all
        return f"Triton has no usable CUDA backend here: {type(e).__name__}: {e}"
    if tool is None or not tool.path or not os.path.exists(tool.path):
        return "Triton's ptxas is missing: cannot compile for CUDA on this machine"
    return None


# the momentum configurations whose code differs in the RESTART handling: scaled or not, aligned or not, and the
# other dtypes / Nesterov once each
RESTART_LABELS = [
    "fused_sgd update fp32 momentum aligned", "fused_sgd update fp32 momentum unaligned",
    "fused_sgd update fp32 momentum scaled aligned", "fused_sgd update fp32 momentum scaled unaligned",
    "fused_sgd update bf16 nesterov scaled aligned", "fused_sgd update fp16 nesterov unaligned",
]


def _triton_ptx(labels: list[str]) -> dict[str, str]:
    """The sm_90 PTX of the named compile_specs() configurations, compiled in a subprocess without
    TRITON_INTERPRET (the conftest sets it, and then @triton.jit makes interpreter functions)."""
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from seal_fast.kernels import fused_sgd\n"
            "want = set(json.loads(sys.argv[1]))\n"
            "out = {s.label: s.compile(90).asm['ptx'] for s in fused_sgd.compile_specs() if s.label in want}\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(labels)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_BARRIER = re.compile(r"^\s*(@!?%p\d+\s+)?(bar\.sync|barrier\.sync|bar\.cta\.sync|barrier\.cta\.sync)\b")


def restart_order(ptx: str, load_line: int, store_line: int, source: str) -> dict:
    """Positions (PTX line numbers) of the global loads issued for source line `load_line`, the global stores
    for `store_line` (both of file `source`), and of every barrier, with whether a barrier is predicated
    (the PTX's source locations as the static report reads them: ptx_facts.ptx_lines)."""
    from seal_fast.kernels.ptx_facts import ptx_lines

    loads, stores, barriers = [], [], []
    for i, line, loc in ptx_lines(ptx):
        b = _BARRIER.match(line)
        if b:
            barriers.append((i, bool(b.group(1))))
            continue
        if loc is None or not loc[0].endswith(source):
            continue
        if re.search(r"(?<![\w.])ld\.global", line) and loc[1] == load_line:
            loads.append(i)
        elif re.search(r"(?<![\w.])st\.global", line) and loc[1] == store_line:
            stores.append(i)
    return {"loads": loads, "stores": stores, "barriers": barriers}


def test_restart_flag_is_cleared_only_after_every_warp_read_it():
    """Every warp of a program loads rec[RESTART]; one thread stores the cleared flag. In the compiled sm_90
    code of every momentum configuration (scaled or not, aligned or not) an unpredicated bar.sync must sit
    between the last load of the flag and its store, else a late warp can read the cleared flag and apply
    momentum to a buffer that restarts (harmless only while dampening is 0 and restarted buffers are zero).
    The interpreter runs a program as one unit, so only the compiled code can show this; no GPU is needed."""
    reason = _no_cuda_compiler()
    if reason:
        pytest.skip(reason)
    kernel = fused_sgd._fused_sgd_kernel
    fn = getattr(kernel, "fn", kernel)
    load_line = _source_line(fn, "restart = tl.load(rec + _RESTART)")
    store_lines = [_source_line(fn, "tl.store(rec + _RESTART, tl.where(apply, 0, restart))"),
                   _source_line(fn, "tl.store(rec + _RESTART, 0)")]
    ptx = _triton_ptx(RESTART_LABELS)
    assert set(ptx) == set(RESTART_LABELS)
    for label, text in ptx.items():
        store_line = store_lines[0] if " scaled " in label else store_lines[1]
        o = restart_order(text, load_line, store_line, "fused_sgd.py")
        assert o["loads"] and o["stores"], (label, o)
        between = [i for i, predicated in o["barriers"] if max(o["loads"]) < i < min(o["stores"]) and not predicated]
        assert between, f"{label}: no bar.sync between the RESTART load (PTX line {max(o['loads'])}) and its " \
                        f"store (line {min(o['stores'])}); barriers at {o['barriers']}"


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_native_kernel_clears_restart_only_after_every_thread_read_it(tmp_path):
    """The same in the native twin (nvcc, sm_90 PTX): in every momentum instantiation a bar.sync between
    ld.global [rec+40] (RESTART = field 5 of 8-byte fields) and st.global [rec+40]."""
    ptx_path = tmp_path / "fused_sgd.ptx"
    done = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-ptx",
                           str(ROOT / "kernels" / "cuda" / "fused_sgd.cu"), "-o", str(ptx_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    offset = fused_sgd.RESTART * 8
    checked = 0
    for body in re.split(r"\.entry\s+", ptx_path.read_text())[1:]:
        name = body.split("(")[0]
        m = re.search(r"fused_sgd_kernelI(?:f|6__half|13__nv_bfloat16)Lb([01])E", name)
        if not m or m.group(1) != "1":  # updates with momentum only
            continue
        lines = body.splitlines()
        loads = [i for i, s in enumerate(lines) if re.search(rf"\bld\.global\S*\s+%rd\d+,\s*\[%rd\d+\+{offset}\]", s)]
        stores = [i for i, s in enumerate(lines) if re.search(rf"\bst\.global\S*\s+\[%rd\d+\+{offset}\]", s)]
        bars = [i for i, s in enumerate(lines) if _BARRIER.match(s.split("//")[0]) and "@" not in s.split("bar")[0]]
        assert loads and stores, name
        assert any(max(loads) < b < min(stores) for b in bars), name
        checked += 1
    assert checked == 3 * 2 * 2 * 2  # dtype x nesterov x scaled x aligned


# -- beyond the list: weight decay 0 and an infinite weight; tensors sharing memory -------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # the discarded 0 * inf
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_weight_decay_adds_no_term(backend, device):
    """torch.optim.SGD adds no weight-decay term when weight_decay is 0 (and the native kernel skips it): an
    infinite weight stays infinite instead of becoming NaN through 0 * inf, and a -0.0 gradient stays -0.0."""
    from seal_fast.optim import SignedSGD

    from test_fused_sgd import torch_sgd

    def make():
        return [torch.nn.Parameter(torch.tensor([float("inf"), -float("inf"), 1.0, -0.0, 2.0], device=device)),
                torch.nn.Parameter(torch.tensor([3.0, -float("inf"), 0.5], device=device))]

    ours, theirs = make(), make()
    groups = lambda ps: [{"params": ps[:1], "lr": -0.1, "weight_decay": 0.0},  # noqa: E731
                         {"params": ps[1:], "lr": 0.1, "weight_decay": 0.0}]
    a = SignedSGD(groups(ours), lr=0.1, momentum=0.9, backend=backend)
    b = torch_sgd(groups(theirs), momentum=0.9)
    for step in range(3):
        for ps in (ours, theirs):
            ps[0].grad = torch.tensor([0.5, 0.25, -0.0, -0.0, 1.0], device=device) * (step + 1)
            ps[1].grad = torch.tensor([1.0, 2.0, -0.0], device=device)
        a.step()
        b.step()
        for x, y in zip(ours, theirs):
            bx, by = a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"]
            for u, v in ((x, y), (bx, by)):  # weights and buffers: the same values, signs of zeros included
                assert torch.equal(torch.signbit(u), torch.signbit(v)) and torch.equal(u.isnan(), v.isnan()), (u, v)
                torch.testing.assert_close(u, v, rtol=0, atol=1e-6)
    assert not any(torch.isnan(p).any() for p in ours)


def test_tensors_that_share_memory_are_refused():
    """Every chunk is updated by its own program, all at once: two parameters (or buffers) over the same
    memory, or a gradient over a parameter, would be a race (torch.optim.SGD updates such tensors one after
    the other). make_table refuses them; disjoint views of one storage are fine."""
    from seal_fast.kernels.fused_sgd import make_table

    flat = torch.zeros(100)
    a, b = flat[0:60], flat[40:100]  # overlap in 40..59
    g = [torch.zeros(60), torch.zeros(60)]
    with pytest.raises(ValueError, match="share memory"):
        make_table([a, b], g, None, [0, 0], 1)
    with pytest.raises(ValueError, match="share memory"):  # the same tensor twice
        make_table([a, a], g, None, [0, 0], 1)
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):  # a gradient aliasing a parameter
        make_table([p], [p], None, [0], 1)
    with pytest.raises(ValueError, match="share memory"):  # a momentum buffer over another parameter
        q = torch.zeros(20)
        make_table([q[:10], q[10:]], [torch.zeros(10), torch.zeros(10)], [q[10:], torch.zeros(10)], [0, 0], 1)
    # disjoint views of one storage (a flat parameter buffer, DDP's gradient buckets) and shared gradients
    grads = torch.zeros(100)
    t = make_table([flat[:40], flat[40:]], [grads[:40], grads[:60]], [torch.zeros(40), torch.zeros(60)], [0, 0], 1)
    assert len(t.params) == 2
    make_table([torch.zeros(0), torch.zeros(0)], [torch.zeros(0), torch.zeros(0)], None, [0, 0], 1)  # empty: no bytes
