"""The layout stage: which (query block, key block) pairs a pattern touches.

``build`` is analytic: its cost grows with the number of non-empty block
pairs, never with ``n * n``. For one head-free pattern it works a band of
query-block rows at a time, in two steps:

1. **Candidates** (``_candidates``). Every node names a superset of its
   non-empty pairs, as sorted int64 keys ``i * nb + j``. Band-like primitives
   generate only what they touch (``local`` a diagonal band, ``global`` its
   rows and columns, ``stride(l)`` its diagonals when ``l`` is large,
   ``random`` its drawn blocks); a union is the union of its parts; an
   intersection expands only its sparsest part (by ``_estimate``, an upper
   bound on candidates), inside the window per row that its other parts
   allow (``_hull``: ``causal`` keeps key blocks ``0 .. i``); ``A - B`` is
   ``A``'s; ``where`` refines a quadtree of block rectangles, dropping those
   where interval arithmetic proves the condition false; a complement is
   every pair.
2. **Classes** (``_classify``). Every node classifies arbitrary pairs in
   closed form: the tile of pair ``(i, j)`` holds rows ``q in [qlo, qhi]``
   and keys ``k in [klo, khi]`` clipped to ``seq_len``, so ``d = q - k``
   takes every integer in ``[qlo - khi, qhi - klo]``, and each primitive's
   rule gives EMPTY / PARTIAL / FULL from those bounds. Combinators combine
   their parts' classes; where that cannot decide (two PARTIAL parts of a
   union, say) the node is evaluated exactly over just those tiles
   (``evaluation``). ``where`` goes through interval arithmetic first and is
   evaluated only where that cannot decide (``rules``).

So every class is exact (never PARTIAL when the tile is really EMPTY or
FULL), not just sound. The size guards of ``limits`` refuse clearly, with
``LimitError``, before the work they bound.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import ir
from ..errors import LimitError, PatternValueError
from ..primitives.base import EMPTY, FULL, PARTIAL
from . import limits
from .evaluation import _resolve
from .format import BlockLayout, _from_pairs
from .rules import _CLASS, _ROWS, _estimate_where
from .tiles import _Budget, _Ctx, _Rects, _Tiles, _unique

# Query-block rows are processed in bands of about this many candidates.
_BAND_PAIRS = 2**21


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------


def build(p: ir.Pattern, seq_len: int, block: int, heads: int = 1) -> BlockLayout:
    """The BlockLayout of pattern ``p`` (symbolic arguments allowed) at
    ``seq_len`` tokens, in blocks of ``block``, for ``heads`` heads."""
    bound, H = _prepare(p, seq_len, block, heads)
    seq_len, block = int(seq_len), int(block)
    nb = -(-seq_len // block)
    heads_of, ctxs = _head_contexts(bound, H, seq_len, block)
    built = {ph: _head_pairs(ph, ctx) for ph, ctx in ctxs.items()}
    return _from_pairs(bound, seq_len, block, [built[ph] for ph in heads_of], nb)


def estimate_blocks(p: ir.Pattern, seq_len: int, block: int, heads: int = 1) -> int:
    """An upper bound on ``build(...).nnz`` without building: cheap (no block
    pairs are generated), used by the planner to skip dense natural layouts."""
    bound, H = _prepare(p, seq_len, block, heads)
    seen: dict[ir.Pattern, int] = {}
    total = 0
    for h in range(H):
        ph = ir.for_head(bound, h)
        if ph not in seen:
            seen[ph] = _estimate(ph, _Ctx(int(seq_len), int(block)))
        total += seen[ph]
    return total


def row_pairs(p: ir.Pattern, seq_len: int, block: int, heads: int, first: int, last: int) -> list:
    """The non-empty pairs of query-block rows ``first .. last`` only, per
    layout head (``H`` as in ``BlockLayout``): ``(i, j, full)`` sorted by
    ``(i, j)``, as ``build`` would give them for those rows. Decoding reads
    the last rows of a long sequence: their cost is that of the rows, not of
    the layout."""
    bound, H = _prepare(p, seq_len, block, heads)
    ctx_n, block = int(seq_len), int(block)
    built: dict[ir.Pattern, tuple] = {}
    out = []
    for h in range(H):
        ph = ir.for_head(bound, h)
        if ph not in built:
            ctx = _Ctx(ctx_n, block)
            rows = np.arange(max(0, first), min(ctx.nb - 1, last) + 1, dtype=np.int64)
            cand = _candidates(ph, rows, (np.zeros_like(rows), np.full_like(rows, ctx.nb - 1)), ctx, top=True)
            t = _Tiles(cand // ctx.nb, cand % ctx.nb, ctx)
            keep = _classify(ph, t, ctx) if t.size else np.zeros(0, dtype=np.int8)
            built[ph] = (t.i[keep != EMPTY], t.j[keep != EMPTY], keep[keep != EMPTY] == FULL)
        out.append(built[ph])
    return out


def classify_rectangles(p: ir.Pattern, n: int, qlo, qhi, klo, khi) -> np.ndarray:
    """int8 classes of a bound, head-free pattern over token rectangles
    ``[qlo, qhi] x [klo, khi]`` (int64 arrays, inside ``[0, n)``): sound, not
    always exact — whatever closed forms cannot decide is PARTIAL. The
    planner uses it for gathered columns, whose slot blocks map to rectangles."""
    if any(isinstance(node, ir.Primitive) and node.TABLE for node in ir.walk(p)):
        raise ValueError("classify_rectangles cannot look up random() tables over rectangles")
    rects = _Rects(*(np.asarray(a, dtype=np.int64) for a in (qlo, qhi, klo, khi)), _Ctx(n, 1))
    return _classify(p, rects, rects.ctx)


# ----------------------------------------------------------------------------
# One call: sizes, heads, bands of rows
# ----------------------------------------------------------------------------


def _head_contexts(bound: ir.Pattern, H: int, n: int, B: int):
    """``(pattern of each head, {distinct head pattern: its _Ctx})``, all
    contexts sharing one ``_Budget``: every distinct head's candidates are
    estimated and charged before any is generated, so a call over many heads
    is refused before it starts, not after hours."""
    budget = _Budget(n, B)
    heads_of = [ir.for_head(bound, h) for h in range(H)]
    ctxs: dict[ir.Pattern, _Ctx] = {}
    for ph in heads_of:
        if ph not in ctxs:
            ctx = ctxs[ph] = _Ctx(n, B, budget)
            budget.reserve(_estimate(ph, ctx), len(ctxs))
    return heads_of, ctxs


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatternValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise PatternValueError(f"{name}={value} must be >= 1")
    if value > ir.MAX_VALUE:
        raise LimitError(f"{name}={value} is larger than the limit {ir.MAX_VALUE}")


def _prepare(p: ir.Pattern, seq_len: int, block: int, heads: int) -> tuple[ir.Pattern, int]:
    """Check the sizes, the heads and the arguments; bind ``n``."""
    p = ir.split_terms(p)[0]  # score terms never change which pairs attend
    _check_int("seq_len", seq_len)
    _check_int("block", block)
    _check_int("heads", heads)
    nb = -(-int(seq_len) // int(block))
    if nb > limits.MAX_BLOCKS:
        raise LimitError(
            f"seq_len={seq_len} in blocks of block={block} gives {nb} blocks a side, over the limit of {limits.MAX_BLOCKS}",
            hint="use a larger block",
        )
    ir.check_heads(p, heads)
    bound = ir.bind(p, int(seq_len))
    return bound, (int(heads) if ir.depends_on_head(p) else 1)


def _head_pairs(p: ir.Pattern, ctx: "_Ctx") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty pairs of one head-free pattern (its candidates already
    charged to ``ctx.budget``): int32 ``i``, ``j`` sorted by ``(i, j)`` and
    bool ``full``."""
    nb = ctx.nb
    est = _estimate(p, ctx)
    band = max(1, int(nb * _BAND_PAIRS // max(est, 1)))
    out_i, out_j, out_full = [], [], []
    for r0 in range(0, nb, band):
        rows = np.arange(r0, min(nb, r0 + band), dtype=np.int64)
        cand = _candidates(p, rows, (np.zeros_like(rows), np.full_like(rows, nb - 1)), ctx, top=True)
        t = _Tiles(cand // nb, cand % nb, ctx)
        cls = _classify(p, t, ctx)
        keep = cls != EMPTY
        out_i.append(t.i[keep].astype(np.int32))
        out_j.append(t.j[keep].astype(np.int32))
        out_full.append(cls[keep] == FULL)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_full)


# ----------------------------------------------------------------------------
# Estimates: an upper bound on the number of candidate pairs a node generates
# ----------------------------------------------------------------------------


def _estimate(node: ir.Pattern, ctx: _Ctx) -> int:
    cached = ctx._estimates.get(id(node))
    if cached is None:
        cached = ctx._estimates[id(node)] = min(_estimate_node(node, ctx), ctx.nb * ctx.nb)
    return cached


def _estimate_node(node: ir.Pattern, ctx: _Ctx) -> int:
    nb = ctx.nb
    match node:
        case ir.Primitive():
            return node.estimate(ctx)
        case ir.Where():
            return _estimate_where(node, ctx)
        case ir.Union(parts=parts):
            return sum(_estimate(c, ctx) for c in parts)
        case ir.Intersect(parts=parts):
            return min(_estimate(c, ctx) for c in parts)
        case ir.Difference(left=a):
            return _estimate(a, ctx)
    return nb * nb  # complement


# ----------------------------------------------------------------------------
# Candidates: a superset of the non-empty pairs of rows [r0, r1)
# ----------------------------------------------------------------------------


def _candidates(node: ir.Pattern, rows: np.ndarray, win, ctx: _Ctx, top: bool = False) -> np.ndarray:
    """Sorted unique int64 keys ``i * nb + j``: a superset of the node's
    non-empty pairs in query-block rows ``rows`` (consecutive) whose key block
    lies in the window ``win = (lo, hi)`` (int64 per row).

    ``top`` says the caller classifies every candidate exactly afterwards, so
    an intersection need not filter its sparsest part by the others.
    """
    match node:
        case ir.Union(parts=parts):
            return _unique(np.concatenate([_candidates(c, rows, win, ctx) for c in parts]))
        case ir.Intersect(parts=parts):
            best = min(parts, key=lambda c: _estimate(c, ctx))
            lo, hi = win
            for c in parts:  # the other parts narrow the window where they can
                h = _hull(c, ctx, rows) if c is not best else None
                if h is not None:
                    lo, hi = np.maximum(lo, h[0]), np.minimum(hi, h[1])
            keys = _candidates(best, rows, (lo, hi), ctx, top)
            if not top:
                t = _Tiles(keys // ctx.nb, keys % ctx.nb, ctx)
                keep = np.ones(keys.size, dtype=bool)
                for c in parts:
                    if c is not best:
                        keep &= _classify(c, t, ctx) != EMPTY
                keys = keys[keep]
            return keys
        case ir.Difference(left=a):
            return _candidates(a, rows, win, ctx, top)
    rule = _ROWS.get(type(node))
    intervals = rule(node, ctx, rows, win) if rule else None
    if intervals is None:  # every key block
        intervals = rows, win[0], win[1]
    r, jlo, jhi = intervals
    at = r - rows[0]
    keys = _expand(r, np.maximum(jlo, win[0][at]), np.minimum(jhi, win[1][at]), ctx.nb)
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
        keys = _unique(keys)
    return keys


def _hull(node: ir.Pattern, ctx: _Ctx, rows: np.ndarray):
    """``(lo, hi)`` key blocks per row outside which the node is empty, or
    None when it has no such cheap bound."""
    match node:
        case ir.Intersect(parts=parts) | ir.Union(parts=parts):
            hulls = [_hull(c, ctx, rows) for c in parts]
            known = [h for h in hulls if h is not None]
            if isinstance(node, ir.Intersect) and known:
                return functools.reduce(np.maximum, [h[0] for h in known]), functools.reduce(np.minimum, [h[1] for h in known])
            if isinstance(node, ir.Union) and len(known) == len(hulls):
                return functools.reduce(np.minimum, [h[0] for h in known]), functools.reduce(np.maximum, [h[1] for h in known])
            return None
        case ir.Primitive() if node.HULL:
            full = (np.zeros_like(rows), np.full_like(rows, ctx.nb - 1))
            r, lo, hi = node.rows(ctx, rows, full)  # one interval per row
            return np.broadcast_to(lo, rows.shape), np.broadcast_to(hi, rows.shape)
    return None


def _expand(rows: np.ndarray, jlo: np.ndarray, jhi: np.ndarray, nb: int) -> np.ndarray:
    """Keys ``i * nb + j`` for every ``j`` in ``[jlo, jhi]`` (clipped) of each row."""
    jlo = np.maximum(jlo, 0)
    jhi = np.minimum(jhi, nb - 1)
    keep = jlo <= jhi
    if not keep.all():
        rows, jlo, jhi = rows[keep], jlo[keep], jhi[keep]
    length = jhi - jlo + 1
    shift = np.cumsum(length) - length - (rows * nb + jlo)  # output offset minus first key
    return np.arange(int(length.sum()), dtype=np.int64) - np.repeat(shift, length)


# ----------------------------------------------------------------------------
# Classes of arbitrary tiles, exact
# ----------------------------------------------------------------------------


def _classify(node: ir.Pattern, t: _Tiles, ctx: _Ctx) -> np.ndarray:
    """int8 ``[t.size]``: the exact class of every tile."""
    match node:
        case ir.Union(parts=parts):
            full = np.zeros(t.size, dtype=bool)
            partials = np.zeros(t.size, dtype=np.int32)
            for c in parts:
                cls = _classify(c, t, ctx)
                full |= cls == FULL
                partials += cls == PARTIAL
            out = np.where(full, FULL, np.minimum(partials, 1)).astype(np.int8)
            unsure = ~full & (partials >= 2)  # PARTIAL or FULL
        case ir.Intersect(parts=parts):
            empty = np.zeros(t.size, dtype=bool)
            partials = np.zeros(t.size, dtype=np.int32)
            for c in parts:
                cls = _classify(c, t, ctx)
                empty |= cls == EMPTY
                partials += cls == PARTIAL
            out = np.where(empty, EMPTY, FULL - np.minimum(partials, 1)).astype(np.int8)
            unsure = ~empty & (partials >= 2)  # EMPTY or PARTIAL
        case ir.Difference(left=a, right=b):
            ca, cb = _classify(a, t, ctx), _classify(b, t, ctx)
            out = np.where((ca == EMPTY) | (cb == FULL), EMPTY,
                           np.where((ca == FULL) & (cb == EMPTY), FULL, PARTIAL)).astype(np.int8)
            unsure = (ca == PARTIAL) & (cb == PARTIAL)  # EMPTY or PARTIAL
        case ir.Complement(arg=a):
            return (FULL - _classify(a, t, ctx)).astype(np.int8)
        case _:
            rule = _CLASS.get(type(node))
            if rule is None:
                raise TypeError(f"layout needs a bound, head-free pattern; got {type(node).__name__}")
            return rule(node, t)
    if unsure.any():
        out[unsure] = _resolve(node, t.take(unsure))
    return out
