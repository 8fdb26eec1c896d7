"""Intrinsic-dimension estimators of point clouds (TwoNN, Levina–Bickel MLE, lPCA), in torch, scikit-learn style.

TwoNN and MLE take the logarithm of nearest-neighbour distances, so a zero distance (a duplicated point)
would give inf/nan; lPCA uses the same point set so that the three estimators describe the same cloud. The
rule used throughout: **exact duplicate rows are removed before estimating**
(``torch.unique(dim=0)``, first occurrence kept). ``fit`` records how many distinct points were used in
``n_points_used_``; ``fit_pw`` returns one pointwise value per distinct point and the row indices of those
points in the input in ``pw_index_`` (ascending; ``arange(n)`` when X has no duplicates). If fewer distinct
points remain than an estimate needs, ``ValueError`` says how many there were and how many are needed.

Pointwise estimates are computed for all neighbourhoods at once (chunked batched matmuls and batched
eigenvalue decompositions), not per point.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from analysis.base import Estimator, check_chunk, check_int
from analysis.knn import ArrayLike, as_points, knn_from_points, refined_sq_distances, unique_rows

# Entries of the per-chunk neighbourhood tensors ([c, k, d] coordinates plus [c, k, k] distances) held at
# once (16 MiB in float64). Fewer, larger chunks mean fewer parallel regions, which matters most when the
# cores are shared with other processes.
_PW_CHUNK_ELEMENTS = 2**21
# Relative round-off tolerated in a squared kNN distance by the online estimates (twonn_mle): both use
# log distance ratios, so this moves them by at most ~1e-5 x the dimension, far inside the estimators' own
# statistical error, while only the few points whose float32 search value could be worse are recomputed in
# float64 (see knn_from_points; benchmarks/results/README.md, "TwoNN + MLE from one kNN search", gives how
# many on a 5 000 x 768 cloud).
_ONLINE_RTOL = 1e-5


def _distinct_points(X: ArrayLike, needed: int, what: str, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate X, drop its exact duplicate rows (module docstring) and require ``needed`` distinct points.

    Returns the distinct points and their row indices in X; ``what`` says in the error what they are for.
    """
    pts = as_points(X, min_points=needed, who=who)
    uniq, kept = unique_rows(pts)
    n_distinct, n_rows = uniq.shape[0], pts.shape[0]
    if n_distinct < needed:
        dup = f" ({n_rows} rows before removing exact duplicates)" if n_rows != n_distinct else ""
        raise ValueError(
            f"{who}: X has {n_distinct} distinct points{dup}, but {needed} distinct points are needed ({what})"
        )
    return uniq, kept


