"""Per-head masks for the two paths: dense bool arrays for short sequences,
boolean CSR arrays (only the allowed pairs) for long ones.

Both return one mask per layout head: ``H = heads`` when the pattern depends
on the head, else 1 (query head ``h`` then uses mask ``h`` or ``0``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from patterncc import ir
from patterncc.mask import dense_mask, evaluate

try:
    from patterncc.layout import sparse_mask as _layout_sparse_mask
except ImportError:  # not landed yet: build the CSR here
    _layout_sparse_mask = None

# Elements of one row block evaluated at a time by the fallback CSR builder
# (a few int64 temporaries of this size live at once).
_ROW_BLOCK_ELEMENTS = 2**22


def layout_heads(p: ir.Pattern, heads: int) -> int:
    return heads if ir.depends_on_head(p) else 1


def dense_masks(p: ir.Pattern, seq_len: int, heads: int) -> list[np.ndarray]:
    """bool ``(n, n)`` per layout head."""
    ir.check_heads(p, heads)
    return list(dense_mask(p, seq_len, layout_heads(p, heads)))


def sparse_masks(p: ir.Pattern, seq_len: int, heads: int) -> list[sp.csr_array]:
    """bool CSR ``(n, n)`` per layout head, sorted indices, no explicit zeros."""
    ir.check_heads(p, heads)
    build = _layout_sparse_mask or _sparse_mask_by_rows
    out = []
    for m in build(p, seq_len, heads):
        m = sp.csr_array(m, dtype=bool)
        m.eliminate_zeros()
        m.sort_indices()
        out.append(m)
    return out


def _sparse_mask_by_rows(p: ir.Pattern, seq_len: int, heads: int) -> list[sp.csr_array]:
    """Stand-in for ``layout.sparse_mask`` until it lands: evaluates every
    element (``n * n`` time) but only a block of rows at a time, so memory
    stays at the size of the result."""
    n = seq_len
    bound = ir.bind(p, n)
    built: dict[ir.Pattern, sp.csr_array] = {}
    out = []
    for h in range(layout_heads(p, heads)):
        ph = ir.for_head(bound, h)
        if ph not in built:
            built[ph] = _csr_by_rows(ph, n)
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
