"""The estimator base class of ``analysis`` and the parameter checks its estimators share.

Every estimator here (:class:`~analysis.lid.TwoNN`, :class:`~analysis.lid.MLE`, :class:`~analysis.lid.lPCA`,
the spectra of :mod:`analysis.spectra`, :class:`~analysis.tda.PersistentHomology`) follows the scikit-learn /
scikit-dimension contract, which :class:`Estimator` provides the shared half of:

* ``__init__`` only stores its arguments, each under its own name, and does no work and no validation;
  so ``type(est)(**est.get_params())`` is an unfitted copy, and ``set_params`` can change any parameter.
* ``fit(X, y=None)`` (and ``fit_pw`` where there is one) validates the parameters and X once, when it runs
  (X through :func:`analysis.knn.as_points`), and returns ``self``.
* What a fit computes is stored in attributes whose names end in ``_`` (``dimension_``, ``features_``, ...);
  an unfitted estimator has none of them.
* A ``ValueError`` starts with the method that raised it: ``"<Class>.<method>: <what is wrong>"``.

Imports only numpy (no torch), so that any module of ``analysis`` can use it.
"""

from __future__ import annotations

import inspect
from typing import Any, Self

import numpy as np


class Estimator:
    """Base of the estimators in ``analysis``: parameters from the constructor's signature.

    Subclasses define ``__init__`` (storing every argument as an attribute of the same name, nothing else)
    and ``fit``; this class gives them ``get_params``, ``set_params`` and a ``repr`` listing the parameters,
    as scikit-learn's ``BaseEstimator`` does (without depending on scikit-learn).
    """

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters and their current values, in signature order."""
        params = inspect.signature(type(self).__init__).parameters.values()
        names = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> Self:
        """Set constructor parameters by name; ``ValueError`` for a name the constructor does not take."""
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__}: unknown parameter {name!r}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def check_int(value: Any, name: str, minimum: int, who: str, expected: str | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else ``ValueError``.

    The message reads ``"<who>: <name> must be <expected>, got <value!r>"``; ``expected`` defaults to
    ``"an integer >= <minimum>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{who}: {name} must be {expected or f'an integer >= {minimum}'}, got {value!r}")
    return int(value)


def check_chunk(value: Any, who: str) -> int | None:
    """A ``chunk_size`` parameter: None (chosen automatically) or an integer >= 1."""
    return None if value is None else check_int(value, "chunk_size", 1, who)
