"""The layout of gathered columns, in closed form.

A component in ``columns(l, c)`` key order (``summary(l, c)``'s keys
gathered) would need its slot pattern evaluated element by element to be
classified; instead each (query block, slot block) pair is classified as a
token rectangle of the piece with ``summary`` read as ``all``, and the
result written into CSR with the layout format's helpers, or, for the
common causal case, straight from each row's length (``_prefix_csr``).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import ir
from ..blocklayout import (EMPTY, FULL, PARTIAL, BlockLayout, HeadCSR, check_entries, classify_rectangles,
                           head_csr, run_offsets, run_ranges)
from ..blocklayout import from_heads as layouts_from_heads
from ..orders import Columns

_COLUMN_RUN = 32  # slot blocks classified together before block by block (columns_layout)


def columns_layout(piece: ir.Pattern, slot_pattern: ir.Pattern, order: Columns, n: int, block: int,
                   H: int) -> BlockLayout:
    """The layout of gathered columns, sound but not always exact, in closed
    form: slot block ``j`` holds the summary keys between positions
    ``K(j * block)`` and ``K((j + 1) * block - 1)``, and on those keys the
    piece is the piece with ``summary(l, c)`` read as ``all``. So each (query
    block, slot block) is that pattern's class over a token rectangle
    (``classify_rectangles``): FULL or EMPTY there is FULL or EMPTY on the
    keys, anything undecided PARTIAL (the kernels apply the predicate). No
    element is evaluated, so a million tokens cost seconds, not a refusal.

    At 1M tokens ``fixed(128, 32)`` has 8.4M entries, nearly all FULL, each
    query row a prefix of the slot blocks: ``_prefix_csr`` writes both
    orientations from the rows' lengths without listing the pairs first."""
    l, c, B = order.l, order.c, block
    keys = order.filled(n)
    nb, nu = -(-n // B), -(-keys // B)
    padded = keys % B != 0  # the last slot block runs past the last key: padding slots, never FULL
    plain = ir._map(piece, lambda node: ir.All() if isinstance(node, ir.Summary) and (node.l, node.c) == (l, c)
                    else node)
    rows = np.arange(nb, dtype=np.int64)
    qhi_rows = np.minimum((rows + 1) * B, n) - 1
    if ir.within_causal(plain):  # slots whose first key is past the row's last query are empty
        reach = order.count_before(qhi_rows + 1)  # summary keys <= qhi
        count = np.clip(-(-reach // B), 0, nu)
    else:
        count = np.full(nb, nu, dtype=np.int64)
    # Classify runs of G slot blocks first: a run FULL or EMPTY as a whole
    # is so block by block (a sound class of a rectangle holds on its parts),
    # and only the runs it cannot decide are classified block by block. At
    # 1M tokens that is ~1/G of the 8.4M rectangles of fixed(128, 32).
    G = _COLUMN_RUN
    runs = -(-count // G)
    run_row = np.repeat(rows, runs)
    j0 = run_offsets(runs) * G
    j1 = np.minimum(j0 + G, count[run_row])  # one past the run's last slot block

    def classify(ph, i, jlo, jhi):  # query row i against slot blocks jlo .. jhi - 1, as a token rectangle
        return classify_rectangles(ph, n, i * B, qhi_rows[i], order.positions(jlo * B, n),
                                   order.positions(np.minimum(jhi * B, keys) - 1, n))

    heads = []
    seen: dict = {}
    for h in range(H):
        ph = ir.for_head(plain, h)
        if ph not in seen:
            pieces = _column_pieces(functools.partial(classify, ph), run_row, j0, j1)
            csr = _prefix_csr(*pieces, nb, nu, padded)
            seen[ph] = csr if csr is not None else _pieces_csr(*pieces, nb, nu, padded)
        heads.append(seen[ph])
    return layouts_from_heads(slot_pattern, n, B, heads)


def _column_pieces(classify, run_row, j0, j1):
    """One head's non-empty slot blocks as pieces ``(row, start, length,
    cls)`` (int64 ``[P]``, ``cls`` int8) in (row, start) order, every block
    of a piece of class ``cls``: a run classified FULL whole, or one block of
    a run that could not be decided whole (so PARTIAL pieces are single blocks)."""
    run_cls = classify(run_row, j0, j1)
    undecided = run_cls == PARTIAL
    split = np.where(undecided, j1 - j0, 1)  # pieces per run
    run = np.repeat(np.arange(run_cls.size), split)
    start = j0[run] + run_offsets(split)
    length = np.where(undecided, 1, j1 - j0)[run]
    row, cls, single = run_row[run], run_cls[run], undecided[run]
    cls[single] = classify(row[single], start[single], start[single] + 1)
    keep = cls != EMPTY
    return row[keep], start[keep], length[keep], cls[keep]


def _prefix_csr(row, start, length, cls, nb: int, nu: int, padded: bool) -> HeadCSR | None:
    """Both orientations in closed form when every query row ``i`` holds the
    slot blocks ``0 .. m[i] - 1`` and ``m`` never decreases (a causal piece:
    later rows reach more summary keys); None otherwise.

    Then key block ``j`` is held by the rows ``first[j] .. nb - 1``, the
    rows whose ``m`` exceeds ``j``, so both index arrays are runs of
    consecutive numbers (``run_ranges``: no sort, no temporary as large as
    the layout), and both flag arrays are True but at the few PARTIAL
    blocks, which are written where each orientation puts them."""
    end = start + length
    row_begins = np.diff(row, prepend=-1) != 0
    # each piece starts where the one before it ends, or at 0 where a row begins
    if not np.array_equal(start, np.where(row_begins, 0, np.roll(end, 1))):
        return None
    m = np.zeros(nb, dtype=np.int64)  # slot blocks per query row
    row_ends = np.diff(row, append=nb) != 0
    m[row[row_ends]] = end[row_ends]
    if np.any(m[1:] < m[:-1]):
        return None
    nnz = int(m.sum())
    check_entries(nnz)  # before allocating what would not fit
    first = np.searchsorted(m, np.arange(nb), side="right")  # [nb]: the first row holding key block j
    kv_ptr, q_ptr = np.zeros(nb + 1, dtype=np.int64), np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(m, out=kv_ptr[1:])
    np.cumsum(nb - first, out=q_ptr[1:])
    kv_idx = run_ranges(0, m, np.int32)
    q_idx = run_ranges(first, nb - first, np.int32)
    kv_full, q_full = np.ones(nnz, dtype=bool), np.ones(nnz, dtype=bool)
    partial = cls == PARTIAL
    i = np.repeat(row[partial], length[partial])
    j = run_ranges(start[partial], length[partial])
    kv_full[kv_ptr[i] + j] = False
    q_full[q_ptr[j] + (i - first[j])] = False
    if padded:  # the last slot block, held by the rows that reach it
        kv_full[kv_ptr[1:][m == nu] - 1] = False
        q_full[q_ptr[nu - 1]:q_ptr[nu]] = False
    return HeadCSR(kv_ptr, kv_idx, kv_full, q_ptr, q_idx, q_full)


def _pieces_csr(row, start, length, cls, nb: int, nu: int, padded: bool) -> HeadCSR:
    """Both orientations for any pieces: list every (row, slot block) pair,
    then sort them by slot block (``head_csr``)."""
    i = np.repeat(row.astype(np.int32), length)
    j = run_ranges(start, length, np.int32)
    full = np.repeat(cls == FULL, length)
    if padded:
        full[j == nu - 1] = False
    return head_csr(i, j, full, nb)
