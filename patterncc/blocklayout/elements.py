"""Element CSR from a layout: ``sparse_mask``, the allowed ``(q, k)``
elements of a pattern, for sequences too long for a dense mask.

FULL blocks expand to all their elements; PARTIAL blocks are evaluated,
along their allowed diagonals for patterns of ``q - k`` alone. Time and
memory follow the non-empty blocks and the allowed elements, never
``n * n``; ``limits.MAX_SPARSE_ELEMENTS`` bounds the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import ir
from ..errors import LimitError
from ..masks import evaluate
from . import limits
from .builder import _head_contexts, _head_pairs, _prepare
from .evaluation import depends_on, _evaluate
from .tiles import _Budget, _Ctx, _Tiles

if TYPE_CHECKING:
    import scipy.sparse as sp  # imported where used: it costs ~0.1 s

# Element slots materialized at once while expanding blocks into a CSR.
_CSR_CHUNK = 2**20


def sparse_mask(p: ir.Pattern, seq_len: int, heads: int = 1, *, block: int = 64) -> list[sp.csr_matrix]:
    """One bool CSR ``[n, n]`` per layout head (``H`` as in ``BlockLayout``),
    sorted indices, built from the layout at ``block``: FULL blocks expand to
    all their elements, PARTIAL blocks are evaluated (along their allowed
    diagonals for patterns of ``q - k`` alone). Time and memory follow the
    non-empty blocks and the allowed elements, never ``n * n``; the result
    itself holds about 5 bytes per allowed element."""
    bound, H = _prepare(p, seq_len, block, heads)
    n, block = int(seq_len), int(block)
    heads_of, ctxs = _head_contexts(bound, H, n, block)
    pairs = {ph: _head_pairs(ph, ctx) for ph, ctx in ctxs.items()}
    # FULL blocks alone are a lower bound on the elements: refuse before expanding any.
    side = min(block, n)
    at_least = sum(int(np.count_nonzero(full)) for _, _, full in pairs.values()) * side * side
    _check_elements(at_least, n, "at least ")
    budget = next(iter(ctxs.values())).budget
    built = {ph: _elements_csr(ph, *pairs[ph], n, block, budget) for ph in pairs}
    return [built[ph] for ph in heads_of]


def _check_elements(count: int, n: int, qualifier: str = "") -> None:
    if count > limits.MAX_SPARSE_ELEMENTS:
        raise LimitError(
            f"sparse_mask at seq_len={n} holds {qualifier}{count} allowed elements, over the limit of "
            f"{limits.MAX_SPARSE_ELEMENTS}",
            hint="use layout() (blocks, not elements) or a shorter sequence",
        )


def _elements_csr(p: ir.Pattern, i, j, full, n: int, B: int, budget: _Budget | None = None) -> sp.csr_matrix:
    """bool CSR ``[n, n]`` of the elements of the non-empty tiles ``(i, j)``
    (sorted by ``(i, j)``): FULL tiles expand whole; PARTIAL tiles are
    evaluated, along their allowed diagonals when the pattern depends only on
    ``q - k`` (so a strided pattern costs its allowed elements, not
    ``block**2`` per tile), element by element otherwise.

    Works a band of query-block rows at a time (a slab of rows of one block
    row when that row alone is too wide). Per block row the tiles' columns are
    laid side by side in key order, so ``np.nonzero`` of ``[rows, columns]``
    yields the elements already row-major with sorted keys.
    """
    import scipy.sparse as sp

    ctx = _Ctx(n, B, budget)
    nb, side = ctx.nb, min(B, n)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    diagonal = depends_on(p) == "d"
    ctx.charge(int(np.count_nonzero(~full)) * (2 * side - 1 if diagonal else side * side))
    row_start = np.searchsorted(i, np.arange(nb + 1))  # tiles of block row x: row_start[x] : row_start[x + 1]
    counts = np.zeros(n, dtype=np.int64)
    parts = []
    x = 0
    while x < nb:
        # block rows x .. y - 1, about _CSR_CHUNK element slots (at least one row)
        y = int(np.searchsorted(row_start, row_start[x] + max(1, _CSR_CHUNK // (side * side)), "right")) - 1
        y = min(max(y, x + 1), nb)
        lo, hi = row_start[x], row_start[y]
        if lo == hi:
            x = y
            continue
        t = _Tiles(i[lo:hi], j[lo:hi], ctx)
        boxed = full[lo:hi] | (not diagonal)  # tiles expanded as [rows, keys] boxes
        diag_tile, diag_d = _allowed_diagonals(p, t, ~boxed)
        slab = side if y > x + 1 else max(1, _CSR_CHUNK // (side * (hi - lo)))
        for a0 in range(0, side, slab):
            a1 = min(side, a0 + slab)
            boxes = _tile_elements(p, t, full[lo:hi], boxed, a0, a1, ctx)  # [boxed tiles, rows, side]
            box_of = np.cumsum(boxed) - 1  # position of each boxed tile in `boxes`
            for r in range(x, y):
                s0, s1 = row_start[r] - lo, row_start[r + 1] - lo
                if s0 == s1:
                    continue
                q0 = r * B + a0
                rows = min(n, r * B + a1) - q0
                if rows <= 0:
                    continue
                k, per_row = _row_elements(t, boxes, box_of, boxed, diag_tile, diag_d, s0, s1, q0, rows, side)
                counts[q0 : q0 + rows] = per_row
                ctx.budget.elements += k.size
                _check_elements(ctx.budget.elements, n)
                parts.append(k)
        x = y
    nnz = int(counts.sum())
    index = np.int32 if nnz <= ir.MAX_VALUE else np.int64
    indptr = np.zeros(n + 1, dtype=index)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(parts).astype(index, copy=False) if parts else np.zeros(0, dtype=index)
    del parts
    out = sp.csr_matrix((np.ones(nnz, dtype=bool), indices, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def _allowed_diagonals(p: ir.Pattern, t: _Tiles, which: np.ndarray):
    """For the tiles ``which`` of ``t`` (of a pattern of ``q - k`` only): the
    allowed ``d = q - k`` of each, as ``(tile index in t, d)`` sorted by tile,
    then ``d`` descending (keys ascending)."""
    idx = np.flatnonzero(which)
    if idx.size == 0:
        return idx, idx
    s = t.take(idx)
    offsets = np.arange(2 * min(t.ctx.B, t.ctx.n) - 1, dtype=np.int64)
    d = s.dhi[:, None] - offsets  # descending
    valid = d >= s.dlo[:, None]
    allowed = evaluate(p, np.maximum(d, s.dlo[:, None]), np.int64(0), t.ctx.n) & valid
    tile, col = np.nonzero(allowed)
    return idx[tile], d[tile, col]


def _tile_elements(p, t: _Tiles, full, boxed, a0: int, a1: int, ctx: _Ctx) -> np.ndarray:
    """bool ``[boxed tiles, a1 - a0, side]``: allowed elements of rows
    ``a0 .. a1 - 1`` of the boxed tiles (False outside ``seq_len``)."""
    s = t.take(boxed)
    side = min(ctx.B, ctx.n)
    q = s.qlo[:, None, None] + np.arange(a0, a1)[None, :, None]  # [T, rows, 1]
    k = s.klo[:, None, None] + np.arange(side)[None, None, :]  # [T, 1, side]
    m = (q <= s.qhi[:, None, None]) & (k <= s.khi[:, None, None])
    partial = ~full[boxed]
    if partial.any():
        qp = np.minimum(q[partial], s.qhi[partial, None, None])
        kp = np.minimum(k[partial], s.khi[partial, None, None])
        m[partial] &= _evaluate(p, qp, kp, ctx)
    return m


def _row_elements(t, boxes, box_of, boxed, diag_tile, diag_d, s0, s1, q0, rows, side):
    """Sorted keys of rows ``q0 .. q0 + rows - 1`` in tiles ``s0 .. s1 - 1``
    (one block row), and how many per row."""
    q = q0 + np.arange(rows)
    # columns of boxed tiles: key klo + c, the same in every row
    box_tiles = np.flatnonzero(boxed[s0:s1]) + s0
    box_cols = boxes[box_of[box_tiles], :rows].transpose(1, 0, 2).reshape(rows, -1)
    box_tile = np.repeat(box_tiles, side)
    box_key = (t.klo[box_tiles][:, None] + np.arange(side)).ravel()
    # columns of diagonals: key q - d, allowed while it stays inside the tile
    lo, hi = np.searchsorted(diag_tile, [s0, s1])
    dt, d = diag_tile[lo:hi], diag_d[lo:hi]
    first = np.maximum(t.qlo[dt], t.klo[dt] + d)
    last = np.minimum(t.qhi[dt], t.khi[dt] + d)
    diag_cols = (q[:, None] >= first) & (q[:, None] <= last)
    # tiles in key order; inside a tile keys ascend already
    order = np.argsort(np.concatenate([box_tile, dt]), kind="stable")
    grid = np.concatenate([box_cols, diag_cols], axis=1)[:, order]
    base = np.concatenate([box_key, -d])[order]
    slope = np.concatenate([np.zeros(box_key.size, dtype=np.int64), np.ones(d.size, dtype=np.int64)])[order]
    a, col = np.nonzero(grid)
    keys = base[col] + slope[col] * q[a]
    return keys.astype(np.int32), np.bincount(a, minlength=rows)
