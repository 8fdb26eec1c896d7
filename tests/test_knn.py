"""The symmetric blocked kNN core (analysis.knn) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from analysis.knn import (
    _flat_nonzero,
    _stable_order,
    as_points,
    compute_dtype,
    knn_distances,
    knn_from_points,
    unique_rows,
)


def _brute(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    D = cdist(X.astype(np.float64), X.astype(np.float64))
    np.fill_diagonal(D, np.inf)
    idx = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, idx, axis=1), idx


def _cloud(n: int, d: int, seed: int, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.05 * rng.standard_normal((n, d))).astype(
        dtype
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk", [None, 1, 7, 33, 128, 257, 1000])
def test_equals_brute_force_at_every_chunk_size(dtype, chunk):
    X = _cloud(257, 20, seed=1, dtype=dtype)
    ref_d, ref_i = _brute(X, 6)
    d, i = knn_distances(X, 6, chunk_size=chunk)
    assert d.dtype == torch.float64 and i.dtype == torch.int64 and d.shape == (257, 6)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12, atol=0)


def test_symmetric_path_with_several_row_blocks_and_column_segments(monkeypatch):
    # Small block constants force many off-diagonal blocks, leaf squares and segments of the symmetric sweep.
    import analysis.knn as knn

    monkeypatch.setattr(knn, "_AUTO_ROWS", 64)
    monkeypatch.setattr(knn, "_LEAF_ROWS", 16)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 64 * 100)
    monkeypatch.setattr(knn, "_SMALL_ELEMENTS", 0)  # no single-block shortcut for small clouds
    X = _cloud(701, 12, seed=2, dtype=np.float32)
    ref_d, ref_i = _brute(X, 9)
    d, i = knn_distances(X, 9)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12, atol=0)


def test_adversarial_order_takes_the_dense_compaction_and_padded_merge_paths(monkeypatch):
    # Rows ordered so that every leaf square holds points ~1000 apart while the true neighbours sit in other
    # blocks: the leaf's tau is useless, so later blocks pass many entries (dense topk, pools overflowing
    # into compactions and padded merges). The result must still be the brute-force one.
    import analysis.knn as knn

    monkeypatch.setattr(knn, "_AUTO_ROWS", 64)
    monkeypatch.setattr(knn, "_LEAF_ROWS", 16)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 64 * 100)
    monkeypatch.setattr(knn, "_SMALL_ELEMENTS", 0)  # no single-block shortcut for small clouds
    merged_rows = []
    real_merge = knn._RunningTopK._merge

    def spy(self, rows, vals, idx):
        merged_rows.append((isinstance(rows, slice), vals.shape[1]))
        real_merge(self, rows, vals, idx)

    monkeypatch.setattr(knn._RunningTopK, "_merge", spy)
    n = 640
    i = np.arange(n)
    pos = (i % 64) * 1000.0 + i // 64
    X = np.column_stack([pos, _cloud(n, 3, seed=9) * 0.01]).astype(np.float32)
    ref_d, ref_i = _brute(X, 9)
    d, idx = knn_distances(X, 9)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12, atol=0)
    assert any(not is_slice for is_slice, _ in merged_rows)  # compaction of overflowing pools
    assert any(is_slice and c == 9 for is_slice, c in merged_rows)  # a dense topk over a block
    assert any(is_slice and c > 9 for is_slice, c in merged_rows)  # a padded merge of an overflow


def test_flat_nonzero_and_stable_order_equal_torchs():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 1001, generator=g) < 0.02
    assert torch.equal(_flat_nonzero(mask), mask.view(-1).nonzero().squeeze(1))
    for bound in (50, 2**16, 2**16 + 7):  # the numpy radix path (uint16 keys) and torch's sort beyond it
        keys = torch.randint(0, bound, (5000,), generator=g)
        assert torch.equal(_stable_order(keys, bound), torch.argsort(keys, stable=True))


def test_k_larger_than_a_leaf_and_k_equal_n_minus_one():
    X = _cloud(40, 5, seed=3)
    for k in (1, 20, 39):
        ref_d, ref_i = _brute(X, k)
        d, i = knn_distances(X, k, chunk_size=8)
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12)
        np.testing.assert_array_equal(i.numpy(), ref_i)


def test_chunked_equals_unchunked():
    X = torch.from_numpy(_cloud(300, 16, seed=4, dtype=np.float32))
    d_full, i_full = knn_distances(X, 5)
    for chunk in (1, 7, 64, 299, 300):
        d, i = knn_distances(X, 5, chunk_size=chunk)
        assert torch.equal(i, i_full)
        torch.testing.assert_close(d, d_full, rtol=1e-13, atol=0)


def test_float32_search_gives_float64_accurate_distances_far_from_the_origin():
    # A tight cloud far from the origin: ||x||^2 >> distance^2, where the matmul formula alone would lose
    # every digit in float32; the refinement recomputes the selected distances in float64.
    X = (_cloud(400, 32, seed=5) * 1e-3 + 1e3).astype(np.float32)
    ref_d, ref_i = _brute(X, 8)
    d, i = knn_distances(X, 8)
    np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12, atol=0)
    # Neighbours may only differ where float32 round-off can reorder them: compare the distance sets.
    assert (i.numpy() == ref_i).mean() > 0.95


def test_refine_tolerance_recomputes_exactly_the_points_whose_float32_values_could_be_off(monkeypatch):
    import analysis.knn as knn

    # Two clusters 10 apart, each 0.1 wide: centring cannot help (every point is ~10 from the centroid), so
    # the float32 search values are off by ~1e-4 relative, though still good enough to select the neighbours.
    rng = np.random.default_rng(9)
    tight = (rng.standard_normal((300, 16)) * 0.1 + np.repeat([[5.0], [-5.0]], 150, axis=0)).astype(np.float32)
    spread = _cloud(300, 16, seed=9, dtype=np.float32)
    refined_rows = []
    real = knn.refined_sq_distances
    monkeypatch.setattr(
        knn, "refined_sq_distances", lambda X, idx, queries=None: refined_rows.append(len(idx)) or real(X, idx, queries)
    )

    exact_d, exact_i = knn_distances(tight, 5)
    refined_rows.clear()
    assert (knn_distances(tight, 5, refine=False)[0] / exact_d - 1).abs().max() > 1e-5
    d, i = knn_distances(tight, 5, refine=1e-5)
    torch.testing.assert_close(d, exact_d, rtol=1e-12, atol=0)
    assert torch.equal(i, exact_i) and refined_rows == [300]

    refined_rows.clear()
    ref_d, _ = _brute(spread, 5)
    d, _ = knn_distances(spread, 5, refine=1e-5)
    assert sum(refined_rows) < 30  # a few points at most
    np.testing.assert_allclose(d.numpy() ** 2, ref_d**2, rtol=1e-5, atol=0)

    for bad in (-1e-5, "yes", None):
        with pytest.raises(ValueError, match="refine must be True, False or a relative tolerance"):
            knn_distances(spread, 5, refine=bad)


def test_extreme_scales_do_not_overflow_in_float32():
    base = _cloud(200, 10, seed=6)
    for scale in (1e30, 1e-30):
        X = (base * scale).astype(np.float32)
        ref_d, ref_i = _brute(X, 4)
        d, i = knn_distances(X, 4)
        assert bool(torch.isfinite(d).all())
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=1e-12)
        np.testing.assert_array_equal(i.numpy(), ref_i)


def test_no_block_larger_than_the_chunk(monkeypatch):
    n, chunk = 250, 16
    sizes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    knn_distances(torch.randn(n, 8), 3, chunk_size=chunk)
    assert sizes and max(r * c for r, c in sizes) <= chunk * n
    assert max(r for r, _ in sizes) <= chunk
    sizes.clear()
    knn_distances(torch.randn(3000, 8), 3)  # automatic: one full square up to 2**24 distances (4096 points)
    assert max(r * c for r, c in sizes) == 3000 * 3000
    sizes.clear()
    knn_distances(torch.randn(5000, 8), 3)  # beyond that, blocks of at most 2**22 distances
    assert max(r * c for r, c in sizes) <= 2**22


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unique_rows_tells_duplicates_from_rows_with_the_same_bit_sum(dtype):
    # Rows 1 and 4 are permutations of row 0 (equal sums of bit patterns, the pre-filter's key) but distinct;
    # rows 2 and 6 repeat rows 0 and 3 (row 6 with -0.0), row 5 repeats row 4.
    X = torch.tensor(
        [
            [1.0, 2.0, 3.0],
            [2.0, 1.0, 3.0],
            [1.0, 2.0, 3.0],
            [0.0, 5.0, 0.0],
            [3.0, 2.0, 1.0],
            [3.0, 2.0, 1.0],
            [0.0, 5.0, -0.0],
        ],
        dtype=dtype,
    )
    U, kept = unique_rows(X)
    assert kept.tolist() == [0, 1, 3, 4] and torch.equal(U, X[kept])
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    Y = torch.from_numpy(_cloud(500, 8, seed=10)).to(dtype)
    assert unique_rows(Y)[1].tolist() == list(range(500))  # no duplicates: every row kept, in order
    Z = torch.cat([Y, Y[perm[:50]]])
    U, kept = unique_rows(Z)
    assert kept.tolist() == list(range(500)) and torch.equal(U, Y)


def test_duplicates_are_neighbours_at_distance_zero():
    X = _cloud(100, 6, seed=7)
    X = np.vstack([X, X[:5]])
    d, i = knn_distances(X, 1)
    assert np.all(d.numpy()[:5, 0] == 0) and np.all(d.numpy()[100:, 0] == 0)
    np.testing.assert_array_equal(i.numpy()[:5, 0], np.arange(100, 105))


def test_compute_dtypes_and_shared_helpers():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float32) == torch.float32
    assert compute_dtype(cpu, torch.float64) == torch.float64
    assert compute_dtype(cpu, torch.float16) == torch.float64
    assert as_points(np.ones((3, 2), np.float32), min_points=1, who="t").dtype == torch.float32
    with pytest.raises(ValueError, match="NaN or inf"):
        as_points(np.array([[0.0, np.nan], [1.0, 2.0]]), min_points=1, who="t")
    with pytest.raises(ValueError, match="NaN or inf"):
        as_points(np.array([[np.inf, -np.inf], [1.0, 2.0]]), min_points=1, who="t")
    # A finite cloud whose float64 sum overflows is still accepted.
    assert as_points(np.array([[1e308, 1e308], [1e308, 1.0]]), min_points=1, who="t").shape == (2, 2)
    X = torch.tensor([[1.0, 2.0], [0.0, -0.0], [1.0, 2.0], [0.0, 0.0]])
    U, kept = unique_rows(X)
    assert kept.tolist() == [0, 1] and U.shape == (2, 2)
    d, i = knn_from_points(torch.from_numpy(_cloud(50, 4, seed=8)), 3)
    assert d.shape == i.shape == (50, 3)
