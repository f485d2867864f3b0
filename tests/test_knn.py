"""kernels.knn against the brute-force reference: odd shapes, dtypes, ties, self-exclusion, memory, voting,
64-bit addressing, the configuration tables and their autotuner."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import seal_fast.kernels.knn as knn
import seal_fast.kernels.knn_configs as knn_configs
from seal_fast.kernels.knn import MAX_K, default_splits, empty_topk, knn_predict, knn_topk, merge_topk, vote
from seal_fast.kernels.reference import knn_topk_ref

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}  # of distances, on top of 2x torch's error


def true_dist(queries, support, idx, metric):
    """fp64 distance of each returned (query, index) pair, from the inputs' own values."""
    q, x = queries.double(), support.double()[idx.clamp(min=0)]          # [Q, D], [Q, k, D]
    if metric == "cosine":
        cos = (x @ q[:, :, None]).squeeze(2) / (q.norm(dim=1).clamp_min(1e-8)[:, None] * x.norm(dim=2).clamp_min(1e-8))
        return 1 - cos
    return (x - q[:, None, :]).pow(2).sum(2).sqrt()


def torch_fp32_error(queries, support, metric, ref_d, ref_i) -> float:
    """PyTorch's own fp32 error on the oracle's neighbours: torch.cdist (l2; the |q|^2 - 2 q.x + |x|^2 product
    form above 25 rows, like the kernel) or a normalized matrix product (cosine), against the fp64 oracle's
    distances. The tolerance's scale: the rounding of fp32 arithmetic on these inputs, from code that is not
    under test (a bug in the project's own fallback must not loosen the check on the kernel)."""
    q, x = queries.float(), support.float()
    if metric == "cosine":
        d = 1 - F.normalize(q, dim=1, eps=1e-8) @ F.normalize(x, dim=1, eps=1e-8).T
    else:
        d = torch.cdist(q, x)
    got = d.gather(1, ref_i.clamp(min=0).to(d.device)).cpu()
    ok = (ref_i >= 0).cpu() & torch.isfinite(ref_d).cpu()
    return torch.where(ok, (got - ref_d.cpu()).abs(), 0).max().item()


def check_against_reference(queries, support, k, metric="l2", exclude=None, **kw):
    dist, idx = knn_topk(queries, support, k, metric, exclude, **kw)
    ref_d, ref_i = knn_topk_ref(queries, support, k, metric, exclude)               # fp64
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    finite = ref_d[torch.isfinite(ref_d)]
    tol = 2 * torch_fp32_error(queries, support, metric, ref_d, ref_i) + \
        ATOL[queries.dtype] * (1 + (finite.abs().max().item() if finite.numel() else 0))
    assert (dist - ref_d).abs().max().item() <= tol
    # every returned index really is at the distance of its rank (near-ties may swap, nothing else)
    assert (true_dist(queries, support, idx, metric) - ref_d.double()).abs().max().item() <= tol
    assert (idx >= 0).all() and (idx < support.shape[0]).all()
    assert all(len(set(row.tolist())) == k for row in idx)                              # no repeats
    assert (dist[:, 1:] >= dist[:, :-1]).all()                                          # nearest first
    return dist, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("q,n,d,k,splits", [(1, 1, 1, 1, None), (17, 129, 45, 5, None), (33, 300, 3, 30, 3),
                                            (5, 2**6 + 17, 2**7 + 17, 64, 2), (40, 97, 16, 1, 4)])
def test_topk_matches_reference(dtype, metric, q, n, d, k, splits):
    g = torch.Generator().manual_seed(q * 1000 + n + d)
    queries = torch.randn(q, d, generator=g).to(dtype)
    support = (torch.randn(n, d, generator=g) * 2 + 0.5).to(dtype)
    check_against_reference(queries, support, k, metric, splits=splits)


