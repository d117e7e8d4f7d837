"""Per-head masks for the two paths: dense bool arrays for short sequences,
boolean CSR arrays (only the allowed pairs) for long ones.

Both return one mask per layout head: ``H = heads`` when the pattern depends
on the head, else 1 (query head ``h`` then uses mask ``h`` or ``0``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from patterncc import ir
from patterncc.masks import dense_mask, evaluate

from patterncc.blocklayout.elements import sparse_mask as _layout_sparse_mask

# Elements of one row block evaluated at a time by the fallback CSR builder
# (a few int64 temporaries of this size live at once).
_ROW_BLOCK_ELEMENTS = 2**22


def layout_heads(p: ir.Pattern, heads: int) -> int:
    return heads if ir.depends_on_head(p) else 1


def dense_masks(p: ir.Pattern, seq_len: int, heads: int) -> list[np.ndarray]:
    """bool ``(n, n)`` per layout head; heads with the same pattern share one array."""
    return _per_head(p, seq_len, heads, lambda ph, n: dense_mask(ph, n)[0])


def sparse_masks(p: ir.Pattern, seq_len: int, heads: int) -> list[sp.csr_array]:
    """bool CSR ``(n, n)`` per layout head, sorted indices, no explicit zeros;
    heads that share a mask share one array."""
    ir.check_heads(p, heads)
    build = _layout_sparse_mask
    seen: dict[int, sp.csr_array] = {}
    return [seen.setdefault(id(m), _canonical(m)) for m in build(p, seq_len, heads)]


def _canonical(m) -> sp.csr_array:
    m = sp.csr_array(m)
    if m.dtype == bool and m.has_sorted_indices and m.data.all():
        return m
    m = sp.csr_array(m, dtype=bool, copy=True)  # never edit the builder's (maybe cached) arrays
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _sparse_mask_by_rows(p: ir.Pattern, seq_len: int, heads: int) -> list[sp.csr_array]:
    """An independent CSR builder (the tests' oracle for the layout's
    ``sparse_mask``): evaluates every element (``n * n`` time) but only a
    block of rows at a time, so memory stays at the size of the result."""
    return _per_head(p, seq_len, heads, _csr_by_rows)


def _per_head(p: ir.Pattern, seq_len: int, heads: int, build_one) -> list:
    """``build_one(head_free_pattern, n)`` for each layout head, once per distinct pattern."""
    ir.check_heads(p, heads)
    bound = ir.bind(p, seq_len)
    built: dict[ir.Pattern, object] = {}
    out = []
    for h in range(layout_heads(p, heads)):
        ph = ir.for_head(bound, h)
        if ph not in built:
            built[ph] = build_one(ph, seq_len)
        out.append(built[ph])
    return out


def _csr_by_rows(p: ir.Pattern, n: int) -> sp.csr_array:
    pos = np.arange(n, dtype=np.int64)
    step = max(1, _ROW_BLOCK_ELEMENTS // n)
    counts = np.zeros(n, dtype=np.int64)
    cols = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        allowed = evaluate(p, pos[start:stop, None], pos[None, :], n)  # (rows, n)
        r, c = np.nonzero(allowed)
        counts[start:stop] = np.bincount(r, minlength=stop - start)
        cols.append(c.astype(np.int32 if n < 2**31 else np.int64))
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.concatenate(cols)
    return sp.csr_array((np.ones(indices.size, dtype=bool), indices, indptr), shape=(n, n))
