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
import skdim
import torch
from sklearn.datasets import make_swiss_roll
from sklearn.neighbors import NearestNeighbors

from analysis import MLE, EffectiveRank, TwoNN, knn_distances
from analysis.lid import lPCA
from analysis.spectra import AlphaReQ, ParticipationRatio

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


def test_twonn_fit_pw_is_exact_where_a_neighbours_own_list_misses_the_neighbourhood(monkeypatch):
    # The fast path reads j's two nearest inside N_i off j's own k-nearest list; a j whose list holds fewer
    # than two members of N_i takes the direct computation. Heavy-tailed clouds make such j common.
    import analysis.lid as lid

    direct_rows = []
    real = lid.refined_sq_distances

    def spy(X, idx, queries=None):
        if queries is not None:
            direct_rows.append(len(queries))
        return real(X, idx, queries)

    monkeypatch.setattr(lid, "refined_sq_distances", spy)
    rng = np.random.default_rng(3)
    X = rng.standard_t(df=2, size=(400, 12))
    ours = TwoNN().fit_pw(X, n_neighbors=20).dimension_pw_
    ref = skdim.id.TwoNN().fit_pw(X, n_neighbors=20).dimension_pw_
    assert sum(direct_rows) > 0
    assert _rel(ours, ref) < ROUND_OFF


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
    for est in (TwoNN(), MLE(n_neighbors=10), lPCA()):
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
    for est in (TwoNN(), MLE(), lPCA()):
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


def test_every_estimator_shares_the_one_base_class():
    from analysis import Estimator, PersistentHomology

    for cls in (TwoNN, MLE, lPCA, EffectiveRank, ParticipationRatio, AlphaReQ, PersistentHomology):
        est = cls()
        assert isinstance(est, Estimator)
        assert type(est)(**est.get_params()).get_params() == est.get_params()  # an unfitted copy
        assert repr(est).startswith(f"{cls.__name__}(")
    assert ParticipationRatio().get_params() == {}
    assert repr(PersistentHomology(n_landmarks=30)) == (
        "PersistentHomology(n_landmarks=30, maxdim=1, h1_threshold=None, seed=0)"
    )


