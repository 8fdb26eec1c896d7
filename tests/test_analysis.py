"""Intrinsic-dimension and spectral estimators in `analysis/` against scikit-dimension and known answers.

Our TwoNN / MLE use exactly skdim's formulas, so on duplicate-free data they must agree to round-off; the
tests demand 1e-6 relative (far inside the 2% any estimator comparison would allow), so a formula drift
fails loudly. Sizes are small: the whole module runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll
from sklearn.neighbors import NearestNeighbors

from analysis import MLE, EffectiveRank, TwoNN, knn_distances

skdim = pytest.importorskip("skdim")

ROUND_OFF = 1e-6  # relative agreement required with skdim (same formula, different arithmetic order)


def _rel(a: float | np.ndarray, b: float | np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


def _gaussian(n: int, d: int, D: int, seed: int) -> np.ndarray:
    """A d-dimensional Gaussian linearly embedded in R^D (intrinsic dimension d)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, D))


def _sphere(n: int, seed: int) -> np.ndarray:
    """Uniform points on the 2-sphere, rotated into R^10 (intrinsic dimension 2)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.standard_normal((10, 3)))
    return v @ q.T


DATASETS = {
    "gaussian5_in_64d": (lambda: _gaussian(2000, 5, 64, seed=0), 5),
    "sphere2_in_10d": (lambda: _sphere(2000, seed=1), 2),
    "swiss_roll": (lambda: make_swiss_roll(2000, noise=0.0, random_state=2)[0], 2),
}


@pytest.fixture(scope="module", params=list(DATASETS))
def known_dimension(request) -> tuple[np.ndarray, int]:
    make, dim = DATASETS[request.param]
    return make(), dim


# --------------------------------------------------------------------------------------- global estimates


def test_twonn_matches_skdim_and_the_true_dimension(known_dimension):
    X, true_dim = known_dimension
    ours = TwoNN(discard_fraction=0.1).fit(X).dimension_
    ref = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
    assert isinstance(ours, float)
    assert _rel(ours, ref) < ROUND_OFF, (ours, ref)
    assert abs(ours - true_dim) / true_dim < 0.15, ours


def test_mle_matches_skdim_and_the_true_dimension(known_dimension):
    X, true_dim = known_dimension
    ours = MLE(n_neighbors=20).fit(X).dimension_
    ref = skdim.id.MLE().fit(X, n_neighbors=20, comb="mle").dimension_
    assert isinstance(ours, float)
    assert _rel(ours, ref) < ROUND_OFF, (ours, ref)
    assert abs(ours - true_dim) / true_dim < 0.15, ours


def test_unbiased_mle_matches_skdims_unbiased_option():
    X = _gaussian(600, 4, 32, seed=3)
    ours = MLE(n_neighbors=10, unbiased=True).fit(X).dimension_
    ref = skdim.id.MLE(unbiased=True).fit(X, n_neighbors=10).dimension_
    assert _rel(ours, ref) < ROUND_OFF
    assert ours < MLE(n_neighbors=10).fit(X).dimension_  # k-2 < k-1 in the numerator


def test_twonn_discard_fraction_is_honoured_like_skdim():
    X = _gaussian(500, 3, 20, seed=4)
    half = TwoNN(0.5).fit(X).dimension_
    assert _rel(half, skdim.id.TwoNN(discard_fraction=0.5).fit(X).dimension_) < ROUND_OFF
    # discard_fraction=0 still leaves out the largest ratio (F = 1 there, -log(1 - F) = inf), which is
    # skdim with a fraction that drops exactly one of the 500 ratios; skdim itself fails at 0.
    none = TwoNN(0.0).fit(X).dimension_
    assert np.isfinite(none)
    assert _rel(none, skdim.id.TwoNN(discard_fraction=0.5 / 500).fit(X).dimension_) < ROUND_OFF
    assert none != half


# ---------------------------------------------------------------------------------- pointwise estimates


def test_twonn_fit_pw_matches_skdim_pointwise():
    X = _gaussian(300, 5, 16, seed=5)
    est = TwoNN().fit_pw(X, n_neighbors=30)
    ref = skdim.id.TwoNN().fit_pw(X, n_neighbors=30).dimension_pw_
    assert est.dimension_pw_.shape == (300,)
    np.testing.assert_array_equal(est.pw_index_, np.arange(300))
    assert _rel(est.dimension_pw_, ref) < ROUND_OFF
    assert est.n_neighbors_ == 30


def test_twonn_fit_pw_handles_tied_neighbours_like_skdim():
    # A 7 x 5 lattice with spacings 1 and 1.5: interior points have two neighbours at exactly the same
    # distance (mu = 1), edge points do not. n_neighbors = n - 1 makes every neighbourhood "all other
    # points", so tie-breaking in the kNN search cannot make the two implementations differ.
    grid = np.stack(np.meshgrid(np.arange(7) * 1.0, np.arange(5) * 1.5), -1).reshape(-1, 2)
    X = np.hstack([grid, np.zeros((35, 1))])
    ours = TwoNN().fit_pw(X, n_neighbors=34).dimension_pw_
    ref = skdim.id.TwoNN().fit_pw(X, n_neighbors=34).dimension_pw_
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_twonn_of_a_lattice_with_all_ratios_one_is_zero_like_skdim():
    X = np.stack(np.meshgrid(np.arange(6.0), np.arange(6.0)), -1).reshape(-1, 2)
    assert TwoNN().fit(X).dimension_ == skdim.id.TwoNN().fit(X).dimension_ == 0.0


def test_mle_fit_pw_matches_skdims_local_estimates():
    X = _gaussian(300, 5, 16, seed=6)
    est = MLE().fit_pw(X, n_neighbors=15)
    ref = skdim.id.MLE().fit(X, n_neighbors=15).dimension_pw_
    assert _rel(est.dimension_pw_, ref) < ROUND_OFF
    # Global MLE is the MacKay-Ghahramani average of exactly these local estimates.
    glob = MLE(n_neighbors=15).fit(X).dimension_
    assert glob == pytest.approx(1.0 / np.mean(1.0 / est.dimension_pw_), rel=1e-12)


# ------------------------------------------------------------------------------------------------- kNN


def test_knn_distances_equal_brute_force_sklearn():
    X = np.random.default_rng(7).standard_normal((400, 24))
    ref_d, ref_i = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(X).kneighbors()
    for refine in (False, True):
        d, i = knn_distances(X, 7, refine=refine)
        assert d.shape == i.shape == (400, 7) and i.dtype == torch.int64
        np.testing.assert_allclose(d.numpy(), ref_d, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(i.numpy(), ref_i)
    assert bool((d[:, 1:] >= d[:, :-1]).all())  # ascending
    assert not bool((i == torch.arange(400)[:, None]).any())  # the point itself is excluded


def test_knn_distances_chunked_equals_unchunked():
    X = torch.randn(300, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    d_full, i_full = knn_distances(X, 5, chunk_size=300)
    for chunk in (1, 7, 128):
        d, i = knn_distances(X, 5, chunk_size=chunk)
        assert torch.equal(i, i_full)
        torch.testing.assert_close(d, d_full, rtol=0, atol=1e-12)


def test_knn_distances_never_builds_more_than_chunk_rows_of_distances(monkeypatch):
    n, chunk = 250, 16
    largest = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    knn_distances(torch.randn(n, 8), 3, chunk_size=chunk)
    assert largest and max(largest) <= chunk * n


def test_knn_distances_rejects_bad_arguments():
    X = np.random.default_rng(9).standard_normal((10, 3))
    with pytest.raises(ValueError, match="at least 11 points"):
        knn_distances(X, 10)
    with pytest.raises(ValueError, match="k must be"):
        knn_distances(X, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_distances(X, 2, chunk_size=0)


# ------------------------------------------------------------------------------------------ duplicates


def _with_duplicates(X: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dup = np.concatenate([X, X[rng.integers(0, len(X), 120)], X[:5], X[:5]])
    return dup[rng.permutation(len(dup))]


def test_duplicate_rows_give_the_estimate_of_the_deduplicated_data():
    X = _gaussian(500, 4, 24, seed=10)
    Xdup = _with_duplicates(X, seed=11)
    for est in (TwoNN(), MLE(n_neighbors=10)):
        clean = type(est)(**est.get_params()).fit(X).dimension_
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # duplicates are handled, not warned about
            got = est.fit(Xdup)
        assert np.isfinite(got.dimension_)
        assert got.dimension_ == pytest.approx(clean, rel=1e-10)
        assert got.n_points_used_ == 500


def test_fit_pw_with_duplicates_returns_one_finite_value_per_distinct_point():
    X = _gaussian(200, 3, 12, seed=12)
    Xdup = _with_duplicates(X, seed=13)
    for est in (TwoNN(), MLE()):
        got = est.fit_pw(Xdup, n_neighbors=20)
        assert got.dimension_pw_.shape == got.pw_index_.shape == (200,)
        assert np.isfinite(got.dimension_pw_).all()
        kept = Xdup[got.pw_index_]
        assert len(np.unique(kept, axis=0)) == 200  # one entry per distinct row
        assert (np.diff(got.pw_index_) > 0).all()
        # pw_index_ points at the first occurrence of each distinct row
        first = {row.tobytes(): i for i, row in reversed(list(enumerate(Xdup)))}
        assert sorted(first.values()) == got.pw_index_.tolist()
        same = type(est)().fit_pw(kept, n_neighbors=20).dimension_pw_
        np.testing.assert_allclose(got.dimension_pw_, same, rtol=1e-12)


def test_too_few_distinct_points_raises_with_the_counts():
    rng = np.random.default_rng(14)
    two = np.repeat(rng.standard_normal((2, 5)), 50, axis=0)
    with pytest.raises(ValueError, match=r"2 distinct points \(100 rows.*3 distinct points are needed"):
        TwoNN().fit(two)
    fifteen = np.repeat(rng.standard_normal((15, 5)), 4, axis=0)
    with pytest.raises(ValueError, match=r"15 distinct points \(60 rows.*21 distinct points are needed"):
        MLE(n_neighbors=20).fit(fifteen)
    with pytest.raises(ValueError, match=r"15 distinct points.*31 distinct points are needed"):
        TwoNN().fit_pw(fifteen, n_neighbors=30)
    with pytest.raises(ValueError, match=r"15 distinct points.*16 distinct points are needed"):
        MLE().fit_pw(fifteen, n_neighbors=15)


# --------------------------------------------------------------------------------- inputs and protocol


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.zeros(10), "2-D"),
        (np.zeros((4, 5, 6)), "2-D"),
        (np.array([[0.0, 1.0]] * 29 + [[np.nan, 0.0]]), "NaN or inf"),
        (np.array([[0.0, 1.0]] * 29 + [[np.inf, 0.0]]), "NaN or inf"),
        (np.zeros((2, 3)), "at least 3 points"),
        (np.array([["a", "b"]] * 30), "numeric"),
    ],
)
def test_invalid_input_raises_a_clear_value_error(X, message):
    with pytest.raises(ValueError, match=message):
        TwoNN().fit(X)


def test_constructors_only_store_parameters_and_fit_validates_them():
    est = TwoNN(discard_fraction=1.5)  # no work, no validation in __init__ (sklearn convention)
    assert est.get_params() == {"discard_fraction": 1.5, "chunk_size": None}
    with pytest.raises(ValueError, match="discard_fraction"):
        est.fit(_gaussian(50, 2, 4, seed=15))
    assert est.set_params(discard_fraction=0.2) is est and est.discard_fraction == 0.2
    with pytest.raises(ValueError, match="n_neighbors"):
        MLE(n_neighbors=1).fit(_gaussian(50, 2, 4, seed=15))
    with pytest.raises(ValueError, match="unknown parameter"):
        MLE().set_params(k=3)


def test_float16_input_is_computed_in_float64():
    X = _gaussian(800, 4, 32, seed=16)
    X16 = X.astype(np.float16)
    for est in (TwoNN(), MLE(), EffectiveRank()):
        as16 = type(est)().fit(X16).dimension_
        as64 = type(est)().fit(X16.astype(np.float64)).dimension_
        from_tensor = type(est)().fit(torch.from_numpy(X16)).dimension_
        assert np.isfinite(as16)
        assert as16 == pytest.approx(as64, rel=1e-12) == from_tensor
        assert as16 == pytest.approx(type(est)().fit(X).dimension_, rel=0.02)
    d, _ = knn_distances(X16, 3)
    assert d.dtype == torch.float64


def test_inference_mode_tensors_are_accepted():
    with torch.inference_mode():
        X = torch.randn(300, 16, generator=torch.Generator().manual_seed(17))
    assert np.isfinite(TwoNN().fit(X).dimension_)
    assert np.isfinite(MLE().fit(X).dimension_)
    assert np.isfinite(TwoNN().fit_pw(X, n_neighbors=20).dimension_pw_).all()
    assert np.isfinite(EffectiveRank().fit(X).dimension_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_is_computed_on_the_gpu_and_agrees_with_cpu():
    X = torch.from_numpy(_gaussian(1000, 5, 64, seed=18)).float()
    d, i = knn_distances(X.cuda(), 10)
    assert d.is_cuda and i.is_cuda
    for est in (TwoNN(), MLE(), EffectiveRank()):
        cpu = type(est)().fit(X).dimension_
        assert type(est)().fit(X.cuda()).dimension_ == pytest.approx(cpu, rel=1e-4)
    cpu_pw = TwoNN().fit_pw(X, n_neighbors=32).dimension_pw_
    np.testing.assert_allclose(TwoNN().fit_pw(X.cuda(), n_neighbors=32).dimension_pw_, cpu_pw, rtol=1e-3)


def test_analysis_imports_nothing_heavy_or_from_the_app():
    code = (
        "import sys, analysis.series\n"
        "assert 'torch' not in sys.modules, 'importing a light submodule pulled in torch'\n"
        "from analysis import TwoNN, MLE, EffectiveRank, knn_distances\n"
        "import analysis.knn, analysis.lid, analysis.spectra\n"
        "bad = [m for m in ('mlflow', 'transformers', 'workbench', 'pipelines', 'sklearn', 'skdim')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------------- effective rank


def test_effective_rank_of_r_equal_singular_values_is_r():
    rng = np.random.default_rng(19)
    for r in (1, 3, 7):
        u, _ = np.linalg.qr(rng.standard_normal((60, r)))
        v, _ = np.linalg.qr(rng.standard_normal((20, r)))
        X = 3.0 * u @ v.T  # singular values: r times 3, then zeros
        est = EffectiveRank().fit(X)
        assert est.dimension_ == pytest.approx(r, rel=1e-4)
        assert est.singular_values_.shape == (20,)
        np.testing.assert_allclose(est.singular_values_[:r], 3.0, rtol=1e-10)


def test_effective_rank_matches_a_numpy_reference():
    rng = np.random.default_rng(20)
    X = rng.standard_normal((200, 32)) * np.geomspace(10.0, 0.01, 32) + 5.0

    def rankme(A: np.ndarray, eps: float = 1e-7) -> float:
        s = np.linalg.svd(A, compute_uv=False)
        p = s / s.sum() + eps
        return float(np.exp(-(p * np.log(p)).sum()))

    plain = EffectiveRank().fit(X)
    centred = EffectiveRank(center=True).fit(X)
    assert plain.dimension_ == pytest.approx(rankme(X), rel=1e-10)
    assert centred.dimension_ == pytest.approx(rankme(X - X.mean(0)), rel=1e-10)
    np.testing.assert_allclose(plain.singular_values_, np.linalg.svd(X, compute_uv=False), rtol=1e-10)
    assert plain.dimension_ < centred.dimension_  # the +5 offset is one dominant direction


def test_effective_rank_of_a_zero_matrix_raises():
    with pytest.raises(ValueError, match="no non-zero singular value"):
        EffectiveRank().fit(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="after centring"):
        EffectiveRank(center=True).fit(np.ones((5, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_twonn_mle_equals_the_two_estimators_run_separately(seed):
    from analysis import twonn_mle

    X = _gaussian(800, 4, 32, seed=seed)
    X[:50] = X[50:100]  # duplicates are removed the same way in both paths
    twonn, mle = twonn_mle(X, n_neighbors=15)
    assert twonn == pytest.approx(TwoNN().fit(X).dimension_, rel=1e-12)
    assert mle == pytest.approx(MLE(n_neighbors=15).fit(X).dimension_, rel=1e-12)


def test_twonn_mle_gives_nan_for_the_estimate_that_lacks_points():
    from analysis import twonn_mle

    X = _gaussian(12, 2, 4, seed=3)
    twonn, mle = twonn_mle(X, n_neighbors=20)
    assert twonn == pytest.approx(TwoNN().fit(X).dimension_) and np.isnan(mle)
    assert all(np.isnan(v) for v in twonn_mle(X[:2], n_neighbors=20))
