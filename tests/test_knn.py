"""kernels.knn against the brute-force reference: odd shapes, dtypes, ties, self-exclusion, memory, voting."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.knn import MAX_K, default_splits, empty_topk, knn_predict, knn_topk, merge_topk, vote
from kernels.reference import knn_topk_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}  # of distances, on top of 2x torch's error


def true_dist(queries, support, idx, metric):
    """fp64 distance of each returned (query, index) pair, from the inputs' own values."""
    q, x = queries.double(), support.double()[idx.clamp(min=0)]          # [Q, D], [Q, k, D]
    if metric == "cosine":
        cos = (x @ q[:, :, None]).squeeze(2) / (q.norm(dim=1).clamp_min(1e-8)[:, None] * x.norm(dim=2).clamp_min(1e-8))
        return 1 - cos
    return (x - q[:, None, :]).pow(2).sum(2).sqrt()


def check_against_reference(queries, support, k, metric="l2", exclude=None, **kw):
    dist, idx = knn_topk(queries, support, k, metric, exclude, **kw)
    ref_d, ref_i = knn_topk_ref(queries, support, k, metric, exclude)               # fp64
    torch_d, _ = knn_topk(queries, support, k, metric, exclude, pad=exclude is not None, backend="torch")  # fp32
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    tol = 2 * (torch_d - ref_d).abs().max().item() + ATOL[queries.dtype] * (1 + ref_d.abs().max().item())
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
    from kernels.knn import knn_distance_pass

    g = torch.Generator().manual_seed(16)
    queries, support = torch.randn(21, 37, generator=g), torch.randn(150, 37, generator=g)
    for metric in ("l2", "cosine"):
        near = knn_distance_pass(queries, support, 30, metric)
        assert torch.equal(near, knn_topk(queries, support, 30, metric)[0][:, 0])


def test_compile_specs_cover_the_launcher_table():
    """Every (dtype, precision, list bucket, alignment) the GPU launcher can pick has a spec with its tile,
    warps and stages; labels are unique; 16-bit and TF32 configurations promise tensor cores."""
    from kernels.knn import K_PER_PASS, compile_specs, list_slots, pick_config

    specs = compile_specs()
    labels = [s.label for s in specs]
    assert len(labels) == len(set(labels))
    knn = [s for s in specs if s.facts["kernel"] == "knn"]
    picked = {(s.facts["dtype"], s.facts["precision"], s.facts["kp"], s.facts["aligned"]):
              (s.constexprs["BLOCK_Q"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_D"], s.num_warps, s.num_stages)
              for s in knn}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for precision in (("ieee", "tf32") if dtype == torch.float32 else (None,)):
            for kp in sorted({list_slots(k) for k in range(1, MAX_K + 1)}):
                for aligned in (True, False):
                    cfg = pick_config(dtype, precision, kp, aligned)
                    key = (name, precision or name, kp, aligned)
                    if key in picked:
                        assert picked[key] == (cfg.block_q, cfg.block_n, cfg.block_d, cfg.num_warps,
                                               cfg.num_stages), key
                    assert any(k[:2] == key[:2] and k[3] == aligned and
                               picked[k] == (cfg.block_q, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages)
                               for k in picked), f"no spec compiles the tile the launcher picks for {key}"
    assert max(list_slots(k) for k in range(1, MAX_K + 1)) == K_PER_PASS
    assert any(s.constexprs["LOWER"] for s in knn) and any(not s.constexprs["SELECT"] for s in knn)
    for s in knn:
        assert s.facts["tensor_cores"] == (s.facts["precision"] != "ieee")
        assert s.constexprs["BLOCK_Q"] >= 64 or not s.facts["tensor_cores"]          # wgmma needs M >= 64
    assert {s.facts["dtype"] for s in specs if s.facts["kernel"] == "norms"} == {"fp32", "bf16", "fp16"}


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
