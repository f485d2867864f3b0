"""The native CUDA backend (CMakeLists.txt, kernels/cuda/): it builds with this machine's nvcc and CMake, its
sources agree with the Python table and launcher, it is opt-in with one-line errors, and (GPU) it equals the
PyTorch reference and the Triton kernel step for step, loss scaling and graph replay included.

The build (one architecture, sm_90) goes to a temporary folder once per session; with $SEAL_FAST_CUDA_LIB
naming an existing library (bench/gpu_check.py builds one first) that one is used instead.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused_sgd import (  # the same synthetic parameters, gradients and runs (tests/ is on sys.path)
    ATOL,
    SHAPES_MANY,
    SHAPES_ODD,
    assert_close_to_reference,
    assert_graph_replay_matches_eager,
    clone,
    flat,
    grads_for,
    make_params,
    run,
    set_grads,
    torch_sgd,
    two_groups,
)

from seal_fast.kernels import fused_sgd
from seal_fast.optim import SignedSGD

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "kernels" / "cuda"
TOOLS = shutil.which("cmake") and shutil.which("nvcc")


@pytest.fixture(scope="session")
def native_library(tmp_path_factory) -> Path:
    given = os.environ.get("SEAL_FAST_CUDA_LIB")
    if given:  # a library named by the caller (bench/gpu_check.py's build step): used, never rebuilt here
        if not Path(given).is_file():
            pytest.skip(f"$SEAL_FAST_CUDA_LIB={given} names no file (its build failed or was not run)")
        return Path(given)
    if not TOOLS:
        pytest.skip("cmake and nvcc are needed to build the native backend (installed on this project's machines)")
    from seal_fast.kernels import cuda

    return cuda.build(tmp_path_factory.mktemp("cuda-build"), architectures="90")  # as CI builds it: one arch


@pytest.fixture
def use_library(monkeypatch):
    """use_library(path or None): point kernels.cuda at a library (None: one that does not exist)."""
    from seal_fast.kernels import cuda

    def use(path):
        monkeypatch.setenv("SEAL_FAST_CUDA_LIB", str(path) if path else "/nonexistent/libseal_fast_cuda.so")
        monkeypatch.setattr(cuda, "_loaded", None)
    yield use
    monkeypatch.setattr(cuda, "_loaded", None)


# -- the sources agree with the Python side (no build needed) ----------------------------------------------


def test_record_layout_and_dtype_codes_agree_with_the_python_table():
    header = (CUDA_DIR / "fused_sgd.h").read_text()
    consts = {k: int(v) for k, v in re.findall(r"\b([A-Z_]+) = (\d+)\b", header)}
    python = dict(zip(("PARAM", "GRAD", "BUF", "NUMEL", "GROUP", "RESTART", "SLOT", "START"), range(8)))
    assert {k: consts[k] for k in python} == python
    assert consts["RECORD"] == fused_sgd.RECORD and consts["VECTOR_BYTES"] == fused_sgd.VECTOR_BYTES
    codes = dict(re.findall(r"\b(kFloat32|kBFloat16|kFloat16) = (\d+)", header))
    assert {"kFloat32": torch.float32, "kBFloat16": torch.bfloat16, "kFloat16": torch.float16} == \
        {k: dt for dt, c in fused_sgd._DTYPE_CODE.items() for k, v in codes.items() if int(v) == c}


def test_operator_schemas_in_the_source_are_the_launchers():
    source = (CUDA_DIR / "ops.cpp").read_text()
    defs = re.findall(r'm\.def\(((?:\s*"[^"]*")+)\)', source)
    schemas = {}
    for d in defs:
        text = "".join(re.findall(r'"([^"]*)"', d))
        schemas[text.split("(")[0]] = text
    assert schemas == fused_sgd.NATIVE_SCHEMAS
    impls = set(re.findall(r'm\.impl\("(\w+)"', source))
    assert impls == set(fused_sgd.NATIVE_SCHEMAS)


def test_without_a_build_the_package_works_and_the_backend_says_how_to_build(use_library):
    from seal_fast.config import Config
    from seal_fast.errors import ConfigError
    from seal_fast.models import build_model
    from seal_fast.schedule import build_plan
    from seal_fast.train import make_optimizer

    use_library(None)
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"not built .*make cuda") as err:
        SignedSGD([p], lr=0.1, backend="cuda")
    assert "\n" not in str(err.value)
    SignedSGD([p], lr=0.1, backend="auto").step()  # everything else as before
    cfg = Config(arch="resnet10", generations=1, epochs=2, ascent_epochs=1, warmup=1, sgd_backend="cuda")
    with pytest.raises(ConfigError, match=r"^--sgd-backend cuda: .*make cuda"):
        make_optimizer(build_model(cfg.arch, 10), build_plan(cfg)[0], cfg)


def test_trainer_flag_rejects_an_unknown_backend(cli):
    done = cli("--sgd-backend", "cuda", "--optimizer", "torch", "--dry-run", "--summary")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --sgd-backend cuda picks SignedSGD")
    assert len(done.stderr.strip().splitlines()) == 1


# -- the build ---------------------------------------------------------------------------------------------


def test_cmake_build_registers_the_operators_with_the_launchers_schemas(native_library):
    """The CMake build (sm_90, as CI builds it) loads into this torch and registers exactly the schemas the
    launcher calls; without a GPU, calling it on CPU tensors is refused by the dispatcher, not a crash."""
    code = (f"import torch; torch.ops.load_library({str(native_library)!r}); "
            "ops = torch.ops.seal_fast; "
            "print(ops.fused_sgd_update.default._schema); print(ops.fused_sgd_nonfinite.default._schema)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [f"seal_fast::{s}" for s in fused_sgd.NATIVE_SCHEMAS.values()]


def test_operators_trace_under_fake_tensors(native_library):
    """Meta kernels: torch.compile / export trace the operators with fake CUDA tensors (no GPU needed)."""
    code = (f"import torch; torch.ops.load_library({str(native_library)!r})\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "with FakeTensorMode():\n"
            "    e = lambda *s, **k: torch.empty(*s, device='cuda', **k)\n"
            "    rec = e(5, 8, dtype=torch.int64)\n"
            "    torch.ops.seal_fast.fused_sgd_nonfinite(rec, e(3), e(1), 1, True)\n"
            "    torch.ops.seal_fast.fused_sgd_update(rec, [e(3), e(4)], [e(3), e(4)], e(2, 2), e(3), e(1), 1, True,"
            " True, True, False)\n"
            "print('traced')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "traced", done.stderr[-2000:]


def test_update_operator_declares_and_bumps_what_it_writes(native_library):
    """The update writes the parameters and buffers through the records' addresses; its schema names them
    (Tensor(b!)[] params, Tensor(c!)[] bufs), so a traced function that reads a parameter after the update
    reads the operator's result (AOTAutograd's functionalization: the read hangs off auto_functionalized, and
    the new values are returned to be copied into the inputs), and its ADInplaceOrView kernel bumps the version
    counters of records, params and bufs (found_inf for the non-finite check), as a built-in in-place op does.
    Meta tensors: no GPU.
    (Before the fix the schema named only `records`: the read depended on the input parameter alone.)"""
    code = (f"import torch; torch.ops.load_library({str(native_library)!r})\n"
            "from functorch.compile import aot_function, make_boxed_func\n"
            "m = lambda *s, **k: torch.empty(*s, device='meta', **k)\n"
            "op = torch.ops.seal_fast\n"
            "rec, ps, bs, f = m(5, 8, dtype=torch.int64), [torch.nn.Parameter(m(3)), m(4)], [m(3), m(4)], m(1)\n"
            "with torch.no_grad():\n"
            "    before = [t._version for t in (rec, *ps, *bs, f)]\n"
            "    op.fused_sgd_update(rec, ps, bs, m(2, 2), m(3), f, 1, True, False, False, True)\n"
            "    op.fused_sgd_nonfinite(rec, m(3), f, 1, True)\n"
            "    print([a - b for a, b in zip([t._version for t in (rec, *ps, *bs, f)], before)])\n"
            "def fn(rec, p0, p1, b0, b1, hyper, scalars, found):\n"
            "    op.fused_sgd_update(rec, [p0, p1], [b0, b1], hyper, scalars, found, 0, True, False, False, True)\n"
            "    return p0 * 2\n"
            "graphs = []\n"
            "def keep(gm, _):\n"
            "    graphs.append(gm)\n"
            "    return make_boxed_func(gm.forward)\n"
            "args = (m(5, 8, dtype=torch.int64), m(3), m(4), m(3), m(4), m(2, 2), m(3), m(1))\n"
            "aot_function(fn, fw_compiler=keep)(*args)\n"
            "g = graphs[0].graph\n"
            "mul = next(n for n in g.nodes if n.target == torch.ops.aten.mul.Tensor)\n"
            "src = mul.args[0]\n"
            "print(src.op, src.target.__name__, src.args[0].target.__name__, src.args[1])\n"
            "out = next(n for n in g.nodes if n.op == 'output').args[0]\n"
            "print(sum(1 for o in out if o.target.__name__ == 'getitem'))\n"
            "print(graphs[0].code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[0] == "[1, 1, 1, 1, 1, 1]", done.stdout  # records, params, bufs bumped by the update; found_inf
    # p0 * 2 reads the operator's second base (records, p0, p1, b0, b1): the updated p0, not the input
    assert out[1].startswith("call_function getitem auto_functionalized") and out[1].endswith(" 2"), done.stdout
    assert out[2] == "5", done.stdout  # records, both params and both buffers come back as written inputs


def test_native_step_hands_the_operator_what_it_writes(native_library):
    """native_step's own code on the CPU, with a recording CPU kernel registered in the test for the built
    operator (the real one runs on CUDA only): eagerly it passes empty lists and bumps the version counters of
    every tensor the step writes itself; traced (torch.compile, fullgraph, aot_eager) it is the operator
    seal_fast_sgd::step, which calls the native update with the parameters and buffers it was handed."""
    code = (f"import os, sys\nos.environ['TRITON_INTERPRET'] = '1'\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"os.environ['SEAL_FAST_CUDA_LIB'] = {str(native_library)!r}\n"
            "import torch\n"
            "from seal_fast.kernels import cuda, fused_sgd\n"
            "cuda.load()\n"
            "calls = []\n"
            "lib = torch.library.Library('seal_fast', 'IMPL')\n"
            "def update(records, params, bufs, hyper, scalars, found_inf, dtype, momentum, nesterov, scaled,"
            " aligned):\n"
            "    calls.append((len(params), len(bufs), momentum))\n"
            "lib.impl('fused_sgd_update', update, 'CPU')\n"
            "params, grads = [torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)]\n"
            "bufs = [torch.zeros(5), torch.zeros(3, 2)]\n"
            "t = fused_sgd.make_table(params, grads, bufs, [0, 0], 1)\n"
            "t.set_hyperparameters([0.1], [0.0], 0.9, 0.0)\n"
            "before = [x._version for x in t.written]\n"
            "fused_sgd.native_step(t, grads=grads)\n"
            "print(calls, all(x._version > v for x, v in zip(t.written, before)), len(t.written))\n"
            "calls.clear()\n"
            "def step_then_read():\n"
            "    fused_sgd.native_step(t, grads=grads)\n"
            "    return params[0] * 1\n"
            "torch.compile(step_then_read, fullgraph=True, backend='aot_eager')()\n"
            "print(calls)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().splitlines()
    assert out[-2] == "[(0, 0, True)] True 6", done.stdout  # 2 params, 2 buffers, records, found_inf
    assert out[-1] == "[(2, 2, True)]", done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_built_library_without_a_gpu_is_a_one_line_error(native_library, use_library):
    use_library(native_library)
    from seal_fast.kernels import cuda

    assert cuda.available()  # the library itself loads here
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="CUDA device only.*no usable GPU") as err:  # at construction
        SignedSGD([p], lr=0.1, momentum=0.9, backend="cuda")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_trainer_with_the_built_library_but_no_gpu_says_so_in_one_line(native_library, tiny_data, cli, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("SEAL_FAST_CUDA_LIB", str(native_library))
    done = cli("--data", tiny_data, "--out", tmp_path / "run", "--arch", "resnet10", "--generations", "1",
               "--epochs", "1", "--warmup", "0", "--ascent-epochs", "0", "--workers", "0", "--sgd-backend", "cuda")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --sgd-backend cuda: ") and "CUDA device only" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_kernels_compile_for_sm90_without_spills_and_with_128_bit_accesses():
    """What must stay true of the native kernels, read from kernels/compile_report.py's rows (the Triton kernels'
    facts are tests/test_kernel_static.py): every instantiation compiles without spills, within 64 registers;
    the aligned update moves parameter / gradient / buffer with 128-bit loads and stores in every dtype; no
    access is generic (the addresses come from int64 records, so each access must name global memory)."""
    from seal_fast.kernels import compile_report as kr

    rows = kr.native_rows(90)
    assert all("error" not in r for r in rows), rows
    facts = [json.loads(r["facts"]) for r in rows]
    assert len(rows) == 3 * 3 * 2 * 2 + 3 * 2  # dtype x (plain, momentum, nesterov) x scaled x aligned + checks
    assert {(f["kernel"], f["dtype"], f["aligned"]) for f in facts} == \
        {(k, d, a) for k in ("update", "nonfinite") for d in ("fp32", "bf16", "fp16") for a in (True, False)}
    bad = [r["label"] for r in rows if r["spill_st"] != 0 or r["spill_ld"] != 0 or not r["regs"] <= 64]
    assert not bad, bad
    assert all(r["generic"] == 0 for r in rows), [(r["label"], r["generic"]) for r in rows]
    for r, f in zip(rows, facts):
        if f["kernel"] == "update" and f["aligned"]:
            v4_loads = int(re.search(r"v4:(\d+)", r["ld"]).group(1)) if "v4:" in r["ld"] else 0
            v4_stores = int(re.search(r"v4:(\d+)", r["st"]).group(1)) if "v4:" in r["st"] else 0
            tensors = 3 if f["momentum"] else 2
            assert v4_loads >= tensors and v4_stores >= tensors - 1, (r["label"], r["ld"], r["st"])
            assert r["ld_bits"] == r["st_bits"] == 128, r["label"]


# -- on a GPU: equal to the reference and to Triton --------------------------------------------------------


@pytest.fixture
def native(native_library, use_library):
    use_library(native_library)
    return native_library


def _shapes():
    return SHAPES_ODD + SHAPES_MANY


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("nesterov, dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_native_equals_reference_and_triton_step_for_step(native, dtype, nesterov, dampening):
    """55 steps with a momentum reset at 20 and a sign flip of every group at 35, odd sizes, channels-last
    weights, two groups (ascent without wd, descent with it). fp32 without dampening: bit-identical to the
    PyTorch reference on the GPU (same roundings, same order); otherwise within the project's rule
    (|ours - fp64| <= 2 |torch.optim.SGD - fp64| + atol) and as close to Triton as that rule allows:
    |native - Triton| <= 2 |torch.optim.SGD - fp64| + atol, over all parameters (tests/test_fused_sgd.py says why). (A bound relative to the final values,
    2 eps, was wrong: the two kernels contract different products into FMAs, and 55 steps of momentum carry those
    roundings at the scale of the largest intermediate, not of the result. On an H200, fp32: 1.2e-6 apart on a value
    of 0.37, both kernels within the rule.)"""
    params = make_params(_shapes(), dtype=dtype, channels_last=(5, 6), device="cuda")
    triton_p, ref_p, sgd_p, f64 = clone(params), clone(params), clone(params), clone(params, torch.float64)
    kw = dict(momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=5e-4)
    split = 20
    for ps, backend in ((params, "cuda"), (triton_p, "triton"), (ref_p, "torch")):
        run(SignedSGD(two_groups(ps, split), lr=0.1, backend=backend, **kw), ps, 55, reset_at=(20,),
            lr_change_at=35)
    run(torch_sgd(two_groups(sgd_p, split), **kw), sgd_p, 55, reset_at=(20,), lr_change_at=35)
    run(torch_sgd(two_groups(f64, split), **kw), f64, 55, reset_at=(20,), lr_change_at=35)
    assert_close_to_reference(params, sgd_p, f64, dtype)
    assert_close_to_reference(triton_p, sgd_p, f64, dtype)
    if dtype == torch.float32 and dampening == 0.0:
        for a, b in zip(params, ref_p):
            assert torch.equal(a, b), (a - b).abs().max().item()
    apart = (flat(params) - flat(triton_p)).abs().max().item()
    torch_err = (flat(sgd_p) - flat(f64)).abs().max().item()
    assert apart <= 2 * torch_err + ATOL[dtype], (apart, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_native_loss_scaling_skips_and_applies_like_triton(native, dtype):
    """step(inv_scale=...) with an inf gradient stores nothing (params, buffers, pending restarts), a finite
    one applies; the native and Triton backends agree through a skip, and GradScaler drives both."""
    params = make_params(SHAPES_ODD, dtype=dtype, device="cuda")
    twin = clone(params)
    opts = [SignedSGD(two_groups(ps, 3), lr=0.1, momentum=0.9, backend=b) for ps, b in ((params, "cuda"),
                                                                                          (twin, "triton"))]
    inv = torch.tensor([0.25], device="cuda")
    for step in range(8):
        bad = 2 if step in (0, 5) else None  # the first step skipped: the restart stays pending
        for ps, opt in zip((params, twin), opts):
            set_grads(ps, grads_for(step, ps, bad=bad), scale=4.0)
            before = [p.detach().clone() for p in ps]
            opt.step(inv_scale=inv)
            if bad is not None:
                assert opt.found_inf_flag.item() == 1
                assert all(torch.equal(p, b) for p, b in zip(ps, before))
                if step == 0:
                    assert all(opt._table.pending())
        for a, b in zip(params, twin):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=ATOL[dtype])


@pytest.mark.gpu
def test_native_graph_replay_with_new_hyperparameters_matches_eager(native):
    assert_graph_replay_matches_eager("cuda")


def _fp32_table(dampening: float):
    """(table, params, grads) over SHAPES_ODD on the GPU: fp32, one group, momentum 0.9, the step-0 gradients."""
    params = [p.detach() for p in make_params(SHAPES_ODD, device="cuda")]
    grads = [g.to(device="cuda", dtype=torch.float32) for g in grads_for(0, params)]
    bufs = [torch.zeros_like(p) for p in params]
    t = fused_sgd.make_table(params, grads, bufs, [0] * len(params), 1)
    t.set_hyperparameters([0.1], [5e-4], 0.9, dampening)
    return t, params, grads


@pytest.mark.gpu
def test_native_operator_under_torch_compile_equals_eager(native):
    """torch.compile(fullgraph=True) of a function that calls the operator: the same update as calling it
    eagerly (the operator is opaque to the compiler, and the schema's mutation keeps it in the graph)."""
    from seal_fast.kernels import cuda

    cuda.load()
    tables = [_fp32_table(dampening=0.0) for _ in range(2)]

    def update(records, params, bufs, hyper, scalars, found_inf, aligned: bool):
        torch.ops.seal_fast.fused_sgd_update(records, params, bufs, hyper, scalars, found_inf, 0, True, False, False,
                                             aligned)
        return torch.cat([p.flatten() for p in params])

    compiled = torch.compile(update, fullgraph=True)
    for (t, params, _), fn in zip(tables, (update, compiled)):
        for s, rec in zip(t.segments, t.views):
            read = fn(rec, params, t.bufs, t.hyper, t.scalars, t.found_inf, s.aligned)
            assert torch.equal(read, torch.cat([p.flatten() for p in params]))  # the read follows the update
    torch.cuda.synchronize()
    for a, b in zip(tables[0][1], tables[1][1]):
        assert torch.equal(a, b)
    assert tables[1][0].pending() == [False] * len(tables[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_native_step_under_torch_compile_reads_the_update(native, compiler):
    """fused_sgd.native_step in a compiled function (fullgraph) that then reads the parameters: the same
    parameters as native_step run eagerly, and the read sees them (the step is traced as seal_fast_sgd::step,
    which declares its writes; aot_eager hands it copies, which it updates). Also: eager native_step bumps the
    version counters, so autograd refuses a backward through a weight it changed."""
    torch._dynamo.reset()
    tables = [_fp32_table(dampening=0.3) for _ in range(2)]
    t, params, grads = tables[1]

    def update_then_read():
        fused_sgd.native_step(t, grads=grads)
        return torch.cat([p.flatten() for p in params])

    fn = torch.compile(update_then_read, fullgraph=True, backend=compiler)
    for step in range(3):
        fused_sgd.native_step(tables[0][0], grads=tables[0][2])
        got = fn()
        torch.cuda.synchronize()
        want = torch.cat([p.flatten() for p in tables[0][1]])
        assert torch.equal(got, want) and torch.equal(torch.cat([p.flatten() for p in params]), want), step
    w = torch.nn.Parameter(torch.linspace(-1, 1, 6, device="cuda"))
    opt = SignedSGD([w], lr=0.1, momentum=0.9, backend="cuda")
    w.grad = torch.ones_like(w)
    y = (w * w).sum()
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
