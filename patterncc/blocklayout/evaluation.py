"""Exact classes by evaluation: the fallback where closed forms cannot decide.

``_resolve`` classifies tiles by evaluating a node over their elements, as
cheaply as its dependence allows (``_scan_tiles``): over the
``2 * block - 1`` values of ``d = q - k`` when it depends only on ``q - k``,
over ``block`` keys when only on ``k``, else over the ``block**2`` elements.
Tiles that a translation along the diagonal maps onto each other are
evaluated once (``_period``). Every evaluation is charged to the call's
budget (``limits.MAX_ELEMENT_EVALS``); ``_count_tiles`` counts allowed
elements the same way (``BlockLayout.element_density``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import ir
from ..masks import evaluate
from ..primitives import PRIMITIVES
from ..primitives.base import PARTIAL, _classes
from .tiles import _Ctx, _Rects, _Tiles

# Elements evaluated per numpy call when resolving tiles (bounds memory).
_EVAL_CHUNK = 2**22

_D_ONLY = tuple(cls for cls in PRIMITIVES.values() if "d" in cls.DEPENDS_ON)
_K_ONLY = tuple(cls for cls in PRIMITIVES.values() if "k" in cls.DEPENDS_ON)
_COMBINATORS = (ir.Union, ir.Intersect, ir.Difference, ir.Complement)


def depends_on(node: ir.Pattern) -> str:
    """"d" when the node depends only on ``q - k``, "k" when only on ``k``,
    else "qk"."""
    leaves = [c for c in ir.walk(node) if not isinstance(c, _COMBINATORS)]
    if all(isinstance(c, _D_ONLY) for c in leaves):
        return "d"
    if all(isinstance(c, _K_ONLY) for c in leaves):
        return "k"
    return "qk"


def _resolve(node: ir.Pattern, t: _Tiles) -> np.ndarray:
    """Exact classes of tiles ``t`` by evaluating ``node`` (PARTIAL, which is
    sound, for rectangles: see ``classify_rectangles``)."""
    if isinstance(t, _Rects):
        return np.full(t.size, PARTIAL, dtype=np.int8)
    anything, everything = _scan_tiles(node, t, count=False)
    return _classes(anything, everything)


def _count_tiles(node: ir.Pattern, t: _Tiles) -> np.ndarray:
    """int64 ``[t.size]``: allowed elements in each tile."""
    return _scan_tiles(node, t, count=True)


def _period(node: ir.Pattern, B: int) -> int | None:
    """``P`` such that tiles ``(i, j)`` and ``(i + P, j + P)`` hold the same
    mask (away from the end of the sequence), or None.

    Each primitive says its own period (``period()``): 1 for functions of
    ``q - k``, which are unchanged when ``q`` and ``k`` move together; ``l``
    for ``block(l)`` and ``summary(l, c)``; None when it has none. ``P * B``
    is the least common multiple of those periods and ``B``.
    """
    L = 1
    for c in ir.walk(node):
        if isinstance(c, _COMBINATORS):
            continue
        period = c.period() if isinstance(c, ir.Primitive) else None
        if period is None:
            return None
        L = math.lcm(L, period)
    return L // math.gcd(L, B)


def _scan_tiles(node: ir.Pattern, t: _Tiles, count: bool):
    """Evaluate ``node`` over every element of the tiles, as cheaply as its
    dependence allows. Returns ``(any, all)`` bool arrays, or with ``count``
    the number of allowed elements per tile.

    Tiles that translation maps onto each other (``_period``) are evaluated
    once: strided or fixed patterns then cost a few tiles per diagonal.
    """
    ctx = t.ctx
    P = _period(node, ctx.B)
    if P is None or P >= ctx.nb or t.size < 2:
        return _scan_each(node, t, count)
    whole = (t.rows == ctx.B) & (t.cols == ctx.B)  # not cut by the end of the sequence
    key = np.where(whole, (t.i - t.j + ctx.nb) * P + t.i % P, -1 - np.arange(t.size))
    order = np.argsort(key, kind="stable")
    first = np.ones(t.size, dtype=bool)
    np.not_equal(key[order][1:], key[order][:-1], out=first[1:])
    group = np.cumsum(first) - 1  # the group of each tile in sorted order
    reps = order[first]
    inverse = np.empty(t.size, dtype=np.int64)
    inverse[order] = group
    if reps.size == t.size:
        return _scan_each(node, t, count)
    got = _scan_each(node, t.take(reps), count)
    return got[inverse] if count else (got[0][inverse], got[1][inverse])


def _scan_each(node: ir.Pattern, t: _Tiles, count: bool):
    """``_scan_tiles`` tile by tile.

    Positions past a tile's clipped bounds are clamped onto its last valid
    row or key (duplicates change neither ``any`` nor ``all``); counts use
    explicit weights instead.
    """
    ctx = t.ctx
    B, n = ctx.B, ctx.n
    mode = depends_on(node)
    side = min(B, n)
    if mode == "d":
        width = 2 * side - 1
    elif mode == "k":
        width = side
    else:
        width = side * side
    ctx.charge(t.size * width)
    results = []
    step = max(1, _EVAL_CHUNK // width)
    if mode == "qk":
        for lo in range(0, t.size, step):
            results.append(_scan_elements(node, t.take(slice(lo, lo + step)), count))
    else:
        offsets = np.arange(width, dtype=np.int64)
        for lo in range(0, t.size, step):
            s = t.take(slice(lo, lo + step))
            if mode == "d":
                x = s.dlo[:, None] + offsets
                valid = x <= s.dhi[:, None]
                m = evaluate(node, np.minimum(x, s.dhi[:, None]), np.int64(0), n)
                # elements of the tile on diagonal x: q in [qlo, qhi] and q - x in [klo, khi]
                weight = np.minimum(s.qhi[:, None], s.khi[:, None] + x) - np.maximum(s.qlo[:, None], s.klo[:, None] + x) + 1
            else:
                x = s.klo[:, None] + offsets
                valid = x <= s.khi[:, None]
                m = evaluate(node, np.int64(0), np.minimum(x, s.khi[:, None]), n)
                weight = s.rows[:, None]
            if count:
                results.append(np.sum(np.where(m & valid, weight, 0), axis=1))
            else:
                results.append((m.any(axis=1), m.all(axis=1)))
    if count:
        return np.concatenate(results) if results else np.zeros(0, dtype=np.int64)
    if not results:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    return np.concatenate([a for a, _ in results]), np.concatenate([b for _, b in results])


def _scan_elements(node: ir.Pattern, t: _Tiles, count: bool):
    """``_scan_tiles`` over the full ``[rows, keys]`` grid of every tile, a slab
    of rows at a time when one tile is larger than ``_EVAL_CHUNK``."""
    ctx = t.ctx
    side = min(ctx.B, ctx.n)
    offsets = np.arange(side, dtype=np.int64)
    k = np.minimum(t.klo[:, None] + offsets, t.khi[:, None])[:, None, :]  # [T, 1, side]
    kvalid = (t.klo[:, None] + offsets <= t.khi[:, None])[:, None, :]
    slab = max(1, _EVAL_CHUNK // (side * max(1, t.size)))
    anything = np.zeros(t.size, dtype=bool)
    everything = np.ones(t.size, dtype=bool)
    total = np.zeros(t.size, dtype=np.int64)
    for r0 in range(0, side, slab):
        rows = offsets[r0 : r0 + slab]
        q = t.qlo[:, None] + rows
        qvalid = (q <= t.qhi[:, None])[:, :, None]
        q = np.minimum(q, t.qhi[:, None])[:, :, None]  # [T, slab, 1]
        m = _evaluate(node, q, k, ctx)
        if count:
            total += np.sum(m & qvalid & kvalid, axis=(1, 2))
        else:
            anything |= m.any(axis=(1, 2))
            everything &= m.all(axis=(1, 2))
    return total if count else (anything, everything)


def _evaluate(node: ir.Pattern, q: np.ndarray, k: np.ndarray, ctx: _Ctx) -> np.ndarray:
    """``masks.evaluate``, but ``random`` looks up its drawn cells sparsely
    (masks.py builds a dense table of them, too big for long sequences)."""
    return evaluate(node, q, k, ctx.n, random=lambda r, qq, kk: ctx.random(r).allowed(qq, kk))