def _neighbourhood_points(X: ArrayLike, k: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_distinct_points` for estimates on each point's k nearest neighbours (k + 1 points needed)."""
    return _distinct_points(X, k + 1, f"n_neighbors={k} plus the point itself", who)


def _warn_nonfinite(values: torch.Tensor, who: str, why: str) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        warnings.warn(f"{who}: {bad} non-finite estimate(s): {why}", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------- TwoNN


def _twonn_min_points(discard_fraction: float) -> int:
    """Smallest N for which the fit keeps >= 2 ratios (n_keep of :func:`_twonn_slope`), and N >= 3."""
    n = max(3, math.ceil(2.0 / (1.0 - discard_fraction)))
    # Step up past float rounding in int(N * (1 - f)), which is how n_keep is computed.
    while min(int(n * (1.0 - discard_fraction)), n - 1) < 2:
        n += 1
    return n


def _twonn_slope(log_mu: torch.Tensor, discard_fraction: float) -> torch.Tensor:
    """Facco et al. (2017), Eq. (5): slope of the line through the origin fitting -log(1 - F(mu)) vs log mu.

    ``log_mu`` is [batch, N]; each row is one data set. As in skdim.id.TwoNN (method='linear'): the empirical
    CDF is F_i = i / N over the sorted ratios, the largest ``discard_fraction`` of them are dropped
    (n_keep = int(N * (1 - f)), at most N - 1) and the least-squares slope without intercept is
    sum(x y) / sum(x^2), or 0 when all kept log mu are 0.
    """
    n = log_mu.shape[1]
    # The largest ratio has F = N/N = 1 and -log(1 - F) = inf, so it never enters the fit; this only
    # matters for discard_fraction = 0 (where skdim's fit fails on the infinity) since f > 0 drops it anyway.
    n_keep = min(int(n * (1.0 - discard_fraction)), n - 1)
    x = torch.sort(log_mu, dim=1).values[:, :n_keep]
    femp = torch.arange(1, n_keep + 1, dtype=log_mu.dtype, device=log_mu.device) / n
    y = -torch.log(1.0 - femp)
    sxx = (x * x).sum(dim=1)
    # All kept ratios exactly 1 (every point has tied first and second neighbours, e.g. a lattice) leaves
    # no slope to fit; skdim's least-squares solver returns 0 there, and so does this.
    return torch.where(sxx > 0, (x * y).sum(dim=1) / sxx, torch.zeros_like(sxx))


def _pointwise_twonn(X: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, discard_fraction: float) -> torch.Tensor:
    """TwoNN fitted separately on every neighbourhood ``N_i = X[idx[i]]``, from the kNN table alone.

    TwoNN on N_i needs, for each j in N_i, its two nearest neighbours *within* N_i. j's own sorted global
    list ``idx[j]`` holds its k nearest points overall, so the first two of them that lie in N_i are exactly
    those two (a closer member of N_i would come earlier in the list). That turns n small k x k distance
    problems into membership lookups; only the rare j whose list holds fewer than two members of N_i
    has its distances to N_i computed (in float64, sampled matmul).
    """
    n, k = idx.shape
    r1 = torch.empty(n, k, dtype=torch.float64, device=X.device)
    r2 = torch.empty_like(r1)
    flat_dist = dist.reshape(-1)
    chunk = max(1, min(n, _PW_CHUNK_ELEMENTS // max(n, k * k)))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        nb = idx[start:stop]  # [c, k]: the neighbourhoods
        member = torch.zeros(stop - start, n, dtype=torch.uint8, device=X.device)
        member.scatter_(1, nb, 1)
        hits = member.gather(1, idx[nb].view(stop - start, k * k)).view(-1, k, k)  # is idx[j][m] in N_i?
        # max returns the first maximal index (documented); on uint8 rows it is faster than argmax.
        first = hits.max(dim=2, keepdim=True).indices  # the first hit along j's sorted list
        second = hits.scatter_(2, first, 0).max(dim=2, keepdim=True).indices
        r1[start:stop] = flat_dist[nb * k + first.squeeze(2)]
        r2[start:stop] = flat_dist[nb * k + second.squeeze(2)]
        # A row with fewer than two hits has no hit left at `second`: mark it for the direct computation.
        r2[start:stop].masked_fill_(hits.gather(2, second).squeeze(2) == 0, math.nan)
    short = r2.isnan().nonzero()
    if short.numel():
        i, a = short[:, 0], short[:, 1]
        d2 = refined_sq_distances(X, idx[i], queries=idx[i, a])  # j = idx[i, a] against all of N_i
        d2[torch.arange(len(a), device=X.device), a] = math.inf  # j itself
        two = torch.topk(d2, 2, dim=1, largest=False).values.sqrt_()
        r1[i, a], r2[i, a] = two[:, 0], two[:, 1]
    return _twonn_slope(torch.log(r2 / r1), discard_fraction)


def _twonn_from_knn(dist: torch.Tensor, discard_fraction: float, who: str) -> float:
    """Global TwoNN from the sorted kNN distances [n, >= 2] of distinct points (only r1, r2 are used)."""
    dist = dist[:, :2].to(torch.float64)
    log_mu = torch.log(dist[:, 1] / dist[:, 0])
    _warn_nonfinite(log_mu, who, "first-neighbour distance rounds to 0 (near-duplicate points)")
    return float(_twonn_slope(log_mu[None, :], discard_fraction)[0])


class TwoNN(Estimator):
    """TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140).

    For every point the ratio mu = r2 / r1 of its second to first nearest-neighbour distance is
    Pareto(1, d) distributed, so -log(1 - F(mu)) = d log mu (Eq. 5). The largest ``discard_fraction`` of
    the ratios are dropped and d is the least-squares slope of that line through the origin.

    Matches scikit-dimension 1:1 on data without duplicate rows (the formula of ``skdim.id.TwoNN._twonn``,
    method='linear'):

    * ``TwoNN(f).fit(X).dimension_ == skdim.id.TwoNN(discard_fraction=f).fit(X).dimension_``
    * ``TwoNN(f).fit_pw(X, n_neighbors=k).dimension_pw_ ==
      skdim.id.TwoNN(discard_fraction=f).fit_pw(X, n_neighbors=k).dimension_pw_``: the neighbourhood of a
      point is its k nearest neighbours *excluding the point itself* (skdim's ``GlobalEstimator.fit_pw``
      uses ``NearestNeighbors.kneighbors()`` without a query, which leaves the point out), and TwoNN is
      fitted on those k points. Mean of ``dimension_pw_`` with k = 64 is the local/pointwise LID of
      Ruppik et al. (2025).

    With duplicates, skdim drops the points whose r1 is 0 and warns; here exact duplicate rows are removed
    first (see the module docstring).

    Parameters
    ----------
    discard_fraction : float in [0, 1)
        Fraction of the largest ratios mu to discard (the paper's heuristic against noise; 0.1 is its value).
        The single largest ratio is always left out (its -log(1 - F) is infinite); with 0 that is the only
        one, which equals skdim with discard_fraction = 0.5 / N (skdim itself fails at 0).
    chunk_size : int, optional
        Query rows per chunk for the distance computations (memory bound); default chosen automatically.

    Attributes
    ----------
    dimension_ : float
        Estimated intrinsic dimension (after ``fit``).
    n_points_used_ : int
        Distinct points the last fit used.
    dimension_pw_ : np.ndarray [n_points_used_]
        Pointwise estimates (after ``fit_pw``), one per distinct point, in the order of ``pw_index_``.
    pw_index_ : np.ndarray [n_points_used_]
        Rows of X the pointwise estimates belong to (first occurrence of each distinct row, ascending).
    n_neighbors_ : int
        Neighbourhood size of the last ``fit_pw``.
    """

    def __init__(self, discard_fraction: float = 0.1, chunk_size: int | None = None) -> None:
        self.discard_fraction = discard_fraction
        self.chunk_size = chunk_size

    def _checked_fraction(self, who: str) -> float:
        f = self.discard_fraction
        if isinstance(f, bool) or not isinstance(f, int | float | np.floating | np.integer) or not 0 <= f < 1:
            raise ValueError(f"{who}: discard_fraction must be in [0, 1), got {f!r}")
        return float(f)

    def fit(self, X: ArrayLike, y: Any = None) -> TwoNN:
        """Estimate the global intrinsic dimension of the point cloud X [n_points, n_features]."""
        who = "TwoNN.fit"
        f = self._checked_fraction(who)
        chunk = check_chunk(self.chunk_size, who)
        need = _twonn_min_points(f)
        uniq, _ = _distinct_points(X, need, f"TwoNN with discard_fraction={f}", who)
        dist, _ = knn_from_points(uniq, 2, chunk)
        self.dimension_ = _twonn_from_knn(dist, f, who)
        self.n_points_used_ = int(uniq.shape[0])
        return self

    def fit_pw(self, X: ArrayLike, n_neighbors: int = 64) -> TwoNN:
        """Pointwise TwoNN: the estimator fitted on each point's ``n_neighbors`` nearest neighbours.

        ``n_neighbors`` defaults to L = 64, the neighbourhood size of Ruppik et al. (2025). Exact duplicate
        rows are removed first; ``dimension_pw_[i]`` belongs to row ``pw_index_[i]`` of X.
        """
        who = "TwoNN.fit_pw"
        f = self._checked_fraction(who)
        chunk = check_chunk(self.chunk_size, who)
        k = check_int(n_neighbors, "n_neighbors", _twonn_min_points(f), who)
        uniq, kept = _neighbourhood_points(X, k, who)
        dist, idx = knn_from_points(uniq, k, chunk)
        dim = _pointwise_twonn(uniq, dist, idx, f)
        _warn_nonfinite(dim, who, "a nearest-neighbour distance inside a neighbourhood rounds to 0")
        self.dimension_pw_ = dim.cpu().numpy()
        self.pw_index_ = kept.cpu().numpy()
        self.n_points_used_ = int(uniq.shape[0])
        self.n_neighbors_ = k
        return self


# ------------------------------------------------------------------------------------------------------- MLE


def _mle_inverse_local(dist: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """1 / m_k(x) of Levina & Bickel Eq. (8) from the sorted distances [n, k] to the k nearest neighbours."""
    k = dist.shape[1]
    log_d = torch.log(dist.to(torch.float64))
    # The j = k term is log(T_k / T_k) = 0, so summing over all k columns equals the sum over j < k.
    return (log_d[:, -1:] - log_d).sum(dim=1) / (k - 2 if unbiased else k - 1)


def _mle_global(inverse_local: torch.Tensor, who: str) -> float:
    """MacKay & Ghahramani (2005): the global estimate is the inverse of the mean inverse local estimate."""
    _warn_nonfinite(inverse_local, who, "first-neighbour distance rounds to 0 (near-duplicate points)")
    return float(1.0 / inverse_local.mean())


class MLE(Estimator):
    """Maximum-likelihood intrinsic dimension (Levina & Bickel 2004, NeurIPS), MacKay–Ghahramani averaging.

    Local estimate at x from the distances T_1(x) <= ... <= T_k(x) to its k nearest neighbours (the point
    itself excluded), Levina & Bickel Eq. (8)::

        m_k(x) = [ 1/(k-1) * sum_{j=1}^{k-1} log(T_k(x) / T_j(x)) ]^-1

    (``unbiased=True`` uses k-2 instead of k-1, their bias-corrected variant). The global estimate averages
    the *inverses*, as MacKay & Ghahramani (2005) proposed in their comment on the paper::

        m_k = [ 1/n * sum_i m_k(x_i)^-1 ]^-1

    Matches scikit-dimension 1:1 on data without duplicate rows:

    * ``MLE(k).fit(X).dimension_ == skdim.id.MLE().fit(X, n_neighbors=k, comb='mle').dimension_``
    * ``MLE(k).fit_pw(X, n_neighbors=k).dimension_pw_ == skdim.id.MLE().fit(X, n_neighbors=k).dimension_pw_``

    i.e. skdim's defaults ``dnoise=None, sigma=0, integral_approximation='Haro', unbiased=False,
    neighborhood_based=True`` (with ``dnoise=None`` its 'Haro' integral approximation reduces to the closed
    form above) and ``comb='mle'`` (the 1 / mean(1 / m) averaging; skdim's default for MLE.fit).
    ``MLE(unbiased=True)`` matches ``skdim.id.MLE(unbiased=True)``. skdim clamps n_neighbors >= n_points with
    a warning; here that raises ``ValueError``. Exact duplicate rows are removed first (module docstring).

    Parameters
    ----------
    n_neighbors : int
        k, neighbours per point (>= 2, or >= 3 with ``unbiased``). skdim's default for MLE is 20.
    unbiased : bool
        Divide by k-2 instead of k-1 (Levina & Bickel's unbiased form of the local estimator).
    chunk_size : int, optional
        Query rows per chunk for the kNN search (memory bound); default chosen automatically.

    Attributes
    ----------
    dimension_ : float
        Global estimate (after ``fit``).
    n_points_used_ : int
        Distinct points the last fit used.
    dimension_pw_ : np.ndarray [n_points_used_]
        Local estimates m_k(x) (after ``fit_pw``), one per distinct point, in the order of ``pw_index_``.
    pw_index_ : np.ndarray [n_points_used_]
        Rows of X the pointwise estimates belong to (first occurrence of each distinct row, ascending).
    n_neighbors_ : int
        k of the last fit / fit_pw.
    """

    def __init__(self, n_neighbors: int = 20, unbiased: bool = False, chunk_size: int | None = None) -> None:
        self.n_neighbors = n_neighbors
        self.unbiased = unbiased
        self.chunk_size = chunk_size

    def _inverse_local(self, X: ArrayLike, k: Any, who: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """1 / m_k(x) for every distinct point; returns (inverse estimates, kept rows, distinct count)."""
        chunk = check_chunk(self.chunk_size, who)
        k = check_int(k, "n_neighbors", 3 if self.unbiased else 2, who)
        uniq, kept = _neighbourhood_points(X, k, who)
        dist, _ = knn_from_points(uniq, k, chunk)
        inv = _mle_inverse_local(dist, self.unbiased)
        self.n_neighbors_ = k
        self.n_points_used_ = int(uniq.shape[0])
        return inv, kept, int(uniq.shape[0])

    def fit(self, X: ArrayLike, y: Any = None) -> MLE:
        """Global MLE dimension of X [n_points, n_features] with k = ``self.n_neighbors``."""
        who = "MLE.fit"
        inv, _, _ = self._inverse_local(X, self.n_neighbors, who)
        self.dimension_ = _mle_global(inv, who)
        return self

    def fit_pw(self, X: ArrayLike, n_neighbors: int | None = None) -> MLE:
        """Local Levina–Bickel estimates m_k(x) for every distinct point (k defaults to ``n_neighbors``).

        Exact duplicate rows are removed first; ``dimension_pw_[i]`` belongs to row ``pw_index_[i]`` of X.
        A point whose k neighbours are all equidistant has m_k(x) = inf (the likelihood has no maximum);
        that is reported with a RuntimeWarning.
        """
        who = "MLE.fit_pw"
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        inv, kept, _ = self._inverse_local(X, k, who)
        dim = 1.0 / inv
        _warn_nonfinite(dim, who, "all k neighbours equidistant, or a distance rounds to 0")
        self.dimension_pw_ = dim.cpu().numpy()
        self.pw_index_ = kept.cpu().numpy()
        return self


# ------------------------------------------------------------------------------------------------------ lPCA


def _spectrum(X: torch.Tensor, center: bool) -> torch.Tensor:
    """PCA eigenvalues of X [n, d] as ``skdim.id.lPCA._spectrum`` returns them, descending, float64.

    ``center=True``: S^2 / (n - 1) of the centred X (sklearn's ``PCA().explained_variance_``); ``center=False``:
    S^2 of X itself (skdim's eigenvalues of X.T @ X, not divided by n). Length min(n, d). Singular values
    rather than eigenvalues of the covariance keep small eigenvalues accurate relative to themselves.
    """
    X = X.to(torch.float64)
    if center:
        X = X - X.mean(dim=0, keepdim=True)
    sv = torch.linalg.svdvals(X)
    return sv.square() / (X.shape[0] - 1) if center else sv.square()


def _lpca_rule(ev: torch.Tensor, ver: str, alpha: float) -> torch.Tensor:
    """Dimension from descending eigenvalues [batch, m] by skdim.id.lPCA's rule ``ver`` (int64 [batch]).

    'FO' (Fukunaga & Olsen 1971): #{i : lambda_i > alpha * lambda_1}.
    'ratio': 1 + #{j : sum_{i<=j} lambda_i / sum_i lambda_i < alpha}, the fewest leading components that keep
    at least a fraction alpha of the variance (skdim normalises by the largest partial sum, as here).
    """
    if ver == "FO":
        return (ev > alpha * ev[:, :1]).sum(dim=1)
    partial = torch.cumsum(ev, dim=1)
    return (partial / partial.amax(dim=1, keepdim=True) < alpha).sum(dim=1) + 1


def _pointwise_lpca(
    X: torch.Tensor, knn_idx: torch.Tensor, center: bool, ver: str, alpha: float, chunk_size: int | None
) -> torch.Tensor:
    """lPCA fitted separately on every neighbourhood ``X[knn_idx[i]]``, all neighbourhoods batched."""
    n, k = knn_idx.shape
    d = X.shape[1]
    # A neighbourhood's non-zero eigenvalues are those of its d x d scatter matrix or, equally, of its
    # k x k Gram matrix; the smaller one is decomposed. Both have min(k, d) eigenvalues, as skdim's PCA has.
    m = min(k, d)
    if chunk_size is None:
        chunk_size = max(1, min(n, _PW_CHUNK_ELEMENTS // (k * d + m * m)))
    out = torch.empty(n, dtype=torch.int64, device=X.device)
    scale = 1.0 / (k - 1) if center else 1.0
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        # float64 for the decomposition even on CUDA: cheap on k x k matrices, and a float32 spectrum
        # could flip an eigenvalue near the FO threshold.
        nb = X[knn_idx[start:stop]].to(torch.float64)  # [c, k, d]
        if center:
            nb = nb - nb.mean(dim=1, keepdim=True)
        gram = nb.transpose(1, 2) @ nb if d <= k else nb @ nb.transpose(1, 2)  # [c, m, m]
        ev = torch.linalg.eigvalsh(gram * scale).flip(1)  # ascending -> descending
        out[start:stop] = _lpca_rule(ev, ver, alpha)
    return out


class lPCA(Estimator):  # noqa: N801 -- the name skdim and the literature use
    """PCA intrinsic dimension: how many principal components a cloud (or each neighbourhood) needs.

    Global or local PCA dimension (Fukunaga & Olsen 1971, IEEE Trans. Comput. C-20:176; local use as in
    Bruske & Sommer 1998 and Little, Maggioni & Rosasco 2017). With the PCA eigenvalues
    lambda_1 >= ... >= lambda_m of X (covariance of the centred points, m = min(n, d)):

    * ``ver='FO'`` (Fukunaga–Olsen, default): d = #{i : lambda_i > alpha_fo * lambda_1}, alpha_fo = 0.05.
    * ``ver='ratio'``: the fewest leading components whose cumulative share of the variance reaches
      alpha_ratio, d = 1 + #{j : sum_{i<=j} lambda_i / sum_i lambda_i < alpha_ratio}.

    Matches scikit-dimension 1:1 (same eigenvalues up to round-off, same rule) on data without duplicates:

    * ``lPCA(ver, alpha_fo, alpha_ratio, center).fit(X).dimension_ ==
      skdim.id.lPCA(ver=ver, alphaFO=alpha_fo, alphaRatio=alpha_ratio, center=center).fit(X).dimension_``
    * ``lPCA(...).fit_pw(X, n_neighbors=k).dimension_pw_ == skdim.id.lPCA(...).fit_pw(X, n_neighbors=k)
      .dimension_pw_``: the neighbourhood of a point is its k nearest neighbours *excluding the point itself*
      (as in :class:`TwoNN`), and PCA is done on those k points, centred on their own mean.

    PCA measures *linear* dimension: a curved manifold needs more components than its intrinsic dimension
    globally (a circle needs 2), which is why the pointwise (local) form exists; with too small a k, or with
    noise whose variance exceeds alpha_fo times the top eigenvalue, the local estimate is biased in turn.
    With k <= d a centred neighbourhood has rank <= k - 1, so d is at most k - 1.

    Exact duplicate rows are removed first (module docstring), in ``fit`` too, so lPCA sees the same point set
    as TwoNN and MLE; skdim would weight a duplicated row twice in the covariance.

    Parameters
    ----------
    ver : {'FO', 'ratio'}
        The rule applied to the eigenvalues (skdim's ``ver``; its other versions are not implemented).
    alpha_fo : float in (0, 1)
        'FO': fraction of the largest eigenvalue an eigenvalue must exceed (skdim's ``alphaFO``, 0.05).
    alpha_ratio : float in (0, 1]
        'ratio': fraction of the total variance the leading components must reach (skdim's ``alphaRatio``,
        0.05; values such as 0.9 give the classic "components for 90 % of the variance").
    center : bool
        Centre the points (each neighbourhood on its own mean in ``fit_pw``) before PCA, as skdim's default.
    chunk_size : int, optional
        Query rows per chunk for the kNN search and the batched eigenvalues; default chosen automatically.

    Attributes
    ----------
    dimension_ : int
        Global estimate (after ``fit``).
    eigenvalues_ : np.ndarray [min(n_points_used_, n_features)]
        PCA eigenvalues of the distinct points, descending (skdim's ``explained_var_``; S^2 / (n - 1) when
        centred, S^2 when not).
    n_points_used_ : int
        Distinct points the last fit used.
    dimension_pw_ : np.ndarray [n_points_used_] of int64
        Pointwise estimates (after ``fit_pw``), one per distinct point, in the order of ``pw_index_``.
    pw_index_ : np.ndarray [n_points_used_]
        Rows of X the pointwise estimates belong to (first occurrence of each distinct row, ascending).
    n_neighbors_ : int
        Neighbourhood size of the last ``fit_pw``.
    """

    def __init__(
        self,
        ver: str = "FO",
        alpha_fo: float = 0.05,
        alpha_ratio: float = 0.05,
        center: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        self.ver = ver
        self.alpha_fo = alpha_fo
        self.alpha_ratio = alpha_ratio
        self.center = center
        self.chunk_size = chunk_size

    def _checked_rule(self, who: str) -> tuple[str, float]:
        if self.ver not in ("FO", "ratio"):
            raise ValueError(f"{who}: ver must be 'FO' or 'ratio', got {self.ver!r}")
        name = "alpha_fo" if self.ver == "FO" else "alpha_ratio"
        alpha = getattr(self, name)
        upper_ok = (lambda a: a < 1) if self.ver == "FO" else (lambda a: a <= 1)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float | np.floating)
            or not (0 < alpha and upper_ok(alpha))
        ):
            bound = "(0, 1)" if self.ver == "FO" else "(0, 1]"
            raise ValueError(f"{who}: {name} must be in {bound}, got {alpha!r}")
        return self.ver, float(alpha)

    def fit(self, X: ArrayLike, y: Any = None) -> lPCA:
        """Global PCA dimension of the distinct points of X [n_points, n_features]."""
        who = "lPCA.fit"
        ver, alpha = self._checked_rule(who)
        uniq, _ = _distinct_points(X, 2, "PCA needs a non-zero spread", who)
        ev = _spectrum(uniq, bool(self.center))
        self.dimension_ = int(_lpca_rule(ev[None, :], ver, alpha)[0])
        self.eigenvalues_ = ev.cpu().numpy()
        self.n_points_used_ = int(uniq.shape[0])
        return self

    def fit_pw(self, X: ArrayLike, n_neighbors: int = 64) -> lPCA:
        """Local PCA dimension of every point's ``n_neighbors`` nearest neighbours (the point excluded).

        ``n_neighbors`` defaults to 64 like :meth:`TwoNN.fit_pw` (skdim's default is 100). Exact duplicate rows
        are removed first; ``dimension_pw_[i]`` belongs to row ``pw_index_[i]`` of X.
        """
        who = "lPCA.fit_pw"
        ver, alpha = self._checked_rule(who)
        chunk = check_chunk(self.chunk_size, who)
        k = check_int(n_neighbors, "n_neighbors", 2, who)
        uniq, kept = _neighbourhood_points(X, k, who)
        _, idx = knn_from_points(uniq, k, chunk)
        self.dimension_pw_ = _pointwise_lpca(uniq, idx, bool(self.center), ver, alpha, chunk).cpu().numpy()
        self.pw_index_ = kept.cpu().numpy()
        self.n_points_used_ = int(uniq.shape[0])
        self.n_neighbors_ = k
        return self


# ------------------------------------------------------------------------------------------ shared kNN search


def twonn_mle(X: ArrayLike, n_neighbors: int = 20, discard_fraction: float = 0.1) -> tuple[float, float]:
    """Global TwoNN and MLE from one deduplication and one kNN search: the online path of a training loop.

    Returns ``(TwoNN(discard_fraction).fit(X).dimension_, MLE(n_neighbors).fit(X).dimension_)`` for one
    search instead of two (the k = n_neighbors search also gives TwoNN's r1 and r2; timings in
    benchmarks/results/geometry.md, "Global TwoNN and MLE"), to ~1e-5 x the dimension: squared distances
    are only recomputed in float64 where the float32 search could be off by more than ``_ONLINE_RTOL``
    relative (the estimators fitted alone recompute every one). An estimate
    that needs more distinct points than X has is NaN instead of an error, so a layer with a tiny
    vocabulary does not stop the other estimate.
    """
    who = "twonn_mle"
    k = check_int(n_neighbors, "n_neighbors", 2, who)
    need_twonn = _twonn_min_points(discard_fraction)
    pts = as_points(X, min_points=1, who=who)
    uniq, _ = unique_rows(pts)
    n = uniq.shape[0]
    if n < need_twonn:
        return math.nan, math.nan
    dist, _ = knn_from_points(uniq, min(k, n - 1), refine=_ONLINE_RTOL)
    twonn = _twonn_from_knn(dist, discard_fraction, who)
    mle = _mle_global(_mle_inverse_local(dist, unbiased=False), who) if n >= k + 1 else math.nan
    return twonn, mle
