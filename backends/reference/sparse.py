"""Sparse float64 attention for one (batch, head): scores only for the allowed
pairs, which a boolean CSR matrix lists row by row.

Rows are processed in chunks of at most ``max_pairs(D)`` allowed pairs, so
memory stays bounded whatever the length. Within a chunk the pairs are
gathered (``q[rows]``, ``k[cols]``: ``(pairs, D)`` each), the softmax is a
segmented max / sum over the CSR row pointers (``np.maximum.reduceat``,
``np.add.reduceat``), and products with ``V``, ``K``, ``Q`` and ``dO`` are
scipy sparse-times-dense products.

Shapes, all float64: ``q``, ``o``, ``do`` ``(n_q, D)``; ``k``, ``v``
``(n_k, D)``; ``lse``, ``dlse`` ``(n_q,)``; ``mask`` a ``scipy.sparse`` CSR
array ``(n_q, n_k)`` whose stored entries are the allowed pairs, the
queries the last ``n_q`` positions. ``terms`` are the head's score terms
(``terms.py``), applied per pair.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import scipy.sparse as sp

from .terms import NO_TERMS, HeadTerms, score_grads, scores

# Bytes of gathered rows and per-pair scratch one chunk may use.
CHUNK_BYTES = 2**28
MAX_CHUNK_PAIRS = 2**24


def max_pairs(head_dim: int) -> int:
    """Allowed pairs per chunk: two gathered ``(pairs, D)`` float64 arrays plus
    about eight float64 / index values per pair fit in ``CHUNK_BYTES``."""
    per_pair = 8 * (2 * head_dim + 8)
    return max(1, min(MAX_CHUNK_PAIRS, CHUNK_BYTES // per_pair))


class Chunk(NamedTuple):
    """Query rows ``start:stop`` and their allowed pairs."""

    start: int
    stop: int
    rows: np.ndarray  # int64 (pairs,): global query index of each pair
    cols: np.ndarray  # (pairs,): key index of each pair
    indptr: np.ndarray  # int64 (stop - start + 1,): pairs of local row i are indptr[i]:indptr[i + 1]


def chunks(mask: sp.csr_array, limit: int) -> Iterator[Chunk]:
    """Consecutive row ranges with at most ``limit`` pairs each (a single row
    may exceed it); ranges without any pair are skipped."""
    indptr = mask.indptr.astype(np.int64)
    n = mask.shape[0]
    start = 0
    while start < n:
        # The last row r with indptr[r] <= indptr[start] + limit ends the chunk.
        stop = int(np.searchsorted(indptr, indptr[start] + limit, side="right")) - 1
        stop = min(n, max(stop, start + 1))
        lo, hi = indptr[start], indptr[stop]
        if hi > lo:
            local = indptr[start : stop + 1] - lo
            rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(local))
            yield Chunk(start, stop, rows, mask.indices[lo:hi], local)
        start = stop


def forward_head(mask, q, k, v, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(o, lse)``; a row with no allowed key gets ``o = 0`` and
    ``lse = -inf`` (``lse = sink`` with a sink)."""
    n, D = q.shape
    offset = k.shape[0] - n  # the queries are the last n positions
    o = np.zeros((n, v.shape[1]))
    lse = np.full(n, -np.inf if terms.sink is None else terms.sink)
    for c in chunks(mask, max_pairs(D)):
        s = scores(scale * _pair_dots(q, k, c), c.rows + offset - c.cols, terms)  # (pairs,)
        p, lse[c.start : c.stop] = _row_softmax(s, c, terms.sink)
        o[c.start : c.stop] = _matrix(p, c, k.shape[0]) @ v
    return o, lse


def backward_head(mask, q, k, v, o, lse, do, dlse, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(dq, dk, dv, d_slope, d_bias)``, the probabilities recomputed
    from ``lse``; ``d_slope`` and ``d_bias`` are None when the term is absent.

    ``dlse`` (or None) is the gradient reaching ``lse`` directly; it adds
    ``p * dlse`` to ``ds`` since ``d lse / d s = p``.
    """
    n, D = q.shape
    offset = k.shape[0] - n  # the queries are the last n positions
    delta = np.sum(do * o, axis=1)  # (n,)
    if dlse is not None:
        delta = delta - dlse
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    d_slope = None if terms.slope is None else 0.0
    d_bias = None if terms.bias is None else np.zeros_like(terms.bias)
    for c in chunks(mask, max_pairs(D)):
        rows = slice(c.start, c.stop)
        raw, diff = scale * _pair_dots(q, k, c), c.rows + offset - c.cols  # (pairs,) each
        # Every row of a pair has a key, so its lse is finite.
        p = np.exp(scores(raw, diff, terms) - lse[c.rows])  # (pairs,)
        ds = p * (_pair_dots(do, v, c) - delta[c.rows])  # (pairs,): d loss / d score
        ds, slope_part, bias_part = score_grads(ds, raw, diff, terms)
        if d_slope is not None:
            d_slope += slope_part
        if d_bias is not None:
            d_bias += bias_part
        ds_matrix = _matrix(ds, c, k.shape[0])  # (rows, n_k)
        dq[rows] = scale * (ds_matrix @ k)
        dk += scale * (ds_matrix.T @ q[rows])
        dv += _matrix(p, c, k.shape[0]).T @ do[rows]
    return dq, dk, dv, d_slope, d_bias


def _pair_dots(a, b, c: Chunk) -> np.ndarray:
    """``a[row] . b[col]`` for every pair of the chunk: float64 (pairs,)."""
    return np.einsum("pd,pd->p", a[c.rows], b[c.cols])


def _row_softmax(s, c: Chunk, sink: float | None):
    """Softmax of each row's scores, ``exp(sink)`` joining each denominator;
    returns ``(p (pairs,), lse (stop - start,))``."""
    counts = np.diff(c.indptr)
    has_key = counts > 0
    # reduceat over the starts of non-empty rows only: an empty row would make
    # reduceat return the next row's first element instead of an empty max.
    starts = c.indptr[:-1][has_key]
    m = np.maximum.reduceat(s, starts)
    if sink is not None:
        m = np.maximum(m, sink)
    e = np.exp(s - np.repeat(m, counts[has_key]))
    total = np.add.reduceat(e, starts)  # >= 1: the max contributes exp(0)
    if sink is not None:
        total = total + np.exp(sink - m)
    lse = np.full(c.stop - c.start, -np.inf if sink is None else sink)
    lse[has_key] = m + np.log(total)
    return e / np.repeat(total, counts[has_key]), lse


def _matrix(values, c: Chunk, n: int) -> sp.csr_array:
    """The chunk's pairs carrying ``values``, as a CSR array ``(stop - start, n)``."""
    return sp.csr_array((values, c.cols, c.indptr), shape=(c.stop - c.start, n))