def test_large_feature_dimension():
    """D = 65,536 + 17 (a flattened early-layer map): many BLOCK_D steps, a ragged last one."""
    g = torch.Generator().manual_seed(1)
    support = torch.randn(24, 2**16 + 17, generator=g).to(torch.bfloat16)
    queries = (support[:3].float() + 0.3 * torch.randn(3, 2**16 + 17, generator=g)).to(torch.bfloat16)
    _, idx = check_against_reference(queries, support, 5)
    assert idx[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_and_equal_distances_are_exact(dtype):
    """Small integers: every distance is exact in every dtype, so ties are real; they go to the lower index."""
    g = torch.Generator().manual_seed(2)
    support = torch.randint(0, 3, (150, 6), generator=g).to(dtype)
    support[100:] = support[:50]                                     # exact duplicate points
    queries = torch.randint(0, 3, (21, 6), generator=g).to(dtype)
    for metric in ("l2",):
        dist, idx = knn_topk(queries, support, 40, metric, splits=3)
        ref_d, ref_i = knn_topk_ref(queries, support, 40, metric)
        assert torch.equal(idx, ref_i)
        assert torch.equal(dist, ref_d)
    assert (dist[:, 1:] == dist[:, :-1]).any()                       # the case really has ties


def test_exclude_self_when_probing_training_points():
    g = torch.Generator().manual_seed(3)
    support = torch.randn(90, 12, generator=g)
    support[60:70] = support[0:10]                                   # a twin of some points is still a neighbour
    own = torch.arange(90)
    dist, idx = check_against_reference(support, support, 8, exclude=own, splits=2)
    assert not (idx == own[:, None]).any()
    assert (idx[:10, 0] == torch.arange(60, 70)).all()
    # the twin's distance is 0 up to the |q|^2 - 2 q.x + |x|^2 cancellation (~1e-6 squared), amplified by sqrt
    assert (dist[:10, 0] < 3e-3).all()
    # -1 (or an index outside the support) excludes nothing
    none = torch.full((90,), -1, dtype=torch.int64)
    _, idx = knn_topk(support, support, 3, exclude=none)
    expected = torch.arange(90)
    expected[60:70] = torch.arange(10)                               # the twin at the lower index wins the tie
    assert torch.equal(idx[:, 0], expected)


def test_pad_returns_missing_neighbours():
    support = torch.randn(4, 8)
    dist, idx = knn_topk(support, support, 4, exclude=torch.arange(4), pad=True)
    assert (idx[:, 3] == -1).all() and torch.isinf(dist[:, 3]).all()
    assert (idx[:, :3] >= 0).all()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(24, 160, generator=g)
    queries = base.T[:, ::2][:50]           # [50, 12] with strides (1, 320)
    support = torch.randn(100, 24, generator=g).T.contiguous().T   # [100, 24] column-major
    check_against_reference(queries, support[:, ::2], 6)


def test_max_k():
    g = torch.Generator().manual_seed(5)
    support = torch.randn(300, 7, generator=g)
    check_against_reference(support[:9] + 0.1, support, MAX_K)


def test_torch_backend_matches_triton():
    g = torch.Generator().manual_seed(6)
    queries, support = torch.randn(30, 20, generator=g), torch.randn(200, 20, generator=g)
    a = knn_topk(queries, support, 10, backend="triton")
    b = knn_topk(queries, support, 10, backend="torch")
    assert torch.equal(a[1], b[1])
    assert torch.allclose(a[0], b[0], atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (dict(k=11), "only 10 points"),
    (dict(k=0), "between 1 and"),
    (dict(k=MAX_K + 1), "between 1 and"),
    (dict(support=torch.randn(10, 5)), "4 features but the support has 5"),
    (dict(queries=torch.randn(0, 4)), "empty input"),
    (dict(support=torch.randn(10, 4).half()), "share one dtype"),
    (dict(metric="dot"), "choose 'l2' or 'cosine'"),
    (dict(exclude=torch.arange(3)), "exclude must be an int64 tensor of shape [6]"),
    (dict(queries=torch.randn(6)), "must be 2-D"),
])
def test_clear_errors(bad, message):
    kw = dict(queries=torch.randn(6, 4), support=torch.randn(10, 4), k=3)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        knn_topk(**kw)


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an out-of-place aten op returns (in-place ops such as
    the interpreter's set_/copy_ of the arguments' own storage allocate nothing and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_allocates_query_by_support():
    q, n = 40, 2000
    queries, support = torch.randn(q, 8), torch.randn(n, 8)
    with LargestAllocation() as seen:
        knn_topk(queries, support, 30, splits=2, backend="triton")
    assert seen.largest <= q * 2 * 32 < q * n // 10      # keys: Q x splits x next_pow2(k)
    with LargestAllocation() as control:                 # the check does see a Q x N matrix when one is built
        knn_topk(queries, support, 30, backend="torch")
    assert control.largest >= q * n


def test_vote_ties_go_to_the_nearest_tied_class():
    labels = torch.tensor([[2, 1, 1, 2, 0],      # 1 and 2 tie (2 each): 2 is nearer
                           [0, 1, 1, 2, 2],      # 1 and 2 tie: 1 is nearer
                           [3, 3, 0, 0, 0],      # 0 wins outright
                           [4, -1, -1, -1, -1],  # missing neighbours do not vote
                           [1, 0, -1, 0, 1]])    # 0 and 1 tie: 1 is nearest
    assert vote(labels, 5).tolist() == [2, 1, 0, 4, 1]


def test_knn_predict_on_clusters():
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(5, 16, generator=g) * 10
    labels = torch.arange(5).repeat_interleave(40)
    support = centers[labels] + torch.randn(200, 16, generator=g)
    queries = centers.repeat(3, 1) + torch.randn(15, 16, generator=g)
    pred = knn_predict(queries, support, labels, k=30, num_classes=5)
    assert pred.tolist() == list(range(5)) * 3
    # a wrong label on the nearest neighbours cannot outvote the other 29
    noisy = labels.clone()
    noisy[knn_topk(queries[:1], support, 3)[1][0]] = 4
    assert knn_predict(queries[:1], support, noisy, k=30, num_classes=5).item() == 0
    with pytest.raises(ValueError, match="labels"):
        knn_predict(queries, support, labels[:-1], k=3, num_classes=5)


def test_default_splits_fill_the_gpu_within_the_memory_bound():
    """The lists of the default slices stay within 1/40 of a Q x N fp32 distance matrix (the GPU test below allows
    1/20 for everything knn_topk allocates); at the depth study's size they still give 4 programs per SM. On an
    H200 (132 SMs) the GPU test's size once took 33 slices: 7.9 MB of keys, twice with a reordering copy."""
    for q, n, k, block_q, block_n in ((1000, 20_000, 30, 64, 128), (1000, 20_000, 30, 32, 64),
                                      (10_000, 100_000, 30, 64, 128), (5, 1_000_000, 64, 64, 64)):
        q_blocks = -(-q // block_q)
        s = default_splits(q_blocks, n, k, block_n, sms=132)
        assert 1 <= s and q * s * k * 8 <= q * n * 4 / 40, (q, n, k, s)
    assert default_splits(157, 100_000, 30, 128, sms=132) * 157 >= 4 * 132   # the depth study: the GPU is full
    assert default_splits(1, 10, 30, 128, sms=132) == 1 and default_splits(16, 20_000, 30, 128, sms=0) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference_and_memory(dtype):
    g = torch.Generator().manual_seed(8)
    queries = torch.randn(1000, 2048 + 17, generator=g).to(dtype).cuda()
    support = torch.randn(20_000, 2048 + 17, generator=g).to(dtype).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_reference(queries[:200], support, 30)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    knn_topk(queries, support, 30)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 0.05 * queries.shape[0] * support.shape[0] * 4


# -- the selection: threshold filter, merge rounds, passes --------------------------------------------------------

@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_adversarial_support_orders(order):
    """Support sorted by distance to the queries' common centre: descending, every tile improves every row's
    list (the merge runs its most rounds per tile); ascending, no tile after the first has a candidate (the
    threshold filter skips them all). Integer coordinates: every distance exact, so the result is exact."""
    g = torch.Generator().manual_seed(11)
    support = torch.randint(-6, 7, (257, 5), generator=g).float()
    queries = torch.randint(-1, 2, (19, 5), generator=g).float()
    far = support.pow(2).sum(1)
    support = support[torch.sort(far, descending=order == "descending", stable=True).indices]
    for k in (1, 7, 30):
        dist, idx = knn_topk(queries, support, k, splits=2)
        ref_d, ref_i = knn_topk_ref(queries, support, k)
        assert torch.equal(idx, ref_i), (order, k)
        assert torch.allclose(dist, ref_d, rtol=1e-6, atol=0)  # exact squares; fp32 vs fp64 sqrt may differ 1 ulp


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_across_tile_and_slice_boundaries(dtype):
    """Runs of identical support rows that straddle the 32-column tiles (interpreter tiles) and the slices: the
    lower index must win every tie, also when the tie is between the list and a later tile."""
    g = torch.Generator().manual_seed(12)
    base = torch.randint(0, 2, (12, 4), generator=g)
    support = base[torch.arange(2**7 + 17) % 12].to(dtype)                 # every row repeats ~12 times
    queries = torch.randint(0, 2, (13, 4), generator=g).to(dtype)
    for k, splits in ((5, 1), (23, 3), (40, 4)):
        dist, idx = knn_topk(queries, support, k, splits=splits)
        ref_d, ref_i = knn_topk_ref(queries, support, k)
        assert torch.equal(idx, ref_i), (k, splits)
        assert torch.allclose(dist, ref_d, rtol=1e-6, atol=0)
    assert (dist[:, 1:] == dist[:, :-1]).sum() > dist.numel() // 2          # mostly ties indeed


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_large_k_passes_with_ties_at_the_pass_boundary(metric):
    """k > 64 runs in passes of 64 above the previous pass's last (distance, index): exact ties around rank 64
    (integer data, duplicates) must continue with the next index, not skip or repeat one."""
    g = torch.Generator().manual_seed(13)
    support = torch.randint(0, 3, (203, 3), generator=g).float() + (metric == "cosine")
    queries = torch.randint(0, 3, (7, 3), generator=g).float() + 0.5 * (metric == "cosine")
    for k in (65, 128, 150):
        dist, idx = knn_topk(queries, support, k, metric, splits=2)
        ref_d, ref_i = knn_topk_ref(queries, support, k, metric)
        if metric == "l2":
            assert torch.equal(idx, ref_i), k
            assert torch.allclose(dist, ref_d, rtol=1e-6, atol=0)
        else:   # cosine of integer vectors is not exact in fp32: near-ties may swap; no repeats, nothing skipped
            check_against_reference(queries, support, k, metric, splits=2)
        assert all(len(set(row.tolist())) == k for row in idx)


def test_large_k_with_exclude_and_pad():
    g = torch.Generator().manual_seed(14)
    support = torch.randn(70, 6, generator=g)
    own = torch.arange(70)
    dist, idx = knn_topk(support, support, 70, exclude=own, pad=True, splits=3)
    ref_d, ref_i = knn_topk_ref(support, support, 70, exclude=own)
    assert torch.equal(idx, ref_i)
    assert (idx[:, -1] == -1).all() and torch.isinf(dist[:, -1]).all()
    assert (idx[:, :-1] >= 0).all() and not (idx == own[:, None]).any()
    assert torch.allclose(dist[:, :-1], ref_d[:, :-1], atol=1e-4)


def test_nan_and_inf_rank_last_by_index():
    """A NaN distance counts as +inf (the reference's nan_to_num); +inf distances are real neighbours, ranked
    after every finite one and among themselves by index, before any missing (-1) one."""
    support = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [2.0, 2.0], [float("inf"), 0.0], [1.0, 0.0],
                            [float("nan"), 1.0]])
    queries = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    dist, idx = knn_topk(queries, support, 6)
    ref_d, ref_i = knn_topk_ref(queries, support, 6)
    assert torch.equal(idx, ref_i) and torch.allclose(dist, ref_d, rtol=1e-6, atol=0)
    assert idx[0].tolist() == [0, 4, 2, 1, 3, 5]
    dist, idx = knn_topk(queries, support, 6, exclude=torch.tensor([3, -1]), pad=True)
    assert idx[0].tolist() == [0, 4, 2, 1, 5, -1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_size_one_and_prime_shapes_with_large_k(dtype):
    g = torch.Generator().manual_seed(15)
    support = torch.randn(131, 1, generator=g).to(dtype)                  # D = 1
    check_against_reference(support[:1], support, 97)                    # Q = 1, k > 64
    check_against_reference(torch.randn(3, 1, generator=g).to(dtype), support[:1], 1)   # N = 1


def test_distance_pass_is_the_nearest_distance():
    """bench_knn's distances-only probe runs the same tiles and epilogue: its row minimum is knn_topk's first."""
    from seal_fast.kernels.knn import knn_distance_pass

    g = torch.Generator().manual_seed(16)
    queries, support = torch.randn(21, 37, generator=g), torch.randn(150, 37, generator=g)
    for metric in ("l2", "cosine"):
        near = knn_distance_pass(queries, support, 30, metric)
        assert torch.equal(near, knn_topk(queries, support, 30, metric)[0][:, 0])


def test_compile_specs_cover_the_launcher_table():
    """Every configuration the GPU launcher can run, per architecture (sm_90, sm_80), dtype, precision, list
    bucket and alignment (every autotune candidate, the default first), has a spec for that architecture in its
    "plain" and its "full" flavour, with its tile, warps, stages and register cap; labels are unique; 16-bit and
    TF32 configurations promise tensor cores, and on sm_90 all of them use the 64-row wgmma tile."""
    from seal_fast.kernels.knn_configs import ARCHS, K_PER_PASS, MAXNREG, candidates, list_slots
    from seal_fast.kernels.knn_kernel import compile_specs

    specs = compile_specs()
    labels = [s.label for s in specs]
    assert len(labels) == len(set(labels))
    knn_specs = [s for s in specs if s.facts["kernel"] == "knn"]
    have = {}
    for s in knn_specs:
        f = s.facts
        have.setdefault((s.arch, f["dtype"], f["precision"], f["kp"], f["aligned"]), set()).add(
            (s.constexprs["BLOCK_Q"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_D"], s.num_warps, s.num_stages,
             f["flavour"]))
        assert s.arch in ARCHS and s.maxnreg == MAXNREG <= 240
    assert set(ARCHS) == {90, 80}
    for arch in ARCHS:
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            for precision in (("ieee", "tf32") if dtype == torch.float32 else (None,)):
                for kp in sorted({list_slots(k) for k in range(1, MAX_K + 1)}):
                    for aligned in (True, False):
                        group = candidates(arch, dtype, precision, kp, aligned)
                        assert 1 <= len(group) <= 3 and len(set(group)) == len(group)
                        got = have.get((arch, name, precision or name, kp, aligned), set())
                        for c in group:
                            for flavour in ("plain", "full"):
                                assert (c.block_q, c.block_n, c.block_d, c.num_warps, c.num_stages, flavour) in got, \
                                    f"no sm_{arch} spec compiles {c} ({flavour}) for {name} {precision} kp{kp} " \
                                    f"aligned={aligned}"
    assert max(list_slots(k) for k in range(1, MAX_K + 1)) == K_PER_PASS
    assert any(s.constexprs["LOWER"] for s in knn_specs) and any(not s.constexprs["SELECT"] for s in knn_specs)
    for s in knn_specs:
        assert s.facts["tensor_cores"] == (s.facts["precision"] != "ieee")
        if s.arch == 90 and s.facts["tensor_cores"]:
            assert s.constexprs["BLOCK_Q"] == 64 and s.num_warps == 4                   # one warpgroup: wgmma


def test_configuration_is_keyed_on_arch_dtype_k_and_d():
    """pick_config: the table's default per (architecture, dtype, precision, list slots of k, alignment), or the
    autotuner's winner for that key and that class of D; the interpreter has its own small tiles."""
    from seal_fast.kernels.knn import Config, candidates, d_class, pick_config

    bf16 = torch.bfloat16
    assert pick_config(90, bf16, None, 30, 2048) == candidates(90, bf16, None, 32)[0] == Config(64, 128, 64, 4, 3)
    assert pick_config(90, bf16, None, 64, 2048) == Config(64, 64, 64, 4, 3)           # KP = 64: narrower tiles
    assert pick_config(80, bf16, None, 30, 2048) != pick_config(90, bf16, None, 30, 2048)  # no wgmma on sm_80
    assert pick_config(90, torch.float32, "ieee", 30, 2048) != pick_config(90, torch.float32, "tf32", 30, 2048)
    assert pick_config(None, bf16, None, 30, 2048) == knn_configs._INTERPRETER
    assert knn.arch_of(torch.device("cpu")) is None
    assert [d_class(d) for d in (1, 16, 17, 256, 2065, 10**6)] == [16, 16, 32, 256, 4096, 32768]
    winner = candidates(90, bf16, None, 32)[1]
    try:
        knn._WINNERS[knn._tune_key(90, bf16, None, 32, 2048, True)] = winner
        assert pick_config(90, bf16, None, 30, 2048) == winner
        assert pick_config(90, bf16, None, 30, 1500) == winner                        # the same class of D
        assert pick_config(90, bf16, None, 30, 256) == candidates(90, bf16, None, 32)[0]  # another: not tuned yet
        assert pick_config(90, bf16, None, 30, 2048, aligned=False) == candidates(90, bf16, None, 32, False)[0]
    finally:
        knn._WINNERS.clear()


@pytest.fixture
def fresh_tuner():
    """The autotuner's and the launcher's caches, empty before and after the test."""
    knn._knn_tuned.cache.clear()
    knn._WINNERS.clear()
    yield knn._knn_tuned
    knn._knn_tuned.cache.clear()
    knn._WINNERS.clear()


def test_no_autotuning_under_the_interpreter(fresh_tuner, monkeypatch):
    """Interpreter runs never time anything: one small fixed configuration, deterministic and fast."""
    def no_bench(fn, quantiles):
        raise AssertionError("the autotuner timed a configuration under the interpreter")

    monkeypatch.setattr(knn, "_bench", no_bench)
    g = torch.Generator().manual_seed(21)
    queries, support = torch.randn(9, 20, generator=g), torch.randn(70, 20, generator=g)
    assert knn._interpreted() and not knn._tuning(queries.device)
    check_against_reference(queries, support, 5, splits=2)
    assert not knn._WINNERS and not fresh_tuner.cache


def test_autotuner_times_each_shape_class_once_and_every_candidate_agrees(fresh_tuner, monkeypatch):
    """The GPU's tuning path, run by the interpreter with a fake timer: each new key (here a new class of D)
    times every candidate once, the winner is cached (no timing on the next call of the class) and recorded
    for pick_config; and every candidate returns exactly the same neighbours, so the winner changes the speed
    only. The candidates are small tiles (the GPU tables' are too slow for numpy)."""
    from seal_fast.kernels.knn import Config

    group = (Config(16, 32, 32, 4, 1), Config(32, 32, 16, 4, 1), Config(16, 64, 32, 4, 1))
    timings = []

    def fake_bench(fn, quantiles):  # runs the candidate once; the last one timed is the fastest
        fn()
        timings.append(1)
        t = 10.0 - len(timings)
        return [t, t, t]

    real_candidates = knn.candidates
    monkeypatch.setattr(knn, "candidates", lambda arch, *a, **kw: group if arch is None else real_candidates(
        arch, *a, **kw))
    monkeypatch.setattr(knn, "_bench", fake_bench)
    g = torch.Generator().manual_seed(22)
    support = torch.randint(-3, 4, (150, 64), generator=g).float()  # integer data: exact distances, real ties
    queries = torch.randint(-3, 4, (21, 64), generator=g).float()
    # column slices of [*, 64] rows: 16-aligned row strides, D = 20 and 24 (class 32) and 40 (class 64)
    (q20, x20), (q24, x24), (q40, x40) = [(queries[:, :d], support[:, :d]) for d in (20, 24, 40)]
    key20 = knn._tune_key(None, torch.float32, "ieee", 16, 20, True)
    assert knn._aligned(q20) and knn._aligned(x20)
    ref = knn_topk_ref(q20, x20, 7)

    monkeypatch.setattr(knn, "_tuning", lambda device: False)
    fixed = []
    for cfg in group:  # each candidate on its own (as the recorded winner): the same neighbours, bit for bit
        knn._WINNERS[key20] = cfg
        assert knn.pick_config(None, torch.float32, "ieee", 7, 20) == cfg
        fixed.append(knn_topk(q20, x20, 7, splits=2))
        assert torch.equal(fixed[-1][1], ref[1]) and torch.equal(fixed[-1][0], fixed[0][0]), cfg
    knn._WINNERS.clear()

    monkeypatch.setattr(knn, "_tuning", lambda device: True)
    out = knn_topk(q20, x20, 7, splits=2)
    assert len(timings) == len(group)
    assert knn._WINNERS == {key20: group[-1]}
    assert torch.equal(out[0], fixed[0][0]) and torch.equal(out[1], fixed[0][1])
    knn_topk(q24, x24, 7)                                               # D = 24: the same class, no timing
    assert len(timings) == len(group)
    d40 = knn_topk(q40, x40, 7)                                         # D = 40: a new class, timed again
    assert len(timings) == 2 * len(group) and len(knn._WINNERS) == 2
    assert torch.equal(d40[1], knn_topk_ref(q40, x40, 7)[1])


def test_tolerance_does_not_come_from_the_code_under_test(monkeypatch):
    """check_against_reference scales its tolerance by PyTorch's own fp32 error against the fp64 oracle: a
    fallback (backend "torch") that is 1.0 off must not make a kernel 0.01 off pass. (It once scaled by the
    fallback's error: both passed.)"""
    real = knn_topk

    def broken(*args, backend="auto", **kw):
        d, i = real(*args, backend=backend, **kw)
        return (d + 1.0 if backend == "torch" else d + 0.01), i

    monkeypatch.setitem(globals(), "knn_topk", broken)
    g = torch.Generator().manual_seed(23)
    queries, support = torch.randn(30, 16, generator=g), torch.randn(120, 16, generator=g)
    with pytest.raises(AssertionError):
        check_against_reference(queries, support, 5)
    monkeypatch.setitem(globals(), "knn_topk", real)
    check_against_reference(queries, support, 5)


# -- 64-bit addressing, limits ------------------------------------------------------------------------

_STRIDED = textwrap.dedent("""
    import sys, tempfile, torch
    from seal_fast.kernels.knn import knn_topk
    from seal_fast.kernels.reference import knn_topk_ref
    S = 2**27 - 1                  # elements between features: offset d * S passes 2^31 at d = 17
    Q, N, D = 5, 40, 40            # and a D step of 32 columns (the interpreter's BLOCK_D) at the first one
    numel = (D - 1) * S + Q + N    # 5.2e9 elements: a sparse file, of which only the touched pages exist
    with tempfile.NamedTemporaryFile(dir=sys.argv[1]) as f:
        f.truncate(numel * 2)
        base = torch.from_file(f.name, shared=True, size=numel, dtype=torch.bfloat16)
        support = base.as_strided((N, D), (1, S), 0)       # column-major views: stride 1 along the rows
        queries = base.as_strided((Q, D), (1, S), N)
        g = torch.Generator().manual_seed(0)
        support.copy_(torch.randn(N, D, generator=g).to(torch.bfloat16))
        queries.copy_(torch.randn(Q, D, generator=g).to(torch.bfloat16))
        for metric in ("l2", "cosine"):
            dist, idx = knn_topk(queries, support, 7, metric, splits=2)
            ref_d, ref_i = knn_topk_ref(queries, support, 7, metric)
            assert torch.equal(idx, ref_i), (metric, idx, ref_i)
            assert (dist - ref_d).abs().max().item() < 1e-3, metric
    print("ok")
""")


def test_strided_views_whose_offsets_pass_2_31_elements(tmp_path):
    """Column-major queries and support (feats.T) whose element offsets pass 2^31 (d * stride along D, and the
    D step) over a sparse file: a few MB of memory. The kernels once formed these offsets in int32, wrapped
    and read far outside the tensors (a segfault under the interpreter: hence a subprocess)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    try:
        with open(tmp_path / "probe", "wb") as f:
            f.truncate(12 * 2**30)
    except OSError as e:
        pytest.skip(f"no sparse 12 GiB file here: {e}")
    r = subprocess.run([sys.executable, "-c", _STRIDED, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def _no_launch(*args, **kwargs):
    raise AssertionError("launched a kernel")


@pytest.mark.parametrize("which", ["support", "queries"])
def test_rows_past_the_int32_limit_are_refused(which, monkeypatch):
    """Row and column indices are int32 in the kernel (n0 + a tile's columns, too): inputs of more than
    MAX_ROWS = 2^31 - 4096 rows are refused with one line, before any launch (expanded views: no memory)."""
    from seal_fast.kernels.knn import MAX_ROWS

    monkeypatch.setattr(knn, "_norms", _no_launch)
    monkeypatch.setattr(knn, "_stage1", _no_launch)
    big = torch.zeros(1, 4).expand(2**31 - 1, 4)
    small = torch.zeros(3, 4)
    queries, support = (small, big) if which == "support" else (big, small)
    with pytest.raises(ValueError, match=f"2147483647 {'support points' if which == 'support' else 'queries'}; "
                                         f"at most {MAX_ROWS}"):
        knn_topk(queries, support, 1, backend="triton")
    ok = torch.zeros(1, 4).expand(MAX_ROWS, 4)
    monkeypatch.setattr(knn, "_norms", lambda x, cosine: torch.zeros(x.shape[0]))
    with pytest.raises(AssertionError, match="launched"):   # MAX_ROWS itself is accepted
        knn_topk(small, ok, 1, backend="triton")


@pytest.mark.parametrize("splits", [0, -1, 65536, 2.5, True])
def test_splits_outside_the_grid_limit_are_refused(splits):
    """splits is the grid's y dimension (at most 65,535 on CUDA): refused with one line that names the value
    and the limit (0 once divided by zero; above the limit the launch failed on the GPU only)."""
    with pytest.raises(ValueError, match=f"splits = {splits!r}; it must be an integer between 1 and 65535"):
        knn_topk(torch.randn(3, 4), torch.randn(10, 4), 2, splits=splits, backend="triton")


def test_exclude_may_be_a_strided_view():
    """The kernel reads exclude[i] at offset i: a non-contiguous exclude (a column of a [Q, 2] table) once read
    its neighbours' entries."""
    g = torch.Generator().manual_seed(24)
    support = torch.randn(60, 8, generator=g)
    own = torch.arange(60)
    table = torch.stack([own, own.flip(0)], 1)          # exclude = table[:, 0], stride 2
    dist, idx = check_against_reference(support, support, 4, exclude=table[:, 0], splits=2)
    assert not (idx == own[:, None]).any()


def test_merge_topk_over_chunks_equals_one_pass_with_ties():
    """The running k nearest over a support streamed in chunks (as the depth study streams it) equals the
    oracle over the whole support, ties across chunk boundaries and self-exclusion included."""
    g = torch.Generator().manual_seed(11)
    support = torch.randint(0, 3, (157, 6), generator=g).float()  # few distinct points: many equal distances
    queries = support[:40]
    own = torch.arange(40)
    k = 9
    best = empty_topk(40, k, "cpu")
    for start in range(0, 157, 32):
        part = support[start:start + 32]
        exclude = own - start  # the query's own row, when it lies in this chunk (else out of range: none)
        d, i = knn_topk(queries, part, k, exclude=exclude, pad=True)
        best = merge_topk(best, (d, torch.where(i >= 0, i + start, i)), k)
    ref_d, ref_i = knn_topk_ref(queries, support, k, exclude=own)
    assert torch.equal(best[1], ref_i)
    torch.testing.assert_close(best[0], ref_d, rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["matmul", "global"])
def test_tf32_enabled_through_the_new_torch_api(where):
    """TF32 enabled the torch >= 2.9 way (torch.backends.cuda.matmul.fp32_precision, or the global
    torch.backends.fp32_precision): reading the legacy allow_tf32 then raises ("mix of the legacy and new
    APIs"), and every fp32 call of the Triton path once did. The launcher follows the new setting, as torch.mm."""
    target = torch.backends.cuda.matmul if where == "matmul" else torch.backends
    g = torch.Generator().manual_seed(25)
    queries, support = torch.randn(20, 48, generator=g), torch.randn(150, 48, generator=g)
    try:
        target.fp32_precision = "tf32"
        assert knn._precision(torch.float32) == "tf32"
        check_against_reference(queries, support, 5)   # interpreter: its tf32 dot is exact
        target.fp32_precision = "ieee"
        assert knn._precision(torch.float32) == "ieee"
    finally:
        target.fp32_precision = "none"
    assert knn._precision(torch.float32) == "ieee" and knn._precision(torch.bfloat16) is None


# -- on a GPU: what only compiled code shows ------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_every_candidate_agrees_and_the_winner_is_cached(fresh_tuner, monkeypatch):
    """Every candidate of this GPU's table issues the same MMAs in the same order: the same keys, bit for bit,
    whichever the autotuner picks (its pick can differ from run to run). A tuned call records a winner from
    the list; the next call of the key times nothing."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(30)
    cases = [(torch.bfloat16, 256, 30), (torch.bfloat16, 256, 64), (torch.bfloat16, 300, 30),  # 300: unaligned
             (torch.float32, 256, 30)]
    for dtype, d, k in cases:
        queries = torch.randn(300, d, generator=g).to(dtype).cuda()
        support = torch.randn(5000, d, generator=g).to(dtype).cuda()
        arch, precision, kp = knn.arch_of(queries.device), knn._precision(dtype), knn.list_slots(k)
        aligned = knn._aligned(queries) and knn._aligned(support)
        assert aligned == (d == 256)
        key = knn._tune_key(arch, dtype, precision, kp, d, aligned)
        group = knn.candidates(arch, dtype, precision, kp, aligned)
        monkeypatch.setattr(knn, "AUTOTUNE", False)
        outs = []
        for cfg in group:
            knn._WINNERS[key] = cfg
            outs.append(knn_topk(queries, support, k))
            assert torch.equal(outs[-1][0], outs[0][0]) and torch.equal(outs[-1][1], outs[0][1]), (dtype, d, k, cfg)
        knn._WINNERS.clear()
        monkeypatch.setattr(knn, "AUTOTUNE", True)
        tuned = knn_topk(queries, support, k)
        assert knn._WINNERS[key] in group
        assert torch.equal(tuned[0], outs[0][0]) and torch.equal(tuned[1], outs[0][1])
        monkeypatch.setattr(knn, "_bench", lambda fn, quantiles: pytest.fail("timed a cached key again"))
        knn_topk(queries, support, k)
        monkeypatch.undo()
    check_against_reference(queries[:50], support, 30)


@pytest.mark.gpu
def test_cuda_graph_capture_neither_tunes_nor_changes_results(fresh_tuner, monkeypatch):
    """Under CUDA graph capture nothing is timed (the timing runs would be captured and replayed): a key
    without a winner runs the table's default, and the replayed graph gives the eager results, also after new
    values are copied into its inputs."""
    g = torch.Generator().manual_seed(31)
    queries = torch.randn(500, 512, generator=g).to(torch.bfloat16).cuda()
    support = torch.randn(8000, 512, generator=g).to(torch.bfloat16).cuda()
    monkeypatch.setattr(knn, "AUTOTUNE", False)
    eager = knn_topk(queries, support, 30)          # compiles the default outside the capture
    assert not knn._WINNERS
    monkeypatch.setattr(knn, "AUTOTUNE", True)
    monkeypatch.setattr(knn, "_bench", lambda fn, quantiles: pytest.fail("timed a configuration while capturing"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = knn_topk(queries, support, 30)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    queries.copy_(torch.randn(500, 512, generator=g).to(torch.bfloat16))
    graph.replay()
    monkeypatch.setattr(knn, "AUTOTUNE", False)
    again = knn_topk(queries, support, 30)
    torch.cuda.synchronize()
    assert torch.equal(captured[0], again[0]) and torch.equal(captured[1], again[1])
    assert not knn._WINNERS


@pytest.mark.gpu
def test_cuda_strided_views_whose_offsets_pass_2_31_elements():
    """Compiled code of the CPU test above: column-major views whose offsets pass 2^31 elements (10 GB of
    device memory, uninitialised but for the rows used)."""
    S, (Q, N, D) = 2**27 - 1, (5, 40, 40)
    base = torch.empty((D - 1) * S + Q + N, dtype=torch.bfloat16, device="cuda")
    try:
        support, queries = base.as_strided((N, D), (1, S), 0), base.as_strided((Q, D), (1, S), N)
        g = torch.Generator().manual_seed(32)
        support.copy_(torch.randn(N, D, generator=g).to(torch.bfloat16))
        queries.copy_(torch.randn(Q, D, generator=g).to(torch.bfloat16))
        for metric in ("l2", "cosine"):
            dist, idx = knn_topk(queries, support, 7, metric)
            ref_d, ref_i = knn_topk_ref(queries, support, 7, metric)
            assert torch.equal(idx.cpu(), ref_i.cpu()), metric
            assert (dist.cpu() - ref_d.cpu()).abs().max().item() < 1e-3, metric
    finally:
        del base
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_cuda_support_of_max_rows_in_the_most_slices(monkeypatch):
    """N = MAX_ROWS = 2^31 - 4096 support points (D = 1, 4.3 GB) in 65,535 slices: the last slices' bound
    n_lo + per_split passed 2^31 in int32 (they then took no tile and lost the nearest points, here the last
    three rows)."""
    from seal_fast.kernels.knn import MAX_ROWS

    monkeypatch.setattr(knn, "AUTOTUNE", False)
    support = torch.zeros(MAX_ROWS, 1, dtype=torch.bfloat16, device="cuda")
    try:
        support[-3:] = 1
        dist, idx = knn_topk(torch.ones(1, 1, dtype=torch.bfloat16, device="cuda"), support, 3, splits=65535)
        assert idx.tolist() == [[MAX_ROWS - 3, MAX_ROWS - 2, MAX_ROWS - 1]] and dist.abs().max().item() == 0
    finally:
        del support
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_cuda_exclude_from_the_cpu():
    """exclude on the CPU with queries on the GPU (the Triton launch once refused the host pointer)."""
    g = torch.Generator().manual_seed(33)
    support = torch.randn(300, 64, generator=g).cuda()
    own = torch.arange(300)
    check_against_reference(support, support, 5, exclude=own)
    check_against_reference(support, support, 5, exclude=torch.stack([own, own], 1)[:, 1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_inputs_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: inputs on cuda:1 while cuda:0 is current once ran on the wrong
    GPU. (The H200 machine has one GPU: this runs only where there are two.)"""
    g = torch.Generator().manual_seed(34)
    queries = torch.randn(100, 64, generator=g).to("cuda:1")
    support = torch.randn(2000, 64, generator=g).to("cuda:1")
    with torch.cuda.device(0):
        check_against_reference(queries, support, 10)

