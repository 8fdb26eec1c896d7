"""Fourier sparsity of a cyclic group's token embeddings: a label-free progress measure of grokking.

A transformer that groks modular addition computes it with a few Fourier frequencies of the residues, and its
token embeddings become sparse in the Fourier basis of the group well before test accuracy jumps, while a
memorising model's embeddings stay spread over all frequencies (Nanda et al. 2023, "Progress measures for
grokking via mechanistic interpretability", sec. 4-5). It reads weights only: no data, no labels.

``fourier_gini`` is the Gini coefficient of the embeddings' power per non-constant frequency: 0 when every
frequency carries the same power, 1 - 1/m when one of the m frequencies carries all of it.
"""

from __future__ import annotations

import numpy as np


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0: all equal; (n - 1) / n: one holds everything)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() <= 0:
        raise ValueError("gini needs at least one value and a positive sum")
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def fourier_gini(embeddings: np.ndarray) -> float:
    """`embeddings` [n, d]: row k is the embedding of the group element g^k (or k, for an additive group), so
    the rows follow the cyclic group's order. The Gini of the power at frequencies 1 ... n // 2 (the constant
    frequency 0 carries the embeddings' mean, which says nothing about the group; a real signal's frequency f
    and n - f carry the same power, so rfft's half holds every distinct one)."""
    spectrum = np.fft.rfft(np.asarray(embeddings, dtype=np.float64), axis=0)[1:]
    return gini((np.abs(spectrum) ** 2).sum(axis=1))


def cyclic_order(op: str, p: int) -> list[int] | None:
    """The residues mod `p` in the order of the cyclic group that `op` works in: 0, 1, ..., p - 1 for + and -;
    for * and / the multiplicative group 1 ... p - 1 as powers g^0, g^1, ... of its smallest generator g (a
    primitive root), so multiplication is addition of exponents. None where there is no such group: another
    op (x^2+xy+y^2 is no group's operation), or * mod a `p` whose units are not cyclic."""
    if op in ("+", "-"):
        return list(range(p))
    if op not in ("*", "/"):
        return None
    for g in range(1, p):
        powers = [pow(g, k, p) for k in range(p - 1)]
        if len(set(powers)) == p - 1:
            return powers
    return None
