"""Spectral summaries of point clouds (singular-value based), in torch, scikit-learn style."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analysis.knn import ArrayLike, as_points
from analysis.lid import _Estimator


class EffectiveRank(_Estimator):
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
