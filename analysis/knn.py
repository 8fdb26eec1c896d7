"""Exact k-nearest-neighbour distances in torch (symmetric blocked search), plus the shared input checks.

Everything here is arrays-in, tensors-out and runs on the device of the input, so it can be called inside a
training loop on hidden states that are still on the GPU.

Algorithm (:func:`knn_from_points`). Squared distances come from ``||x||^2 + ||y||^2 - 2 x.y`` on centred
points, one matmul per block. The distance matrix is symmetric, so only blocks on or above the diagonal
are computed (half the FLOPs of the full matmul) and each one is offered to both its row points and its
column points; every point keeps a running top-k (a pool of 3k candidate slots and ``tau``, a bound on its
k-th smallest value). After the diagonal squares, only a small fraction of a block's entries beat ``tau``, so
each side of a block costs one comparison pass and one nonzero, and the few candidates are scattered into the
pools; a pool is cut back to its k smallest (one small ``topk``) only when it fills up. Clouds of up to
4 096 points are one full block. Memory otherwise: one block of distances (at most
``chunk_size x max(chunk_size, 2**22 / chunk_size)`` entries, and never more than ``chunk_size x n``) plus
O(block) temporaries, the pools (n x 3k values and indices) and O(n x d) copies of the points.

Precision. float32 input is searched in float32 (on CPU too: half the work of float64); float64 input in
float64; other dtypes (float16, bfloat16, integers) in float64 on CPU and float32 on accelerators
(:func:`compute_dtype`). A float32 search is only used to *select* the k neighbours: their distances are
then recomputed in float64 (``refine``): ``||x - y||^2`` from float64 dot products of points centred in
float64 (a sampled matmul, no n x k x d gather), and, for the few pairs where that formula's round-off
bound exceeds ~1e-13 relative (points far from the centroid compared with their distance), from float64
coordinate differences. So returned distances carry ~1e-13 relative error whatever the search dtype; only
neighbours tied to within float32 round-off (~1e-7 relative) can be selected differently from a float64
search.
"""

from __future__ import annotations

import math
import warnings
from typing import TypeAlias

import numpy as np
import torch

from analysis.base import check_int

ArrayLike: TypeAlias = np.ndarray | torch.Tensor

