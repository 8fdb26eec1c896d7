"""Chunked exact k-nearest-neighbour distances in torch, plus the input checks shared by the estimators.

Everything here is arrays-in, tensors-out and runs on the device of the input, so it can be called inside a
training loop on hidden states that are still on the GPU.

Precision: on CPU all distances are computed in float64. On CUDA they are computed in float32 (float64 inputs
stay float64), and the k selected distances are recomputed from coordinate differences (``refine``), which
removes the cancellation error of the matmul formula where it matters, for the nearest neighbours.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch

ArrayLike: TypeAlias = np.ndarray | torch.Tensor

# Upper bound on the number of pairwise-distance entries held in memory at once by the automatic chunk size
# (2**21 float64 values = 16 MiB); large enough that the matmul is efficient, small enough to stay in cache.
_CHUNK_ELEMENTS = 2**21


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype in which distances are computed: float64 on CPU; float32 on accelerators unless X is float64."""
    if device.type == "cpu" or dtype == torch.float64:
        return torch.float64
    return torch.float32


def as_points(X: ArrayLike, *, min_points: int, who: str) -> torch.Tensor:
    """Validate a point cloud once and return it as a tensor in the compute dtype on X's device.

    Raises ``ValueError`` if X is not 2-D, is empty along the feature axis, contains NaN/inf, or has fewer
    than ``min_points`` rows.
    """
    if isinstance(X, torch.Tensor):
        t = X.detach()
    else:
        arr = np.asarray(X)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{who}: X must be a real numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{who}: X must be a real numeric array, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{who}: X must be 2-D [n_points, n_features], got shape {tuple(t.shape)}")
    n, d = t.shape
    if d < 1:
        raise ValueError(f"{who}: X has no features (shape {tuple(t.shape)})")
    if n < min_points:
        raise ValueError(f"{who}: needs at least {min_points} points, got {n}")
    t = t.to(compute_dtype(t.device, t.dtype))
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{who}: X contains NaN or inf ({bad} non-finite entries)")
    return t


def unique_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop exact duplicate rows, keeping the first occurrence of each and the original row order.

    Returns ``(X_unique, kept_index)`` with ``X_unique == X[kept_index]`` and ``kept_index`` ascending.
    """
    n = X.shape[0]
    # +0.0 maps -0.0 to +0.0, so rows differing only in the sign of a zero count as duplicates: their
    # distance is exactly 0 and would break log-distance estimators just like true duplicates.
    if X.device.type == "cpu":
        # Rows compared as raw bytes: ~7x faster than torch.unique(dim=0)'s lexicographic sort on CPU.
        rows = np.ascontiguousarray((X + 0.0).numpy())
        _, first = np.unique(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel(), return_index=True)
        if len(first) == n:
            return X, torch.arange(n)
        kept = torch.from_numpy(np.sort(first))
        return X[kept], kept
    _, inverse = torch.unique(X + 0.0, dim=0, return_inverse=True)
    n_unique = int(inverse.max()) + 1 if n else 0
    if n_unique == n:
        return X, torch.arange(n, device=X.device)
    first = torch.full((n_unique,), n, dtype=torch.long, device=X.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=X.device), reduce="amin")
    kept = torch.sort(first).values
    return X[kept], kept


def _auto_chunk(n_rows: int, row_elements: int) -> int:
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(1, row_elements)))


def knn_from_points(
    X: torch.Tensor, k: int, chunk_size: int | None = None, refine: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_distances` on an already validated tensor (see :func:`as_points`); no checks repeated."""
    n = X.shape[0]
    if chunk_size is None:
        chunk_size = _auto_chunk(n, n)
    if refine is None:
        refine = X.dtype != torch.float64
    # Distances are translation invariant; centring shrinks ||x||^2 relative to the distances and so the
    # cancellation error of ||x||^2 + ||y||^2 - 2 x.y.
    Xc = X - X.mean(dim=0, keepdim=True)
    sq = Xc.square().sum(dim=1)
    XcT = Xc.T.contiguous()
    dists = torch.empty((n, k), dtype=X.dtype, device=X.device)
    idx = torch.empty((n, k), dtype=torch.long, device=X.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        rows = torch.arange(stop - start, device=X.device)
        # ||q||^2 is constant along a row and does not change the ranking: it is added after topk, on k
        # values instead of n.
        block = torch.addmm(sq.expand(stop - start, n), Xc[start:stop], XcT, alpha=-2.0)
        block[rows, rows + start] = float("inf")
        vals, nn = torch.topk(block, k, dim=1, largest=False, sorted=True)
        d2 = (vals + sq[start:stop, None]).clamp_min_(0.0)
        if refine:
            diff = Xc.index_select(0, nn.reshape(-1)).view(stop - start, k, -1) - Xc[start:stop, None, :]
            d = torch.linalg.vector_norm(diff, dim=-1)
            d, order = torch.sort(d, dim=1)
            nn = torch.gather(nn, 1, order)
        else:
            d = d2.sqrt_()
        dists[start:stop] = d
        idx[start:stop] = nn
    return dists, idx


def knn_distances(
    X: ArrayLike, k: int, chunk_size: int | None = None, *, refine: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k-nearest-neighbour distances of every row of X to the other rows.

    Squared distances come from ``||x||^2 + ||y||^2 - 2 x.y`` (one matmul per chunk, clamped at 0), the
    point itself is excluded by masking the diagonal, and ``torch.topk`` picks the k smallest. Work is
    chunked over query rows, so at most ``chunk_size x n_points`` distances exist at any time.

    Parameters
    ----------
    X : array or tensor [n_points, n_features]
        Any float dtype, on CPU or CUDA; computed on X's device (float64 on CPU, float32 on CUDA).
    k : int
        Number of neighbours, ``1 <= k <= n_points - 1``.
    chunk_size : int, optional
        Query rows per chunk. Default: as many as keep a chunk at about 2**21 distances.
    refine : bool, optional
        Recompute the k selected distances from coordinate differences (and re-sort). Default: on for
        float32 computation (CUDA), off for float64 where the centred matmul formula is already accurate.

    Returns
    -------
    dist : tensor [n_points, k]
        Distances, ascending along each row, in the compute dtype, on X's device.
    idx : tensor [n_points, k] (int64)
        Row indices of the neighbours. Duplicate rows are *not* removed here: a duplicate of a point is
        its neighbour at distance (numerically) 0.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"knn_distances: k must be a positive integer, got {k!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1
    ):
        raise ValueError(f"knn_distances: chunk_size must be a positive integer or None, got {chunk_size!r}")
    pts = as_points(X, min_points=int(k) + 1, who="knn_distances")
    return knn_from_points(pts, int(k), None if chunk_size is None else int(chunk_size), refine)
