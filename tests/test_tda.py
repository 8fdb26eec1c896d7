"""Max-min landmarks and landmark persistent homology (analysis.tda)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ripser import ripser
from scipy.spatial.distance import cdist

from analysis.tda import PersistentHomology, maxmin_landmarks

FEATURES = {"tda_h0_total", "tda_h1_total", "tda_h1_count", "tda_h1_max", "tda_h0_entropy", "tda_h1_entropy"}


def _cloud(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)) @ rng.standard_normal((5, d)) + 0.05 * rng.standard_normal((n, d))


def _circle(n: int, seed: int, noise: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, n)
    pts = np.stack([np.cos(t), np.sin(t), np.zeros(n)], 1) + noise * rng.standard_normal((n, 3))
    q, _ = np.linalg.qr(rng.standard_normal((16, 3)))
    return pts @ q.T  # the unit circle rotated into R^16


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_landmarks_are_max_min_and_the_first_is_seeded(dtype):
    X = _cloud(1500, 40, seed=1).astype(dtype)
    for seed in (0, 7):
        idx = maxmin_landmarks(X, 60, seed=seed)
        assert idx.dtype == np.int64 and len(set(idx.tolist())) == 60
        assert idx[0] == np.random.default_rng(seed).integers(1500)
        D = cdist(X.astype(np.float64), X[idx].astype(np.float64))
        for t in range(1, 60):
            to_set = D[:, :t].min(axis=1)
            # Each new landmark is (up to float32 round-off of the search) the point furthest from the set.
            assert to_set[idx[t]] == pytest.approx(to_set.max(), rel=1e-5 if dtype == np.float32 else 1e-12)
    assert maxmin_landmarks(X, 60, seed=0)[0] != maxmin_landmarks(X, 60, seed=7)[0]


def test_landmarks_from_torch_and_more_landmarks_than_points():
    X = torch.from_numpy(_cloud(30, 4, seed=2))
    idx = maxmin_landmarks(X, 100)
    assert sorted(idx.tolist()) == list(range(30))
    with pytest.raises(ValueError, match="n_landmarks"):
        maxmin_landmarks(X, 0)


def test_diagrams_equal_ripser_on_the_same_landmarks():
    X = _cloud(400, 12, seed=3)
    ph = PersistentHomology(n_landmarks=120, seed=4).fit(X)
    assert len(ph.landmarks_) == 120
    ref = ripser(X[ph.landmarks_], maxdim=1)["dgms"]
    assert len(ph.diagrams_) == 2
    for ours, theirs in zip(ph.diagrams_, ref, strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.sort(ours, axis=0), np.sort(theirs, axis=0), rtol=1e-9, atol=1e-12)
    assert set(ph.features_) == FEATURES
    assert ph.n_infinite_h0_ == 1


def test_circle_has_one_dominant_loop():
    X = _circle(300, seed=5)
    ph = PersistentHomology(n_landmarks=100).fit(X)
    f = ph.features_
    assert f["tda_h1_count"] == 1
    # The loop is born at ~ the landmark spacing and dies when the triangle inscribed in the circle fills
    # it (at sqrt(3) for a unit circle): lifetime ~ 1.6.
    assert 1.4 < f["tda_h1_max"] < 1.8
    assert f["tda_h1_max"] > 0.9 * f["tda_h1_total"]
    assert f["tda_h1_entropy"] < 0.5
    h0 = ph.diagrams_[0]
    assert np.isinf(h0[:, 1]).sum() == 1
    assert f["tda_h0_total"] == pytest.approx(np.sum(h0[np.isfinite(h0[:, 1]), 1]))


def test_two_clusters_have_one_large_finite_h0_bar():
    rng = np.random.default_rng(6)
    X = np.vstack([rng.standard_normal((100, 8)) * 0.01, rng.standard_normal((100, 8)) * 0.01 + 10.0])
    ph = PersistentHomology(n_landmarks=50, maxdim=0).fit(X)
    life = ph.diagrams_[0][:, 1]
    finite = np.sort(life[np.isfinite(life)])
    gap = np.linalg.norm(X[:100].mean(0) - X[100:].mean(0))
    assert finite[-1] == pytest.approx(gap, rel=0.02)  # the merge of the two clusters
    assert finite[-2] < 0.1  # everything else merges inside a cluster
    assert ph.features_["tda_h1_total"] == 0 and ph.features_["tda_h1_count"] == 0
    assert ph.features_["tda_h0_total"] == pytest.approx(finite.sum())
    # Persistent entropy of lifetimes l: -sum p log p with p = l / sum(l).
    p = finite[finite > 0] / finite.sum()
    assert ph.features_["tda_h0_entropy"] == pytest.approx(-(p * np.log(p)).sum())


def test_h1_threshold_default_and_explicit():
    X = _circle(200, seed=7, noise=0.05)
    ph = PersistentHomology(n_landmarks=80).fit(X)
    h0 = ph.diagrams_[0][:, 1]
    assert ph.h1_threshold_ == pytest.approx(0.1 * h0[np.isfinite(h0)].max())
    life1 = ph.diagrams_[1][:, 1] - ph.diagrams_[1][:, 0]
    assert PersistentHomology(n_landmarks=80, h1_threshold=0.0).fit(X).features_["tda_h1_count"] == len(life1)


def test_fewer_points_than_landmarks_uses_all_points():
    X = _cloud(40, 6, seed=8)
    ph = PersistentHomology(n_landmarks=500).fit(X)
    assert sorted(ph.landmarks_.tolist()) == list(range(40))
    assert all(np.isfinite(v) for v in ph.features_.values())


def test_bad_input_raises_a_clear_value_error():
    X = _cloud(50, 4, seed=9)
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PersistentHomology().fit(X_nan)
    with pytest.raises(ValueError, match="identical"):
        PersistentHomology().fit(np.ones((20, 3)))
    with pytest.raises(ValueError, match="at least 2 points"):
        PersistentHomology().fit(X[:1])
    with pytest.raises(ValueError, match="maxdim"):
        PersistentHomology(maxdim=2).fit(X)
    with pytest.raises(ValueError, match="n_landmarks"):
        PersistentHomology(n_landmarks=1).fit(X)
    with pytest.raises(ValueError, match="h1_threshold"):
        PersistentHomology(h1_threshold=-1.0).fit(X)


def test_duplicates_and_estimator_protocol():
    X = _cloud(60, 5, seed=10)
    ph = PersistentHomology(n_landmarks=30)
    assert not hasattr(ph, "features_")  # the constructor only stores parameters
    assert ph.set_params(seed=3) is ph and ph.get_params()["seed"] == 3
    f1 = ph.fit(X).features_
    f2 = PersistentHomology(n_landmarks=30, seed=3).fit(np.vstack([X, X[:10]])).features_
    assert all(np.isfinite(v) for v in f2.values())
    assert f1.keys() == f2.keys() == FEATURES
