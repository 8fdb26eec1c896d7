"""Spectral summaries of point clouds (singular-value based), in torch, scikit-learn style.

* :class:`EffectiveRank` -- RankMe (entropy of the normalised singular values of X).
* :class:`ParticipationRatio` -- (sum lambda)^2 / sum lambda^2 of the covariance eigenvalues.
* :class:`AlphaReQ` -- power-law decay exponent of the covariance eigenspectrum.

Covariance eigenvalues are taken as S^2 / (n - 1) from the singular values S of the centred X, in float64
(small eigenvalues stay accurate relative to themselves, which a power-law fit of the tail needs). Duplicate
rows are *not* removed here: a spectrum is a property of the (weighted) sample covariance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analysis.base import Estimator, check_int
from analysis.knn import ArrayLike, as_points
from analysis.lid import _spectrum


class EffectiveRank(Estimator):
    """RankMe effective rank (Garrido, Balestriero, Najman & LeCun 2023, ICML, Eq. 1).

    With singular values sigma_1..sigma_r of the embedding matrix X [n_points, n_features]::

        p_k = sigma_k / sum_j sigma_j + eps
        RankMe(X) = exp( -sum_k p_k log p_k )

    i.e. the exponential of the Shannon entropy of the normalised singular values (Roy & Vetterli 2007),
    with the paper's small ``eps`` added to every p_k, as published (so the p_k sum to 1 + r*eps). It lies
    in [1, min(n_points, n_features)] up to eps; r equal non-zero singular values give r.

    As in the paper, X is not centred by default; ``center=True`` subtracts the column means first (the
    effective rank of the covariance-like spread instead of the raw second moment).

    Parameters
    ----------
    center : bool
        Subtract the mean row before taking singular values.
    eps : float
        The paper's epsilon added to each normalised singular value (1e-7).

    Attributes
    ----------
    dimension_ : float
        The effective rank.
    singular_values_ : np.ndarray [min(n_points, n_features)]
        Singular values of (the centred) X, descending.
    """

    def __init__(self, center: bool = False, eps: float = 1e-7) -> None:
        self.center = center
        self.eps = eps

    def fit(self, X: ArrayLike, y: Any = None) -> EffectiveRank:
        """Compute the effective rank of X [n_points, n_features]."""
        who = "EffectiveRank.fit"
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, int | float | np.floating) or not eps >= 0:
            raise ValueError(f"{who}: eps must be a non-negative float, got {eps!r}")
        pts = as_points(X, min_points=2 if self.center else 1, who=who)
        if self.center:
            pts = pts - pts.mean(dim=0, keepdim=True)
        sv = torch.linalg.svdvals(pts).to(torch.float64)
        total = sv.sum()
        if not total > 0:
            after = " after centring" if self.center else ""
            raise ValueError(f"{who}: X has no non-zero singular value (all-zero matrix{after})")
        p = sv / total + eps
        self.dimension_ = float(torch.exp(-(p * torch.log(p)).sum()))
        self.singular_values_ = sv.cpu().numpy()
        return self


def _covariance_eigenvalues(X: ArrayLike, who: str) -> tuple[torch.Tensor, int, int]:
    """Covariance eigenvalues of validated X (descending, float64, length min(n, d)), n and d; raises if all 0."""
    pts = as_points(X, min_points=2, who=who)
    ev = _spectrum(pts, center=True)
    if not ev[0] > 0:
        raise ValueError(f"{who}: all {pts.shape[0]} points are identical (the covariance is zero)")
    return ev, pts.shape[0], pts.shape[1]


class ParticipationRatio(Estimator):
    """Participation ratio of the covariance spectrum (Gao, Trautmann, Yu, ... & Ganguli 2017, bioRxiv 214262).

    With the eigenvalues lambda_i of the covariance of the centred X::

        PR = (sum_i lambda_i)^2 / sum_i lambda_i^2

    a linear dimension between 1 (one direction holds all variance) and min(n - 1, d); r equal non-zero
    eigenvalues give exactly r. Same number as ``skdim.id.lPCA(ver='participation_ratio').fit(X).dimension_``.
    Used as a representation dimension e.g. by Recanatesi et al. (2019) and Ansuini et al. (2019, appendix).

    Attributes
    ----------
    dimension_ : float
        The participation ratio.
    eigenvalues_ : np.ndarray [min(n_points, n_features)]
        Covariance eigenvalues S^2 / (n - 1), descending.
    """

    def __init__(self) -> None:
        pass

    def fit(self, X: ArrayLike, y: Any = None) -> ParticipationRatio:
        """Compute the participation ratio of X [n_points, n_features] (at least 2 points, not all equal)."""
        ev, _, _ = _covariance_eigenvalues(X, "ParticipationRatio.fit")
        # Normalising first keeps sum(lambda^2) far from overflow/underflow for any scale of X.
        p = ev / ev.sum()
        self.dimension_ = float(1.0 / p.square().sum())
        self.eigenvalues_ = ev.cpu().numpy()
        return self


class AlphaReQ(Estimator):
    """Eigenspectrum decay exponent alpha (Agrawal, Mondal, Ghosh & Richards 2022, NeurIPS, "alpha-ReQ").

    The covariance eigenvalues of a representation are modelled as a power law lambda_i ~ c * i^(-alpha)
    (their Eq. 1); alpha is the negative slope of the least-squares line through (log i, log lambda_i) over
    the ranks ``first_rank <= i <= last_rank``::

        log lambda_i = log c - alpha * log i

    Small alpha (slow decay) means variance spread over many directions (close to white), large alpha a few
    dominant directions; the paper relates alpha near 1 to good downstream performance.

    Default range: ranks 6 to 100, the default of the authors' code (``reptrix.alpha.get_alpha``,
    ``fit_range=np.arange(5, 100)`` as 0-based indices). The first few eigenvalues are left out because the
    leading directions rarely follow the power law of the bulk (mean-like or outlier directions); the fit stops
    at 100 because the far tail is dominated by finite-sample noise (with n points, eigenvalues beyond about
    n/10 are strongly biased) and, for d > n, by the zero eigenvalues of a rank-n covariance. Ranks beyond the
    numerical rank (eigenvalues <= lambda_1 * max(n, d) * eps, whose logarithm is meaningless) are not used;
    ``fit_range_`` reports the ranks actually fitted. ``last_rank=None`` fits up to the numerical rank.

    ``weighted=True`` weights rank i by 1 / i, as the authors' code does (after Stringer, Pachitariu et al.
    2019, Nature 571:361), which evens out the density of points along log i; the default is the plain least
    squares of the paper's description.

    Parameters
    ----------
    first_rank : int
        First eigenvalue rank (1-based, inclusive) in the fit.
    last_rank : int or None
        Last rank (inclusive); None for all numerically non-zero eigenvalues.
    weighted : bool
        Weight rank i by 1 / i in the least squares.

    Attributes
    ----------
    alpha_ : float
        Decay exponent (positive for a decaying spectrum).
    intercept_ : float
        log c of the fitted line.
    r2_ : float
        Coefficient of determination of the (weighted) fit in log-log coordinates.
    fit_range_ : tuple[int, int]
        Ranks (1-based, inclusive) actually used.
    eigenvalues_ : np.ndarray [min(n_points, n_features)]
        Covariance eigenvalues S^2 / (n - 1), descending.
    """

    def __init__(self, first_rank: int = 6, last_rank: int | None = 100, weighted: bool = False) -> None:
        self.first_rank = first_rank
        self.last_rank = last_rank
        self.weighted = weighted

    def fit(self, X: ArrayLike, y: Any = None) -> AlphaReQ:
        """Fit the power law to the covariance eigenspectrum of X [n_points, n_features]."""
        who = "AlphaReQ.fit"
        first = check_int(self.first_rank, "first_rank", 1, who)
        last = None if self.last_rank is None else check_int(self.last_rank, "last_rank", first + 1, who)
        ev, n, d = _covariance_eigenvalues(X, who)
        tol = float(ev[0]) * max(n, d) * float(np.finfo(np.float64).eps)
        rank = int((ev > tol).sum())
        stop = rank if last is None else min(last, rank)
        if stop - first + 1 < 2:
            raise ValueError(
                f"{who}: the fit needs at least 2 eigenvalues in ranks {first}..{last}, but X has {rank} "
                f"numerically non-zero covariance eigenvalues ({n} points, {d} features)"
            )
        ranks = torch.arange(first, stop + 1, dtype=torch.float64, device=ev.device)
        x = torch.log(ranks)
        y = torch.log(ev[first - 1 : stop])
        w = 1.0 / ranks if self.weighted else torch.ones_like(ranks)
        # Weighted least squares for one slope and intercept, in closed form about the weighted means.
        w = w / w.sum()
        mx, my = (w * x).sum(), (w * y).sum()
        sxx = (w * (x - mx).square()).sum()
        slope = (w * (x - mx) * (y - my)).sum() / sxx
        resid = y - my - slope * (x - mx)
        syy = (w * (y - my).square()).sum()
        self.alpha_ = float(-slope)
        self.intercept_ = float(my - slope * mx)
        self.r2_ = float(1.0 - (w * resid.square()).sum() / syy) if syy > 0 else 1.0
        self.fit_range_ = (first, stop)
        self.eigenvalues_ = ev.cpu().numpy()
        return self
