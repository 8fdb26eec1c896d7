"""Intrinsic-dimension and spectral estimators of hidden-state point clouds.

Pure arrays-in, numbers-out (numpy arrays or torch tensors on CPU/CUDA); depends on torch, numpy and (for topology)
ripser; never on MLflow or training code.

* :class:`TwoNN` -- Facco et al. (2017), global and pointwise (``fit_pw``), matching ``skdim.id.TwoNN``.
* :class:`MLE` -- Levina & Bickel (2004) with MacKay & Ghahramani (2005) averaging, matching ``skdim.id.MLE``.
* :class:`lPCA` -- PCA dimension (Fukunaga & Olsen 1971), global and pointwise, matching ``skdim.id.lPCA``.
* :class:`EffectiveRank` -- RankMe, Garrido et al. (2023).
* :class:`ParticipationRatio`, :class:`AlphaReQ` -- covariance-spectrum width and decay (Agrawal et al. 2022).
* :class:`PersistentHomology`, :func:`maxmin_landmarks` -- H0/H1 features with ripser on max-min landmarks.
* :func:`twonn_mle` -- both global estimates from one kNN search (the online path).
* :func:`knn_distances` -- chunked exact kNN distances in torch.
* :class:`Estimator` -- the base class of the estimators above (scikit-learn conventions, ``analysis.base``).

The names are loaded on first access (PEP 562), so importing a light submodule such as ``analysis.series``
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.base import Estimator
    from analysis.knn import knn_distances
    from analysis.lid import MLE, TwoNN, lPCA, twonn_mle
    from analysis.spectra import AlphaReQ, EffectiveRank, ParticipationRatio
    from analysis.tda import PersistentHomology, maxmin_landmarks

__all__ = [
    "MLE",
    "AlphaReQ",
    "EffectiveRank",
    "Estimator",
    "ParticipationRatio",
    "PersistentHomology",
    "TwoNN",
    "knn_distances",
    "lPCA",
    "maxmin_landmarks",
    "twonn_mle",
]

_HOME = {
    "MLE": "analysis.lid",
    "TwoNN": "analysis.lid",
    "twonn_mle": "analysis.lid",
    "lPCA": "analysis.lid",
    "AlphaReQ": "analysis.spectra",
    "ParticipationRatio": "analysis.spectra",
    "PersistentHomology": "analysis.tda",
    "maxmin_landmarks": "analysis.tda",
    "EffectiveRank": "analysis.spectra",
    "knn_distances": "analysis.knn",
    "Estimator": "analysis.base",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
