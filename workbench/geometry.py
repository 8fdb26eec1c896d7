"""Geometry features of one layer's points, by name: the registry the online instrument and
`workbench analyze` share, so a feature is computed the same way live and afterwards.

Each feature logs one or more metrics `geom/<metric>/layer_<i>` (`FEATURE_METRICS`). Cheap ones run
online by default (`ONLINE_DEFAULT`); the rest (pointwise LID, lPCA, TDA, spectra) offline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import torch

Feature = Literal["lid_twonn", "lid_mle", "lid_local", "lid_lpca", "eff_rank", "pr", "alpha", "tda"]

FEATURE_METRICS: dict[str, tuple[str, ...]] = {
    "lid_twonn": ("lid_twonn",),  # global TwoNN (Facco et al. 2017)
    "lid_mle": ("lid_mle",),  # global MLE (Levina & Bickel 2004, MacKay-Ghahramani averaging)
    "lid_local": ("lid_local", "lid_local_median"),  # pointwise TwoNN on k-neighbourhoods (Ruppik et al. 2025)
    "lid_lpca": ("lid_lpca",),  # PCA dimension, Fukunaga-Olsen
    "eff_rank": ("eff_rank",),  # RankMe (Garrido et al. 2023)
    "pr": ("pr",),  # participation ratio of the covariance spectrum
    "alpha": ("alpha",),  # eigenspectrum decay exponent (Agrawal et al. 2022)
    "tda": ("tda_h0_total", "tda_h1_total", "tda_h1_count", "tda_h1_max", "tda_h0_entropy", "tda_h1_entropy"),
}
ONLINE_DEFAULT: tuple[str, ...] = ("lid_twonn", "lid_mle", "eff_rank")


class GeometryResult(NamedTuple):
    metrics: dict[str, float]  # metric name -> finite value
    problems: list[str]  # one line per feature that could not be computed, saying why
    seconds: dict[str, float]  # feature -> time it took (the shared TwoNN+MLE search counts for lid_twonn)


def compute_geometry(
    points: torch.Tensor | np.ndarray,
    features: Sequence[str],
    mle_neighbors: int = 20,
    local_neighbors: int = 64,
    tda_landmarks: int = 500,
) -> GeometryResult:
    """The requested features of a point cloud [points, hidden].

    Only finite values are returned, so no NaN is ever logged; each feature that could not be computed
    (too few distinct points, a degenerate cloud) gets one line in `problems` saying why. Rows with NaN/inf
    (a diverging model) are dropped first, and that is a problem line too.
    """
    import torch

    from analysis import MLE, AlphaReQ, EffectiveRank, ParticipationRatio, PersistentHomology, TwoNN, lPCA, twonn_mle

    x = torch.as_tensor(points).float()
    problems: list[str] = []
    finite = x.isfinite().all(dim=1)
    if not bool(finite.all()):
        problems.append(f"{int((~finite).sum())} of {len(x)} points have NaN/inf and were left out")
        x = x[finite]
    estimators = {
        "lid_twonn": lambda: {"lid_twonn": TwoNN().fit(x).dimension_},
        "lid_mle": lambda: {"lid_mle": MLE(n_neighbors=mle_neighbors).fit(x).dimension_},
        "lid_local": lambda: _pointwise_summary(TwoNN().fit_pw(x, n_neighbors=local_neighbors).dimension_pw_),
        "lid_lpca": lambda: {"lid_lpca": lPCA().fit(x).dimension_},
        "eff_rank": lambda: {"eff_rank": EffectiveRank().fit(x).dimension_},
        "pr": lambda: {"pr": ParticipationRatio().fit(x).dimension_},
        "alpha": lambda: {"alpha": AlphaReQ().fit(x).alpha_},
        "tda": lambda: PersistentHomology(n_landmarks=tda_landmarks).fit(x).features_,
    }
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}
    wanted = list(features)
    if "lid_twonn" in wanted and "lid_mle" in wanted and len(x):  # one dedup and one kNN search for both
        start = time.perf_counter()
        twonn, mle = twonn_mle(x, n_neighbors=mle_neighbors)
        seconds["lid_twonn"] = time.perf_counter() - start
        # A NaN here means too few distinct points: the separate estimator then raises and says why.
        if math.isfinite(twonn):
            estimators["lid_twonn"] = lambda: {"lid_twonn": twonn}
        if math.isfinite(mle):
            estimators["lid_mle"] = lambda: {"lid_mle": mle}
    for feature in wanted:
        start = time.perf_counter()
        try:
            values = estimators[feature]()
        except ValueError as exc:  # the estimators' documented error for too few or degenerate points
            problems.append(f"{feature}: {exc}")
            continue
        finally:
            seconds[feature] = seconds.get(feature, 0.0) + time.perf_counter() - start
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            problems.append(f"{feature}: no finite estimate for {', '.join(bad)} on {len(x)} points")
        metrics.update({name: float(value) for name, value in values.items() if math.isfinite(value)})
    return GeometryResult(metrics, problems, seconds)


def _pointwise_summary(dimension_pw: np.ndarray) -> dict[str, float]:
    import numpy as np

    return {"lid_local": float(np.mean(dimension_pw)), "lid_local_median": float(np.median(dimension_pw))}
