"""The layout rules of every node type, and those of ``where``.

The builder dispatches through two tables: ``_ROWS`` (the candidate key
blocks of each query-block row, as intervals) and ``_CLASS`` (the exact
class of tiles). Each primitive states its own rules (``patterncc.primitives``).
``where COND`` is not a primitive and has its rules here: candidates come
from refining a quadtree of block rectangles, dropping every rectangle where
interval arithmetic (``intervals``) proves the condition false; classes come
from interval arithmetic, then evaluation (``evaluation``) where it cannot
decide.
"""

from __future__ import annotations

import numpy as np

from .. import ir
from ..primitives import PRIMITIVES
from ..primitives.base import EMPTY, FULL, PARTIAL, run_offsets
from .evaluation import _resolve
from .intervals import _truth


# -- where COND: interval arithmetic, then evaluation where it cannot decide.
#    Candidates come from refining a quadtree of block rectangles, dropping
#    every rectangle where the condition is proven false.


def _where_cells(node, ctx, r0, r1, c0, c1, min_size=1):
    """Rectangles of blocks ``[ra, ra + size) x [ca, ca + size)`` (clipped to
    rows ``r0 .. r1 - 1`` and key blocks ``c0 .. c1 - 1``) that together hold
    every block where the condition may hold: ``(ra, ca, size)``, each cell of
    the final level ``size`` or ``min_size`` blocks a side."""
    B, n = ctx.B, ctx.n
    size = 1 << max(0, (max(r1 - r0, c1 - c0) - 1).bit_length())
    ra = np.array([r0], dtype=np.int64)
    ca = np.array([c0], dtype=np.int64)
    done = []  # (ra, ca, size) of cells kept whole: true everywhere, or small enough
    while ra.size:
        rb, cb = np.minimum(ra + size, r1), np.minimum(ca + size, c1)
        env = {"q": (ra * B, np.minimum(rb * B, n) - 1), "k": (ca * B, np.minimum(cb * B, n) - 1), "n": (n, n)}
        true, false, _ = (np.broadcast_to(x, ra.shape) for x in _truth(node.cond, env))
        whole = true | (size <= min_size)
        done.append((ra[whole & ~false], ca[whole & ~false], size))
        split = ~false & ~whole
        ra, ca, size = ra[split], ca[split], size // 2
        ra = np.concatenate([ra, ra, ra + size, ra + size])
        ca = np.concatenate([ca, ca + size, ca, ca + size])
        inside = (ra < r1) & (ca < c1)
        ra, ca = ra[inside], ca[inside]
    return done


def _rows_where(node, ctx, rows, win):
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(win[0].min()), int(win[1].max()) + 1
    if c0 >= c1:
        return rows[:0], rows[:0], rows[:0]
    parts = []
    for ra, ca, size in _where_cells(node, ctx, r0, r1, c0, c1):
        height = np.minimum(ra + size, r1) - ra  # one interval per row of each cell
        r = np.repeat(ra, height) + run_offsets(height)
        lo = np.repeat(ca, height)
        parts.append((r, lo, np.minimum(lo + size, c1) - 1))
    return tuple(np.concatenate([p[x] for p in parts]) for x in range(3))


def _estimate_where(node, ctx) -> int:
    """Blocks in the cells a coarse refinement keeps (at most 64 a side: cheap
    enough to run for each of thousands of heads before any is built)."""
    nb = ctx.nb
    cells = _where_cells(node, ctx, 0, nb, 0, nb, min_size=max(1, nb // 64))
    return int(sum(np.sum((np.minimum(ra + size, nb) - ra) * (np.minimum(ca + size, nb) - ca)) for ra, ca, size in cells))


def _class_where(node, t):
    env = {"q": (t.qlo, t.qhi), "k": (t.klo, t.khi), "n": (t.ctx.n, t.ctx.n)}
    true, false, partial = (np.broadcast_to(x, (t.size,)) for x in _truth(node.cond, env))
    out = np.where(true, FULL, np.where(false, EMPTY, PARTIAL)).astype(np.int8)
    unknown = ~true & ~false & ~partial
    if unknown.any():
        out[unknown] = _resolve(node, t.take(unknown))
    return out


_ROWS = {cls: cls.rows for cls in PRIMITIVES.values()} | {ir.Where: _rows_where}
_CLASS = {cls: cls.classify for cls in PRIMITIVES.values()} | {ir.Where: _class_where}