# Distances held in one block by the automatic block shape: 2**22 float32 values = 16 MiB. Large enough
# for a matmul near the large-matmul rate (benchmarks/results/geometry.md has that limit), small enough that
# the comparison and merge passes over it stay cheap.
_BLOCK_ELEMENTS = 2**22
# Automatic row-block height. Blocks on the diagonal are computed in full (their lower half is wasted), so
# they are re-split with the smaller leaf height: the waste is then n * _LEAF_ROWS / 2 of ~n^2 / 2 entries.
# A leaf square also gives every point its first tau (its k-th nearest among the leaf's points): 512 rows
# let fewer candidates through the later blocks than 256, for a little more matmul time in the squares.
_AUTO_ROWS = 1024
_LEAF_ROWS = 512
# Clouds with at most this many pairwise entries (4 096 points; 64 MiB of float32) are searched as one full
# block (see _block_shape): at that size one square and one topk beat the sweep's many small blocks, and
# snapshot-sized clouds (the online case) fall here.
_SMALL_ELEMENTS = 2**24
# A refined squared distance is taken from the dot-product formula if its round-off bound
# sqrt(d) * eps64 * (||x||^2 + ||y||^2) is below this fraction of it, else from coordinate differences.
_REFINE_RTOL = 1e-13
# Row pairs per chunk of the coordinate-difference fallback: bounds its [pairs, d] float64 temporary.
_DIFF_ELEMENTS = 2**20
# Pool slots per point of the running top-k, in units of k (see _RunningTopK).
_POOL_FACTOR = 3


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """dtype in which distances are searched: X's own dtype for float32/float64, else float64 on CPU
    (float16/bfloat16/integers are exactly representable there) and float32 on accelerators."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float64 if device.type == "cpu" else torch.float32


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
    # A sum is NaN/inf whenever any term is, so one reduction (no n x d bool mask) clears the common case;
    # only a non-finite sum (which may also be a harmless overflow) needs the element-wise check. Summed in
    # X's own dtype: a float64 accumulator costs far more on float32 input.
    if n and not bool(torch.isfinite(t.sum())):
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
        rows = np.ascontiguousarray((X + 0.0).numpy())
        # Identical rows have identical bit patterns and so equal integer sums of them (exact in any order);
        # only rows whose sums collide are compared as raw bytes (cheaper than torch.unique(dim=0)'s
        # lexicographic sort of every row, and on clouds without duplicates the sums spare it altogether).
        bits = rows.view({4: np.int32, 8: np.int64}.get(rows.itemsize, np.int8))
        _, inverse, counts = np.unique(bits.sum(axis=1, dtype=np.int64), return_inverse=True, return_counts=True)
        suspects = np.flatnonzero(counts[inverse] > 1)
        if len(suspects) == 0:
            return X, torch.arange(n)
        sub = np.ascontiguousarray(rows[suspects])
        _, first = np.unique(sub.view(np.dtype((np.void, sub.itemsize * sub.shape[1]))).ravel(), return_index=True)
        if len(first) == len(suspects):
            return X, torch.arange(n)
        kept = torch.from_numpy(np.setdiff1d(np.arange(n), np.delete(suspects, first)))
        return X[kept], kept
    _, inverse = torch.unique(X + 0.0, dim=0, return_inverse=True)
    n_unique = int(inverse.max()) + 1 if n else 0
    if n_unique == n:
        return X, torch.arange(n, device=X.device)
    first = torch.full((n_unique,), n, dtype=torch.long, device=X.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=X.device), reduce="amin")
    kept = torch.sort(first).values
    return X[kept], kept


class _RunningTopK:
    """Per-point running k smallest squared distances, kept in a pool of ``width`` slots per point.

    New candidates are appended to a point's free slots; only when a point's pool would overflow is it
    compacted to its k smallest (one topk over ``width`` values), which is also when ``tau``, the filter
    threshold, is tightened to the current k-th smallest value. Between compactions tau is stale (too
    large), which only lets a few more candidates through: the result is exact either way. This replaces a
    topk-merge per block and per point by a scatter of the few new candidates. A small pool keeps tau
    tight and a large one compacts less often; 3k (``_POOL_FACTOR``) was the fastest of 2k..8k tried.
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.width = max(_POOL_FACTOR * k, 32)
        self.val = torch.full((n, self.width), math.inf, dtype=dtype, device=device)
        self.idx = torch.zeros((n, self.width), dtype=torch.long, device=device)
        self.fill = torch.zeros(n, dtype=torch.long, device=device)
        self.tau = torch.full((n,), math.inf, dtype=dtype, device=device)
        self.ready = False

    def _merge(self, rows: slice | torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Replace the pools of ``rows`` (a slice, or a tensor of point indices) by the k smallest of pool +
        candidates [m, c] (c may be 0)."""
        sliced = isinstance(rows, slice)
        pv = self.val[rows] if sliced else self.val.index_select(0, rows)
        pi = self.idx[rows] if sliced else self.idx.index_select(0, rows)
        top, pos = torch.topk(torch.cat([pv, vals], dim=1), self.k, dim=1, largest=False, sorted=False)
        top_i = torch.gather(torch.cat([pi, idx], dim=1), 1, pos)
        pv[:, : self.k], pv[:, self.k :] = top, math.inf  # in place where rows is a slice (pv is a view)
        pi[:, : self.k] = top_i
        if not sliced:
            self.val.index_copy_(0, rows, pv)
            self.idx.index_copy_(0, rows, pi)
        self.fill[rows] = self.k
        self.tau[rows] = top.amax(dim=1)

    def _append(self, t0: int, size: int, tgt: torch.Tensor, src: torch.Tensor, vals: torch.Tensor) -> None:
        """Append candidates (target t0 + tgt, source src, squared distance) to the pools; ``tgt`` ascending,
        all within [0, size)."""
        if tgt.numel() == 0:
            return
        counts = torch.bincount(tgt, minlength=size)
        fill = self.fill[t0 : t0 + size]
        over = fill + counts > self.width
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(tgt.numel(), device=tgt.device) - first[tgt]
        if bool(over.any()):
            full = over.nonzero().squeeze(1) + t0
            self._merge(full, vals.new_empty((full.numel(), 0)), src.new_empty((full.numel(), 0)))
            if self.k + int(counts.max()) > self.width:
                # More new candidates for one target than a pool holds (poor tau): padded merge of all.
                pv = torch.full((size, int(counts.max())), math.inf, dtype=vals.dtype, device=vals.device)
                pi = torch.zeros(pv.shape, dtype=torch.long, device=vals.device)
                pv[tgt, slot] = vals
                pi[tgt, slot] = src
                self._merge(slice(t0, t0 + size), pv, pi)
                return
        pos = (tgt + t0) * self.width + fill[tgt] + slot
        self.val.view(-1).scatter_(0, pos, vals)
        self.idx.view(-1).scatter_(0, pos, src)
        fill += counts

    def offer(self, G: torch.Tensor, t0: int, s0: int, both: bool) -> None:
        """Offer block G of squared distances between points t0 + i (its rows) and s0 + j (its columns) to
        its rows, and with ``both`` (an off-diagonal block of the symmetric matrix) to its columns too."""
        self._offer_side(G, t0, s0, columns=False)
        if both:
            self._offer_side(G, s0, t0, columns=True)

    def _offer_side(self, G: torch.Tensor, t0: int, s0: int, columns: bool) -> None:
        """Offer G to its rows (targets t0 + i, sources s0 + j) or, with ``columns``, to its columns (targets
        t0 + j, sources s0 + i)."""
        m, w = G.shape
        n_t = w if columns else m
        tau = self.tau[t0 : t0 + n_t]
        # Once a target has k candidates its tau stays finite, so after the diagonal squares this is one
        # check for the whole search rather than one per block.
        if not self.ready:
            self.ready = not bool(torch.isinf(self.tau).any())
        flat = None
        if self.ready or not bool(torch.isinf(tau).any()):
            flat = _flat_nonzero(G < (tau[None, :] if columns else tau[:, None]))
            if flat.numel() == 0:
                return
        # Dense path: while a target has fewer than k candidates (its first block) or when tau is poor (data
        # ordered so that neighbours come late) most entries pass, and one topk over the block is cheaper.
        if flat is None or flat.numel() * 4 > G.numel():
            Gt = G.T.contiguous() if columns else G  # topk along contiguous rows is faster
            vals, pos = torch.topk(Gt, min(self.k, Gt.shape[1]), dim=1, largest=False, sorted=False)
            self._merge(slice(t0, t0 + n_t), vals, pos + s0)
            return
        # Sparse path: append the few entries below tau to their targets' pools.
        vals = G.view(-1).index_select(0, flat)
        r = flat.div(w, rounding_mode="floor")
        c = flat - r * w
        if columns:  # group by target: the flat indices list the entries row by row, i.e. by source
            order = _stable_order(c, w)
            r, c, vals = c[order], r[order], vals[order]
        self._append(t0, n_t, r, c + s0, vals)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The k smallest squared distances [n, k] (unsorted) and their indices."""
        self._merge(slice(None), self.val[:, :0], self.idx[:, :0])
        return self.val[:, : self.k], self.idx[:, : self.k]


def _search(
    Xc: torch.Tensor, sq: torch.Tensor, top: _RunningTopK, lo: int, hi: int, rows: int, leaf: int, width: int
) -> None:
    """Offer every pair (i, j), lo <= i, j < hi, i != j, to ``top`` once, computing only blocks on or above
    the diagonal: row blocks of ``rows`` points against the columns to their right, ``width`` at a time;
    diagonal squares are searched again with ``leaf`` rows, and leaf squares are computed in full."""
    # Diagonal squares first: afterwards every point has a finite tau from its own block (if k < leaf), so
    # the large off-diagonal blocks take the cheap sparse path from the start.
    for a in range(lo, hi, rows):
        b = min(hi, a + rows)
        if b - a > leaf:
            _search(Xc, sq, top, a, b, leaf, leaf, width)
        else:
            # torch.addmm is looked up at call time on purpose (tests spy on it to check the block bound).
            G = torch.addmm(sq[None, a:b], Xc[a:b], Xc[a:b].T, alpha=-2.0).add_(sq[a:b, None])
            G.fill_diagonal_(math.inf)
            # The square holds both (i, j) and (j, i): offering it to its rows alone covers every pair once.
            top.offer(G, a, a, both=False)
    for a in range(lo, hi, rows):
        b = min(hi, a + rows)
        for c0 in range(b, hi, width):
            c1 = min(hi, c0 + width)
            G = torch.addmm(sq[None, c0:c1], Xc[a:b], Xc[c0:c1].T, alpha=-2.0).add_(sq[a:b, None])
            top.offer(G, a, c0, both=True)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous mask (numpy's SIMD nonzero is faster on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


def _stable_order(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """Stable argsort of integer keys in [0, bound) (numpy's radix sort on uint16 keys, faster on CPU)."""
    if keys.device.type == "cpu" and bound <= 2**16:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(keys, stable=True)


def _sq_norms(X: torch.Tensor) -> torch.Tensor:
    """Squared row norms by one fused reduction (``vecdot`` materialises X * X: slower on CPU). Off by a
    few ulp from a plain sum of squares: fine for the search, not for the refinement."""
    return torch.linalg.vector_norm(X, dim=1).square_()


def refined_sq_distances(X: torch.Tensor, idx: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
    """float64 squared distances ``||X[q] - X[idx[i, j]]||^2`` with q = ``queries[i]`` (default: q = i) for the
    [m, k] table ``idx``."""
    m, k = idx.shape
    n, d = X.shape
    # One [n, d] float64 allocation: a float64 copy of X (exact for float32 X), centred in place (faster than
    # the mixed-dtype X - centre). Any approximate centre serves (it only has to shrink the norms), so the
    # mean is taken in X's dtype; a dtype=float64 mean would first materialise a float64 copy of X.
    X64 = X.to(torch.float64, copy=True).sub_(X.mean(dim=0, keepdim=True).to(torch.float64))
    # Plain sums of squares (exact where the data are, e.g. a lattice; a norm's sqrt-then-square is not), in row
    # chunks: vecdot materialises X64 * X64, which would double the peak memory of the whole search.
    sq = torch.empty(n, dtype=torch.float64, device=X.device)
    step = max(1, _DIFF_ELEMENTS // d)  # rows per chunk here and in the fallbacks below
    for s in range(0, n, step):
        sq[s : s + step] = torch.linalg.vecdot(X64[s : s + step], X64[s : s + step])
    Q64 = X64 if queries is None else X64[queries]
    rows = (torch.arange(m, device=X.device) if queries is None else queries).repeat_interleave(k)
    cols = idx.reshape(-1)
    try:
        # Sampled matmul: the m * k dot products X64[q] . X64[j] without materialising [m, k, d] neighbour
        # coordinates, which costs several times more in memory traffic than the arithmetic.
        crow = torch.arange(0, m * k + 1, k, device=X.device)
        zeros = torch.zeros(m * k, dtype=torch.float64, device=X.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": this one op is tested here
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols, zeros, (m, n), check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, Q64, X64.T, beta=0.0).values()
    except (RuntimeError, NotImplementedError):  # a backend without sampled_addmm: batched dot products
        dots = torch.empty(m * k, dtype=torch.float64, device=X.device)
        for s in range(0, m * k, step):
            dots[s : s + step] = torch.linalg.vecdot(X64[rows[s : s + step]], X64[cols[s : s + step]])
    scale = sq[rows] + sq[cols]
    d2 = (scale - 2.0 * dots).clamp_min_(0.0)
    # Round-off of the dot-product formula is ~sqrt(d) * eps * (||x||^2 + ||y||^2); where that is not far
    # below d2 (a pair much closer than its distance to the centroid), take the coordinate differences.
    bad = (scale * (math.sqrt(d) * torch.finfo(torch.float64).eps) > _REFINE_RTOL * d2).nonzero().squeeze(1)
    for s in range(0, bad.numel(), step):
        sel = bad[s : s + step]
        diff = X[rows[sel]].to(torch.float64) - X[cols[sel]].to(torch.float64)
        d2[sel] = diff.square().sum(dim=1)
    return d2.view(m, k)


def _block_shape(n: int, chunk_size: int | None) -> tuple[int, int, int]:
    """(rows, leaf rows, column width) of the blocks; rows * width <= max(rows^2, _BLOCK_ELEMENTS)."""
    if chunk_size is None and n * n <= _SMALL_ELEMENTS:
        # Small clouds: one full square and one topk beat the symmetric sweep's many small blocks.
        return n, n, n
    rows = min(n, _AUTO_ROWS if chunk_size is None else chunk_size)
    leaf = min(rows, _LEAF_ROWS)
    width = max(rows, _BLOCK_ELEMENTS // rows)
    return rows, leaf, width


def knn_from_points(
    X: torch.Tensor, k: int, chunk_size: int | None = None, refine: bool | float = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_distances` on an already validated tensor (see :func:`as_points`); no checks repeated."""
    n, d = X.shape
    # Distances are translation invariant; centring shrinks ||x||^2 relative to the distances and so the
    # cancellation error of ||x||^2 + ||y||^2 - 2 x.y.
    Xc = X - X.mean(dim=0, keepdim=True)
    # A power-of-two rescale (exact) keeps squared coordinates away from float32 overflow and underflow; it
    # changes no ranking and the refined distances are computed from X itself.
    amax = float(torch.stack(torch.aminmax(Xc)).abs().max()) if Xc.numel() else 0.0  # no [n, d] temporary
    scale = 1.0
    if amax > 0 and not 2.0**-40 < amax < 2.0**40:
        scale = 2.0 ** -math.frexp(amax)[1]
        Xc = Xc * scale
    sq = _sq_norms(Xc)
    top = _RunningTopK(n, k, Xc.dtype, X.device)
    rows, leaf, width = _block_shape(n, chunk_size)
    _search(Xc, sq, top, 0, n, rows, leaf, width)
    eps = torch.finfo(Xc.dtype).eps
    del Xc
    val, idx = top.result()
    # Neighbours in index order: the refinement's gathers then walk X forwards (faster), and the
    # stable sort below breaks exact distance ties by index, as a brute-force argsort does.
    idx, order = torch.sort(idx, dim=1)
    if refine is True:
        d2 = refined_sq_distances(X, idx)
    else:
        d2 = torch.gather(val, 1, order).clamp_min_(0.0)
        rough = None
        if refine is not False:
            # Refine only the points where the search's round-off, ~sqrt(d) * eps * (||x||^2 + ||y||^2) on the
            # centred points (Higham 2002, sec. 3.1, for the dot product), may exceed ``refine`` relative.
            bound = (sq[:, None] + sq[idx]).mul_(math.sqrt(d) * eps)
            rough = (bound > refine * d2).any(dim=1).nonzero().squeeze(1)
        d2 = d2.to(torch.float64) / (scale * scale)
        if rough is not None and rough.numel():
            d2[rough] = refined_sq_distances(X, idx[rough], queries=rough)
    d2, order = torch.sort(d2, dim=1, stable=True)
    return d2.sqrt_(), torch.gather(idx, 1, order)


def knn_distances(
    X: ArrayLike, k: int, chunk_size: int | None = None, *, refine: bool | float = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean k-nearest-neighbour distances of every row of X to the other rows.

    Exact brute force (every pair is compared), organised as a symmetric blocked search: see the module
    docstring. The point itself is excluded; the k smallest squared distances per row are kept in a running
    top-k while blocks on and above the diagonal of the distance matrix are computed.

    Parameters
    ----------
    X : array or tensor [n_points, n_features]
        Any real dtype, on CPU or CUDA; searched on X's device in :func:`compute_dtype` (float32 input in
        float32, float64 in float64).
    k : int
        Number of neighbours, ``1 <= k <= n_points - 1``.
    chunk_size : int, optional
        Rows per block. A block holds at most ``chunk_size x max(chunk_size, 2**22 // chunk_size)`` and
        never more than ``chunk_size x n_points`` distances. Default: 1024-row blocks of ~2**22 distances.
    refine : bool or float, default True
        True: recompute the k selected distances in float64 (dot products of float64-centred points,
        coordinate differences where those could lose more than ~1e-13 relative; a duplicate's distance is
        exactly 0); it costs a fraction of the search. False: return the search's own values (from centred
        points; close to float32 round-off on typical float32 clouds, but points much closer to each other
        than to the centroid can lose every digit). A float r: recompute only the points whose search
        round-off bound may exceed r relative in a squared distance, keep the search's values elsewhere.

    Returns
    -------
    dist : tensor [n_points, k] (float64)
        Distances, ascending along each row, on X's device.
    idx : tensor [n_points, k] (int64)
        Row indices of the neighbours. Duplicate rows are *not* removed here: a duplicate of a point is
        its neighbour at distance (numerically) 0.
    """
    who = "knn_distances"
    k = check_int(k, "k", 1, who, "a positive integer")
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", 1, who, "a positive integer or None")
    if not isinstance(refine, bool) and not (isinstance(refine, float) and refine >= 0):
        raise ValueError(f"{who}: refine must be True, False or a relative tolerance >= 0, got {refine!r}")
    pts = as_points(X, min_points=k + 1, who=who)
    return knn_from_points(pts, k, chunk_size, refine)
