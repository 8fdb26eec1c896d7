"""Persistent homology of hidden-state point clouds on max-min landmarks (Vietoris–Rips, via ripser).

* :func:`maxmin_landmarks` -- greedy furthest-point (max-min) landmark selection (Gonzalez 1985; de Silva &
  Carlsson 2004), exact, in torch.
* :class:`PersistentHomology` -- Rips persistence diagrams of the landmarks (ripser, Bauer 2021) and a few
  scalar summaries of them for tracking during training.

A Rips complex on all n points is out of reach for n in the tens of thousands; max-min landmarks are the
standard witness/landmark reduction: they cover the cloud with radius equal to the last selection distance,
so the landmark diagrams are within that radius (bottleneck distance, by stability) of the full ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from analysis.base import Estimator, check_int
from analysis.knn import ArrayLike, as_points

# Points re-evaluated per round of the lazy max-min search: large enough that one round usually settles a
# step, small enough that a round is a cheap [batch, new landmarks, d] matmul.
_LAZY_BATCH = 256
# Clouds with at most this many coordinates (16 MiB of float32) use the plain update (see _maxmin).
_EAGER_ELEMENTS = 2**22


def _sq_dists(P: torch.Tensor, sqP: torch.Tensor, L: torch.Tensor, sqL: torch.Tensor) -> torch.Tensor:
    """Squared distances [p, l] between rows of P and L (centred coordinates, clamped at 0)."""
    return torch.addmm(sqL[None, :], P, L.T, alpha=-2.0).add_(sqP[:, None]).clamp_min_(0.0)


def maxmin_landmarks(X: ArrayLike, n_landmarks: int, seed: int = 0) -> np.ndarray:
    """Greedy max-min (furthest-point) landmarks: the first is drawn at random (``seed``), every next one is
    the point furthest from those already chosen (Gonzalez 1985; de Silva & Carlsson 2004).

    Exact and lazy: every point keeps an *upper bound* on its distance to the chosen set (the distance to
    the landmarks it was last compared with; adding landmarks only lowers it). A step re-evaluates only the
    points with the largest bounds, against just the landmarks added since each was last updated, until the
    best exact value beats every remaining bound. That is the same selection as updating all n distances
    after every landmark (O(n m d), memory-bound), at a fraction of the work on typical clouds. Ties are
    broken towards the lowest index among the points evaluated in the deciding round.

    Distances are computed in :func:`analysis.knn.compute_dtype` of X (float32 for float32 input) on
    centred points. Returns int64 indices into X in selection order; if ``n_landmarks >= n_points`` all
    points are returned (still in max-min order). Exact duplicate points are never selected twice while a
    point at positive distance remains; once the whole cloud is covered (all remaining distances 0) the
    remaining landmarks are duplicates, chosen by lowest index.
    """
    who = "maxmin_landmarks"
    m = check_int(n_landmarks, "n_landmarks", 1, who, "a positive integer")
    pts = as_points(X, min_points=1, who=who)
    return _maxmin(pts, m, seed).cpu().numpy()


def _maxmin(pts: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    n = pts.shape[0]
    m = min(m, n)
    dev = pts.device
    Xc = pts - pts.mean(dim=0, keepdim=True)
    sq = Xc.square().sum(dim=1)
    first = int(np.random.default_rng(seed).integers(n))
    chosen = torch.empty(m, dtype=torch.long, device=dev)
    chosen[0] = first
    # bound[i]: squared distance from i to the first last[i] landmarks (exact for those, an upper bound for
    # the distance to the whole chosen set). Chosen points get -inf so they are never picked again.
    bound = _sq_dists(Xc, sq, Xc[first : first + 1], sq[first : first + 1]).squeeze(1)
    last = torch.ones(n, dtype=torch.long, device=dev)
    bound[first] = -math.inf
    if n * Xc.shape[1] <= _EAGER_ELEMENTS:
        # Small clouds stay in cache: updating every point after each landmark (one matrix-vector product)
        # is cheaper than the lazy search's bookkeeping.
        for t in range(1, m):
            i = int(torch.argmax(bound))
            chosen[t] = i
            d2 = _sq_dists(Xc, sq, Xc[i : i + 1], sq[i : i + 1]).squeeze(1)
            torch.minimum(bound, d2, out=bound)
            bound[i] = -math.inf
        return chosen
    batch = min(n, _LAZY_BATCH)
    for t in range(1, m):
        while True:
            vals, cand = torch.topk(bound, batch, sorted=True)
            stale_from = int(last[cand].min())
            if stale_from < t:
                # Bring the batch up to date against landmarks stale_from .. t-1 (only columns a point has
                # not seen yet count: the min with its bound covers the older ones).
                L = chosen[stale_from:t]
                d2 = _sq_dists(Xc[cand], sq[cand], Xc[L], sq[L])
                seen = torch.arange(stale_from, t, device=dev)[None, :] < last[cand][:, None]
                d2.masked_fill_(seen, math.inf)
                upd = torch.minimum(vals, d2.amin(dim=1))
                upd = torch.where(vals == -math.inf, vals, upd)
                bound[cand] = upd
                last[cand] = t
            else:
                upd = vals
            best = int(torch.argmax(upd))
            # Exact value of the best re-evaluated point beats the bound of every point outside the batch.
            rest = float(vals[-1]) if batch < n else -math.inf
            if float(upd[best]) >= rest or batch == n:
                break
            if stale_from >= t:  # the whole batch was exact and still ties the boundary: widen the batch
                batch = min(n, 2 * batch)
        i = int(cand[best])
        chosen[t] = i
        bound[i] = -math.inf
    return chosen


def _persistent_entropy(lifetimes: np.ndarray) -> float:
    """Persistent entropy -sum p log p, p = l / sum(l), of finite positive lifetimes (Chintakunta et al.
    2015; Atienza et al. 2019); 0 for an empty diagram."""
    life = lifetimes[lifetimes > 0]
    if life.size == 0:
        return 0.0
    p = life / life.sum()
    return float(-(p * np.log(p)).sum())


class PersistentHomology(Estimator):
    """Vietoris–Rips persistent homology (H0, H1) of a point cloud on max-min landmarks, via ripser.

    ``fit(X)`` selects ``n_landmarks`` max-min landmarks (:func:`maxmin_landmarks`, seeded), computes their
    pairwise Euclidean distance matrix in float64 (torch, from coordinate differences' Gram form on centred
    float64 points) and runs ``ripser(D, maxdim=maxdim, distance_matrix=True)`` (Bauer 2021). With fewer
    points than ``n_landmarks`` all points are used. Exact duplicate points add nothing to a Rips filtration
    but zero-length H0 bars, which ripser drops; they are kept as they come.

    Scalar features (``features_``), following the topological summaries used for neural representations
    (e.g. Rieck et al. 2019; Naitzat et al. 2020):

    * ``tda_h0_total``, ``tda_h1_total`` -- total persistence: sum of finite bar lifetimes (death - birth).
      The single infinite H0 bar (the component that never dies) is excluded from every H0 feature; it is
      reported separately as ``n_infinite_h0_`` (always 1 for a non-empty cloud).
    * ``tda_h1_count`` -- H1 bars with lifetime > ``h1_threshold``. Default threshold: 10 % of the largest
      finite H0 death (the scale at which the landmarks become connected), which separates loops from the
      short-lived bars that Rips noise produces; an explicit float is an absolute distance.
    * ``tda_h1_max`` -- longest H1 lifetime (0 if none).
    * ``tda_h0_entropy``, ``tda_h1_entropy`` -- persistent entropy of the finite lifetimes (Chintakunta et
      al. 2015; Atienza, Gonzalez-Diaz & Rucco 2019): -sum p_i log p_i with p_i = l_i / sum l (0 if no bar).

    Parameters
    ----------
    n_landmarks : int
        Landmarks (>= 2). ripser's cost grows quickly with it; benchmarks/results/geometry.md ("Persistent
        homology") has the time with 500.
    maxdim : int
        Highest homology dimension (0 or 1). With 0 the H1 features are 0.
    h1_threshold : float, optional
        Absolute lifetime threshold for ``tda_h1_count`` (default: 0.1 x the largest finite H0 death).
    seed : int
        Seed of the first landmark.

    Attributes
    ----------
    diagrams_ : list of np.ndarray [n_bars, 2]
        ripser's diagrams [H0, H1, ...] of the landmarks (H0 includes its one infinite bar, death = inf).
    landmarks_ : np.ndarray
        Indices of the landmarks in X (max-min order).
    features_ : dict[str, float]
        The six features above.
    h1_threshold_ : float
        Threshold used for ``tda_h1_count``.
    n_infinite_h0_ : int
        Number of infinite H0 bars (connected components at every scale).

    Raises ``ValueError`` for non-finite input (NaN/inf rows), fewer than 2 points, or a cloud of identical
    points (no positive distance: every diagram would be empty and every feature degenerate).
    """

    def __init__(
        self, n_landmarks: int = 500, maxdim: int = 1, h1_threshold: float | None = None, seed: int = 0
    ) -> None:
        self.n_landmarks = n_landmarks
        self.maxdim = maxdim
        self.h1_threshold = h1_threshold
        self.seed = seed

    def fit(self, X: ArrayLike, y: Any = None) -> PersistentHomology:
        """Select landmarks of X [n_points, n_features], compute their diagrams and features."""
        from ripser import ripser  # imported here: only this estimator needs it

        who = "PersistentHomology.fit"
        m = check_int(self.n_landmarks, "n_landmarks", 2, who)
        if self.maxdim not in (0, 1):
            raise ValueError(f"{who}: maxdim must be 0 or 1, got {self.maxdim!r}")
        thr = self.h1_threshold
        if thr is not None and (isinstance(thr, bool) or not isinstance(thr, int | float) or not thr >= 0):
            raise ValueError(f"{who}: h1_threshold must be None or a float >= 0, got {thr!r}")
        pts = as_points(X, min_points=2, who=who)
        landmarks = _maxmin(pts, m, int(self.seed))
        L = pts[landmarks].to(torch.float64)
        L = L - L.mean(dim=0, keepdim=True)
        sqL = L.square().sum(dim=1)
        D = _sq_dists(L, sqL, L, sqL).sqrt_()
        D.fill_diagonal_(0.0)
        D = torch.maximum(D, D.T)  # exactly symmetric, as ripser expects of a distance matrix
        if not float(D.max()) > 0:
            raise ValueError(f"{who}: all points of X are identical; persistent homology is undefined")
        dgms = ripser(D.cpu().numpy(), maxdim=int(self.maxdim), distance_matrix=True)["dgms"]
        h0 = dgms[0]
        finite0 = h0[np.isfinite(h0[:, 1])]
        life0 = finite0[:, 1] - finite0[:, 0]
        h1 = dgms[1] if self.maxdim >= 1 else np.zeros((0, 2))
        life1 = h1[:, 1] - h1[:, 0]
        max_h0 = float(finite0[:, 1].max()) if finite0.size else 0.0
        self.h1_threshold_ = float(thr) if thr is not None else 0.1 * max_h0
        self.diagrams_ = [np.asarray(d) for d in dgms]
        self.landmarks_ = landmarks.cpu().numpy()
        self.n_infinite_h0_ = int(np.isinf(h0[:, 1]).sum())
        self.features_ = {
            "tda_h0_total": float(life0.sum()),
            "tda_h1_total": float(life1.sum()),
            "tda_h1_count": float((life1 > self.h1_threshold_).sum()),
            "tda_h1_max": float(life1.max()) if life1.size else 0.0,
            "tda_h0_entropy": _persistent_entropy(life0),
            "tda_h1_entropy": _persistent_entropy(life1),
        }
        return self
