"""Intrinsic-dimension and spectral estimators of hidden-state point clouds.

Pure arrays-in, numbers-out (numpy arrays or torch tensors on CPU/CUDA); depends only on torch and numpy.

* :class:`TwoNN` -- Facco et al. (2017), global and pointwise (``fit_pw``), matching ``skdim.id.TwoNN``.
* :class:`MLE` -- Levina & Bickel (2004) with MacKay & Ghahramani (2005) averaging, matching ``skdim.id.MLE``.
* :class:`EffectiveRank` -- RankMe, Garrido et al. (2023).
* :func:`twonn_mle` -- both global estimates from one kNN search (the online path).
* :func:`knn_distances` -- chunked exact kNN distances in torch.

The names are loaded on first access (PEP 562), so importing a light submodule such as ``analysis.series``
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.knn import knn_distances
    from analysis.lid import MLE, TwoNN, twonn_mle
    from analysis.spectra import EffectiveRank

__all__ = ["MLE", "EffectiveRank", "TwoNN", "knn_distances", "twonn_mle"]

_HOME = {
    "MLE": "analysis.lid",
    "TwoNN": "analysis.lid",
    "twonn_mle": "analysis.lid",
    "EffectiveRank": "analysis.spectra",
    "knn_distances": "analysis.knn",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