def test_float16_input_is_computed_in_float64():
    X = _gaussian(800, 4, 32, seed=16)
    X16 = X.astype(np.float16)
    for est in (TwoNN(), MLE(), EffectiveRank(), lPCA(), ParticipationRatio()):
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
    assert lPCA().fit_pw(X, n_neighbors=20).dimension_pw_.shape == (300,)
    assert np.isfinite(ParticipationRatio().fit(X).dimension_)
    assert np.isfinite(AlphaReQ().fit(X).alpha_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_is_computed_on_the_gpu_and_agrees_with_cpu():
    X = torch.from_numpy(_gaussian(1000, 5, 64, seed=18)).float()
    d, i = knn_distances(X.cuda(), 10)
    assert d.is_cuda and i.is_cuda
    for est in (TwoNN(), MLE(), EffectiveRank(), lPCA(), ParticipationRatio()):
        cpu = type(est)().fit(X).dimension_
        assert type(est)().fit(X.cuda()).dimension_ == pytest.approx(cpu, rel=1e-4)
    assert AlphaReQ().fit(X.cuda()).alpha_ == pytest.approx(AlphaReQ().fit(X).alpha_, rel=1e-3)
    cpu_pw = TwoNN().fit_pw(X, n_neighbors=32).dimension_pw_
    np.testing.assert_allclose(TwoNN().fit_pw(X.cuda(), n_neighbors=32).dimension_pw_, cpu_pw, rtol=1e-3)
    # float32 kNN on the GPU may order near-tied neighbours differently; the neighbourhoods hardly change.
    same = lPCA().fit_pw(X.cuda(), n_neighbors=32).dimension_pw_ == lPCA().fit_pw(X, n_neighbors=32).dimension_pw_
    assert same.mean() > 0.99


def test_analysis_imports_nothing_heavy_or_from_the_app():
    code = (
        "import sys, analysis.series\n"
        "assert 'torch' not in sys.modules, 'importing a light submodule pulled in torch'\n"
        "from analysis import TwoNN, MLE, EffectiveRank, knn_distances\n"
        "from analysis.lid import lPCA\n"
        "from analysis.spectra import AlphaReQ, ParticipationRatio\n"
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
    # twonn_mle keeps float32 search values that are good to ~1e-5 (the estimators alone recompute all).
    assert twonn == pytest.approx(TwoNN().fit(X).dimension_, rel=1e-5)
    assert mle == pytest.approx(MLE(n_neighbors=15).fit(X).dimension_, rel=1e-5)


def test_twonn_mle_gives_nan_for_the_estimate_that_lacks_points():
    from analysis import twonn_mle

    X = _gaussian(12, 2, 4, seed=3)
    twonn, mle = twonn_mle(X, n_neighbors=20)
    assert twonn == pytest.approx(TwoNN().fit(X).dimension_) and np.isnan(mle)
    assert all(np.isnan(v) for v in twonn_mle(X[:2], n_neighbors=20))


# ------------------------------------------------------------------------------------------------------ lPCA
#
# lPCA counts eigenvalues, so agreement with skdim is exact (integers), globally and per point.

LPCA_VARIANTS = [
    ({"ver": "FO"}, {"ver": "FO"}),
    ({"ver": "FO", "alpha_fo": 0.2, "center": False}, {"ver": "FO", "alphaFO": 0.2, "center": False}),
    ({"ver": "ratio", "alpha_ratio": 0.9}, {"ver": "ratio", "alphaRatio": 0.9}),
    ({"ver": "ratio"}, {"ver": "ratio"}),
]


def _curved(n: int, seed: int) -> np.ndarray:
    """A 3-D curved manifold with unequal scales and a little noise in R^12: spectra without clean gaps."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1, 1, (n, 3)) * [3.0, 1.0, 0.4]
    feats = np.column_stack([t, np.sin(t[:, :1] * 2), t[:, 1:2] * t[:, 2:3], np.cos(t[:, 1:2])])
    return feats @ rng.standard_normal((6, 12)) + 0.01 * rng.standard_normal((n, 12))


# skdim computes eigenvalue ratios (gap_) that divide by the zero eigenvalues of rank-deficient data.
SKDIM_GAPS = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


@SKDIM_GAPS
@pytest.mark.parametrize(("ours", "theirs"), LPCA_VARIANTS)
def test_lpca_matches_skdim_exactly(known_dimension, ours, theirs):
    X, _ = known_dimension
    est = lPCA(**ours).fit(X)
    ref = skdim.id.lPCA(**theirs).fit(X)
    assert isinstance(est.dimension_, int) and est.dimension_ == ref.dimension_
    np.testing.assert_allclose(est.eigenvalues_, ref.explained_var_, rtol=1e-8, atol=1e-13 * ref.explained_var_[0])


@SKDIM_GAPS
@pytest.mark.parametrize(("ours", "theirs"), LPCA_VARIANTS)
def test_lpca_fit_pw_matches_skdim_pointwise_exactly(ours, theirs):
    X = _curved(300, seed=21)
    for k in (8, 25):  # k < d (rank-deficient neighbourhoods, Gram path) and k > d (covariance path)
        got = lPCA(**ours).fit_pw(X, n_neighbors=k)
        ref = skdim.id.lPCA(**theirs).fit_pw(X, n_neighbors=k).dimension_pw_
        assert got.dimension_pw_.dtype == np.int64 and got.n_neighbors_ == k
        np.testing.assert_array_equal(got.dimension_pw_, ref)
        if ours != {"ver": "ratio"}:  # skdim's default alpha_ratio = 0.05 gives 1 everywhere
            assert len(np.unique(ref)) > 1  # the data actually discriminate between implementations


def test_lpca_fit_pw_is_independent_of_the_chunk_size():
    X = _curved(200, seed=22)
    full = lPCA().fit_pw(X, n_neighbors=15).dimension_pw_
    for chunk in (1, 7, 64):
        np.testing.assert_array_equal(lPCA(chunk_size=chunk).fit_pw(X, n_neighbors=15).dimension_pw_, full)


def test_lpca_recovers_known_dimensions():
    # Linear data: FO is exact as long as the noise variance stays below alpha_fo x the top eigenvalue
    # (Fukunaga & Olsen 1971), so any miss here is a bug, not estimator bias.
    rng = np.random.default_rng(23)
    for d in (1, 5, 12):
        basis = np.linalg.qr(rng.standard_normal((40, d)))[0]
        X = rng.standard_normal((1000, d)) @ basis.T + 0.01 * rng.standard_normal((1000, 40))
        assert lPCA().fit(X).dimension_ == d
    # Curved 2-manifolds need 3 components globally but 2 locally (small neighbourhoods are nearly flat).
    sphere = _sphere(2000, seed=24)
    assert lPCA().fit(sphere).dimension_ == 3
    assert np.median(lPCA().fit_pw(sphere, n_neighbors=20).dimension_pw_) == 2
    roll = make_swiss_roll(2000, noise=0.0, random_state=25)[0]
    assert np.mean(lPCA().fit_pw(roll, n_neighbors=20).dimension_pw_ == 2) > 0.9
    # 'ratio': 4 equal variances hold 25, 50, 75, 100 % cumulatively, so 95 % needs all 4 and 60 % needs 3.
    X = _with_spectrum(np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 100, seed=26)
    assert lPCA(ver="ratio", alpha_ratio=0.95).fit(X).dimension_ == 4
    assert lPCA(ver="ratio", alpha_ratio=0.6).fit(X).dimension_ == 3


def test_lpca_rejects_bad_parameters():
    X = _gaussian(50, 2, 4, seed=27)
    assert lPCA(ver="maxgap").get_params()["ver"] == "maxgap"  # stored, validated at fit
    with pytest.raises(ValueError, match="lPCA.fit: ver must be 'FO' or 'ratio'"):
        lPCA(ver="maxgap").fit(X)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"alpha_fo must be in \(0, 1\)"):
            lPCA(alpha_fo=bad).fit(X)
    assert lPCA(ver="ratio", alpha_ratio=1.0).fit(X).dimension_ >= 1  # 1 is allowed for 'ratio'
    with pytest.raises(ValueError, match="n_neighbors"):
        lPCA().fit_pw(X, n_neighbors=1)


# ------------------------------------------------------------------------------ participation ratio, alpha


def _with_spectrum(eigenvalues: np.ndarray, n: int, seed: int, offset: float = 3.0) -> np.ndarray:
    """Points whose sample covariance (centred, / (n - 1)) has exactly the given eigenvalues, rotated."""
    rng = np.random.default_rng(seed)
    d = len(eigenvalues)
    A = rng.standard_normal((n, d))
    U, _ = np.linalg.qr(A - A.mean(0))  # orthonormal columns orthogonal to the all-ones vector
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return np.sqrt(n - 1) * U * np.sqrt(eigenvalues) @ V.T + offset


def test_participation_ratio_of_r_equal_eigenvalues_is_r():
    for r in (1, 3, 10):
        ev = np.concatenate([np.full(r, 2.5), np.zeros(16 - r)])
        est = ParticipationRatio().fit(_with_spectrum(ev, 200, seed=r))
        assert est.dimension_ == pytest.approx(r, rel=1e-10)
        np.testing.assert_allclose(est.eigenvalues_, ev, atol=1e-12)


def test_participation_ratio_matches_numpy_and_skdim():
    X = np.random.default_rng(28).standard_normal((300, 24)) * np.geomspace(5.0, 0.05, 24) + 1.0
    lam = np.linalg.eigvalsh(np.cov(X, rowvar=False))
    got = ParticipationRatio().fit(X).dimension_
    assert got == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
    assert got == pytest.approx(skdim.id.lPCA(ver="participation_ratio").fit(X).dimension_, rel=1e-10)
    assert 1.0 < got < 24.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_an_exact_power_law(alpha):
    ev = np.arange(1, 121, dtype=float) ** -alpha
    X = _with_spectrum(ev, 400, seed=29)
    for weighted in (False, True):
        est = AlphaReQ(first_rank=1, last_rank=None, weighted=weighted).fit(X)
        assert est.alpha_ == pytest.approx(alpha, rel=1e-9)
        assert est.r2_ == pytest.approx(1.0, abs=1e-9) and est.intercept_ == pytest.approx(0.0, abs=1e-8)
    default = AlphaReQ().fit(X)
    assert default.fit_range_ == (6, 100) and default.alpha_ == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(default.eigenvalues_, ev, rtol=1e-9)


def test_alpha_req_matches_a_numpy_reference():
    rng = np.random.default_rng(30)
    X = rng.standard_normal((500, 150)) * np.arange(1, 151) ** -0.7  # noisy power law, alpha ~ 1.4
    lam = np.sort(np.linalg.eigvalsh(np.cov(X, rowvar=False)))[::-1]
    i = np.arange(6, 101)
    plain = -np.polyfit(np.log(i), np.log(lam[5:100]), 1)[0]
    # The authors' code solves the weighted normal equations with weights 1 / i; np.polyfit weights the
    # residuals, so it gets sqrt(1 / i).
    weighted = -np.polyfit(np.log(i), np.log(lam[5:100]), 1, w=np.sqrt(1.0 / i))[0]
    assert AlphaReQ().fit(X).alpha_ == pytest.approx(plain, rel=1e-10)
    assert AlphaReQ(weighted=True).fit(X).alpha_ == pytest.approx(weighted, rel=1e-10)
    assert 1.0 < plain < 1.8
    short = AlphaReQ(first_rank=2, last_rank=20).fit(X)
    assert short.alpha_ == pytest.approx(-np.polyfit(np.log(np.arange(2, 21)), np.log(lam[1:20]), 1)[0], rel=1e-10)


def test_alpha_req_clips_the_fit_to_the_numerical_rank():
    ev = np.concatenate([np.arange(1, 31, dtype=float) ** -1.5, np.zeros(34)])  # rank 30 in 64 dimensions
    est = AlphaReQ().fit(_with_spectrum(ev, 200, seed=31))
    assert est.fit_range_ == (6, 30) and est.alpha_ == pytest.approx(1.5, rel=1e-8)
    with pytest.raises(ValueError, match=r"AlphaReQ.fit: .*ranks 6..100.*4 numerically non-zero"):
        AlphaReQ().fit(_with_spectrum(np.array([4.0, 3.0, 2.0, 1.0]), 50, seed=32))
    with pytest.raises(ValueError, match="last_rank"):
        AlphaReQ(first_rank=5, last_rank=5).fit(_with_spectrum(ev, 200, seed=31))


# ------------------------------------------------------------------------------------------ bad inputs
#
# Every estimator and both entry points: a clear ValueError that names the estimator and the counts, never a
# NaN estimate.

GLOBAL = {
    "TwoNN": TwoNN,
    "MLE": lambda: MLE(n_neighbors=5),
    "lPCA": lPCA,
    "EffectiveRank": EffectiveRank,
    "ParticipationRatio": ParticipationRatio,
    "AlphaReQ": lambda: AlphaReQ(first_rank=1, last_rank=None),
}
POINTWISE = {"TwoNN": TwoNN, "MLE": MLE, "lPCA": lPCA}


@pytest.mark.parametrize("name", list(GLOBAL))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_estimator_rejects_non_finite_rows(name, bad):
    X = _gaussian(40, 2, 4, seed=33)
    X[7, 1] = bad
    with pytest.raises(ValueError, match=rf"^{name}\.fit: X contains NaN or inf \(1 non-finite entries\)"):
        GLOBAL[name]().fit(X)
    if name in POINTWISE:
        with pytest.raises(ValueError, match=rf"^{name}\.fit_pw: X contains NaN or inf"):
            POINTWISE[name]().fit_pw(X, n_neighbors=5)


@pytest.mark.parametrize("name", list(GLOBAL))
def test_every_estimator_rejects_all_identical_points(name):
    X = np.tile([[1.0, -2.0, 0.5]], (50, 1))
    expected = {
        "EffectiveRank": None,  # uncentred, one non-zero singular value: a defined rank of 1, checked below
        "ParticipationRatio": r"all 50 points are identical",
        "AlphaReQ": r"all 50 points are identical",
    }.get(name, r"X has 1 distinct points \(50 rows before removing exact duplicates\)")
    if expected is None:
        assert GLOBAL[name]().fit(X).dimension_ == pytest.approx(1.0, rel=1e-5)
        with pytest.raises(ValueError, match=r"^EffectiveRank\.fit: .*after centring"):
            EffectiveRank(center=True).fit(X)
        return
    with pytest.raises(ValueError, match=rf"^{name}\.fit: {expected}"):
        GLOBAL[name]().fit(X)
    if name in POINTWISE:
        with pytest.raises(ValueError, match=rf"^{name}\.fit_pw: X has 1 distinct points \(50 rows"):
            POINTWISE[name]().fit_pw(X, n_neighbors=5)


@pytest.mark.parametrize("name", list(POINTWISE))
def test_every_estimator_rejects_fewer_points_than_neighbours(name):
    X = _gaussian(10, 2, 4, seed=34)
    with pytest.raises(ValueError, match=rf"^{name}\.fit_pw: needs at least 21 points, got 10"):
        POINTWISE[name]().fit_pw(X, n_neighbors=20)
    if name == "MLE":
        with pytest.raises(ValueError, match=r"^MLE\.fit: needs at least 21 points, got 10"):
            MLE(n_neighbors=20).fit(X)


def test_spectral_estimators_need_two_points():
    for name in ("lPCA", "ParticipationRatio", "AlphaReQ"):
        with pytest.raises(ValueError, match=rf"^{name}\.fit: needs at least 2 points, got 1"):
            GLOBAL[name]().fit(np.ones((1, 3)))


# ------------------------------------------------------------------------ skdim's benchmark manifolds


@pytest.fixture(scope="module")
def benchmark_manifolds() -> dict[str, tuple[np.ndarray, int]]:
    """A few of Hein & Audibert's / Campadelli et al.'s benchmark manifolds (skdim.datasets), n = 800."""
    bm = skdim.datasets.BenchmarkManifolds(random_state=0)
    names = ["M1_Sphere", "M5a_Helix1d", "M7_Roll", "M9_Affine", "M10a_Cubic", "M11_Moebius"]
    truth = bm.truth["Intrinsic Dimension"]
    data = bm.generate(n=800)  # generate(name) fails in skdim 0.5 for some names; "all" takes ~20 ms
    return {name: (data[name], int(truth[name])) for name in names}


@SKDIM_GAPS
def test_all_estimators_agree_with_skdim_on_the_benchmark_manifolds(benchmark_manifolds):
    for name, (X, _) in benchmark_manifolds.items():
        assert _rel(TwoNN().fit(X).dimension_, skdim.id.TwoNN().fit(X).dimension_) < ROUND_OFF, name
        assert _rel(MLE().fit(X).dimension_, skdim.id.MLE().fit(X, n_neighbors=20).dimension_) < ROUND_OFF, name
        assert lPCA().fit(X).dimension_ == skdim.id.lPCA().fit(X).dimension_, name


def test_recovery_on_benchmark_manifolds_within_the_reported_tolerance(benchmark_manifolds):
    # Low dimension (<= 10): TwoNN and MLE within 20 % at n = 800 (Facco et al. 2017, Fig. 3, and Campadelli
    # et al. 2015's benchmark report errors of this size for d <= 10). The 20-D affine space is
    # underestimated by both, as the literature describes for d >~ 10; only that direction is asserted.
    for name, (X, d) in benchmark_manifolds.items():
        twonn, mle = TwoNN().fit(X).dimension_, MLE().fit(X).dimension_
        if d <= 10:
            assert abs(twonn - d) / d < 0.2 and abs(mle - d) / d < 0.2, (name, d, twonn, mle)
        else:
            assert 0.6 * d < twonn < d and 0.6 * d < mle < d, (name, d, twonn, mle)
    X, d = benchmark_manifolds["M9_Affine"]
    assert lPCA().fit(X).dimension_ == d  # a linear space: PCA is exact


def test_pointwise_twonn_of_float32_near_duplicates_is_finite_and_matches_float64():
    """Distinct rows closer than float32 resolves in the Gram formula must not give an infinite ratio."""
    rng = np.random.default_rng(21)
    base = rng.normal(size=(200, 16)) * 10
    X = np.vstack([base, base[:40] + 1e-6 * rng.normal(size=(40, 16))])  # near-, not exact, duplicates
    ours32 = TwoNN().fit_pw(X.astype(np.float32), n_neighbors=30).dimension_pw_
    ours64 = TwoNN().fit_pw(X.astype(np.float32).astype(np.float64), n_neighbors=30).dimension_pw_
    assert np.isfinite(ours32).all()
    np.testing.assert_allclose(ours32, ours64, rtol=1e-2)  # before the float64 redo: inf, or off by 113 %
