"""The block layout record and the helpers that build its CSR arrays.

A ``BlockLayout`` classes every (query block, key block) pair of every head
as EMPTY (no allowed element), PARTIAL or FULL (every element allowed, within
``seq_len``) and stores only the non-empty pairs, as CSR twice over; its
docstring gives each array's dtype, shape and meaning. Classes as numbers
(``to_dense``, ``from_dense_classes``) are int8: 0 ``EMPTY``, 1 ``PARTIAL``,
2 ``FULL`` (the constants of ``primitives.base``).

The helpers build the record from sorted pairs ``(i, j, full)``: per head
both ways (``head_csr``), heads one after another with int32 offsets
(``from_heads``), and the two together (``_from_pairs``). The planner uses
them for its reordered layouts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import ir
from ..errors import LimitError
from ..primitives.base import FULL, PARTIAL
from .evaluation import _count_tiles
from .tiles import _Budget, _Ctx, _Tiles


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The non-empty block pairs of a pattern at one length, in natural token order.

    ``H`` is ``heads`` when the pattern depends on the head and 1 otherwise;
    ``nq = n_qblocks = ceil(seq_len / block)``, ``nk = n_kblocks`` (the same).
    Stored as CSR twice over; pointers are global offsets into the index
    arrays, which hold every head's entries one head after another:

    - ``kv_ptr``  int32 ``[H, nq + 1]``: query block ``i`` of head ``h`` owns
      entries ``kv_ptr[h, i] : kv_ptr[h, i + 1]`` of
    - ``kv_idx``  int32 ``[nnz]``: key block indices, ascending within a row,
    - ``kv_full`` bool ``[nnz]``: True when the pair is FULL (every element
      allowed, within ``seq_len``), False when PARTIAL.
    - ``q_ptr``   int32 ``[H, nk + 1]``, ``q_idx`` int32 ``[nnz]``,
      ``q_full`` bool ``[nnz]``: the same pairs by key block (for dK/dV),
      query block indices ascending within a column.

    ``to_dense()`` gives the classes as int8 ``[H, nq, nk]``: 0 EMPTY,
    1 PARTIAL, 2 FULL. ``pattern`` is the bound pattern the layout was
    built from.
    """

    pattern: ir.Pattern
    seq_len: int
    block: int
    heads: int
    kv_ptr: np.ndarray
    kv_idx: np.ndarray
    kv_full: np.ndarray
    q_ptr: np.ndarray
    q_idx: np.ndarray
    q_full: np.ndarray

    @property
    def n_qblocks(self) -> int:
        return self.kv_ptr.shape[1] - 1

    @property
    def n_kblocks(self) -> int:
        return self.q_ptr.shape[1] - 1

    @property
    def nnz(self) -> int:
        return int(self.kv_idx.size)

    @property
    def n_full(self) -> int:
        return int(np.count_nonzero(self.kv_full))

    @property
    def n_partial(self) -> int:
        return self.nnz - self.n_full

    @property
    def density(self) -> float:
        """Non-empty block pairs over all block pairs."""
        return self.nnz / max(1, self.heads * self.n_qblocks * self.n_kblocks)

    @property
    def mean_walk(self) -> float:
        """Keys in the blocks of a query block row, on average over the rows
        that have any: how long a forward program's loop is."""
        rows = int(np.count_nonzero(np.diff(self.kv_ptr, axis=1)))
        return self.nnz * self.block / max(1, rows)

    def kv_rows(self) -> np.ndarray:
        """int64 ``[nnz]``: the flat row ``h * nq + i`` of every kv entry."""
        counts = np.diff(self.kv_ptr, axis=1).ravel()
        return np.repeat(np.arange(counts.size, dtype=np.int64), counts)

    def to_dense(self) -> np.ndarray:
        """int8 ``[H, nq, nk]``: 0 empty, 1 partial, 2 full."""
        out = np.zeros((self.heads * self.n_qblocks, self.n_kblocks), dtype=np.int8)
        out[self.kv_rows(), self.kv_idx] = np.where(self.kv_full, FULL, PARTIAL)
        return out.reshape(self.heads, self.n_qblocks, self.n_kblocks)

    def describe(self, max_width: int | None = 64) -> str:
        """A text picture: a header line, then per head (``head h:`` when
        ``H > 1``) one line per query-block row, ``.`` empty, ``+`` partial,
        ``#`` full.

        When there are more than ``max_width`` blocks a side, each character
        stands for a ``g x g`` square of blocks (said in the header): ``#``
        when all of them are full, ``.`` when all are empty, ``+`` otherwise.
        ``max_width=None`` draws every block. Cost is proportional to ``nnz``
        plus the picture's size.
        """
        nq, nk, H = self.n_qblocks, self.n_kblocks, self.heads
        g = 1 if max_width is None else max(1, -(-max(nq, nk) // max_width))
        header = (
            f"seq_len={self.seq_len} block={self.block} heads={H} blocks={nq}x{nk} "
            f"nnz={self.nnz} full={self.n_full} partial={self.n_partial} density={self.density:.4f}"
        )
        if g > 1:
            header += f" (1 char = {g}x{g} blocks)"
        R, C = -(-nq // g), -(-nk // g)
        rows = self.kv_rows()
        head, i = rows // nq, rows % nq
        cell = (head * R + i // g) * C + self.kv_idx // g
        nonempty = np.bincount(cell, minlength=H * R * C).reshape(H, R, C)
        full = np.bincount(cell, weights=self.kv_full, minlength=H * R * C).reshape(H, R, C)
        size = np.outer(np.minimum(g, nq - np.arange(R) * g), np.minimum(g, nk - np.arange(C) * g))
        code = np.where(nonempty == 0, 0, np.where(full == size, 2, 1))
        chars = np.array([".", "+", "#"])[code]
        lines = [header]
        for h in range(H):
            if H > 1:
                lines.append(f"head {h}:")
            lines.extend("".join(row) for row in chars[h])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def element_density(self) -> float:
        """Allowed ``(q, k)`` elements over ``H * n * n``: FULL blocks counted,
        PARTIAL ones counted by exact evaluation (over ``q - k`` or ``k`` alone
        where the pattern allows, so most patterns cost far less than their
        partial elements)."""
        n, B = self.seq_len, self.block
        total = 0
        rows = self.kv_rows()
        budget = _Budget(n, B)
        for h in range(self.heads):
            lo, hi = self.kv_ptr[h, 0], self.kv_ptr[h, -1]
            ctx = _Ctx(n, B, budget)
            t = _Tiles(rows[lo:hi] - h * self.n_qblocks, self.kv_idx[lo:hi].astype(np.int64), ctx)
            full = self.kv_full[lo:hi]
            total += int(np.sum(t.rows[full] * t.cols[full]))
            partial = t.take(~full)
            if partial.size:
                total += int(_count_tiles(ir.for_head(self.pattern, h), partial).sum())
        return total / (self.heads * n * n)


def from_dense_classes(pattern: ir.Pattern, seq_len: int, block: int, classes: np.ndarray) -> BlockLayout:
    """Build the CSR record from int8 ``[H, nq, nk]`` classes (tests, small n)."""
    H, nq, nk = classes.shape
    h, i, j = np.nonzero(classes)
    full = classes[h, i, j] == FULL
    return _from_pairs(pattern, seq_len, block, [(i[h == x], j[h == x], full[h == x]) for x in range(H)], nq)


class HeadCSR(NamedTuple):
    """One head's block pairs both ways, as in ``BlockLayout`` but with int64
    pointers ``[nb + 1]`` that start at 0 (``from_heads`` offsets them)."""

    kv_ptr: np.ndarray
    kv_idx: np.ndarray
    kv_full: np.ndarray
    q_ptr: np.ndarray
    q_idx: np.ndarray
    q_full: np.ndarray


def _from_pairs(pattern: ir.Pattern, seq_len: int, block: int, heads: list, nb: int) -> BlockLayout:
    """The CSR record from per-head ``(i, j, full)`` arrays sorted by ``(i, j)``."""
    check_entries(sum(len(i) for i, _, _ in heads))
    by_key: dict[int, HeadCSR] = {}  # heads sharing arrays share their transpose
    for i, j, full in heads:
        if id(i) not in by_key:
            by_key[id(i)] = head_csr(i, j, full, nb)
    return from_heads(pattern, seq_len, block, [by_key[id(i)] for i, _, _ in heads])


def check_entries(total: int) -> None:
    """Refuse layouts whose offsets would not fit the int32 pointers."""
    if total > ir.MAX_VALUE:
        raise LimitError(f"the layout has {total} non-empty blocks, more than int32 offsets can address; use a larger block")


def head_csr(i: np.ndarray, j: np.ndarray, full: np.ndarray, nb: int) -> HeadCSR:
    """One head's CSR both ways from its pairs ``(i, j, full)`` sorted by ``(i, j)``."""
    kv_ptr = np.zeros(nb + 1, dtype=np.int64)
    kv_ptr[1:] = np.cumsum(np.bincount(i, minlength=nb))
    q_ptr, q_idx, order = _transpose(i, j, kv_ptr, nb)
    return HeadCSR(kv_ptr, j, full, q_ptr, q_idx, full[order])


def from_heads(pattern: ir.Pattern, seq_len: int, block: int, heads: list[HeadCSR]) -> BlockLayout:
    """The BlockLayout of per-head CSRs: every head's entries one after
    another, pointers offset to match, int32 indices and pointers."""
    total = sum(len(h.kv_idx) for h in heads)
    check_entries(total)
    starts = np.cumsum([0] + [len(h.kv_idx) for h in heads[:-1]])

    def ptrs(field):  # int32 [H, nb + 1]
        return np.stack([getattr(h, field) + start for h, start in zip(heads, starts)]).astype(np.int32)

    def cat(field, dtype):
        arrays = [getattr(h, field) for h in heads]
        if len(arrays) == 1:  # one head (or heads sharing one layout): no copy
            return np.asarray(arrays[0]).astype(dtype, copy=False)
        return np.concatenate(arrays).astype(dtype, copy=False)

    return BlockLayout(
        pattern=pattern, seq_len=seq_len, block=block, heads=len(heads),
        kv_ptr=ptrs("kv_ptr"), kv_idx=cat("kv_idx", np.int32), kv_full=cat("kv_full", bool),
        q_ptr=ptrs("q_ptr"), q_idx=cat("q_idx", np.int32), q_full=cat("q_full", bool),
    )


def _transpose(i: np.ndarray, j: np.ndarray, kv_ptr: np.ndarray, nb: int):
    """The same pairs by key block: ``(q_ptr, q_idx, order)`` with query
    blocks ascending within each key block; ``order`` maps entries back."""
    if len(i) < 2**20:
        order = np.argsort(j, kind="stable")  # i ascends already
        q_ptr = np.zeros(nb + 1, dtype=np.int64)
        q_ptr[1:] = np.cumsum(np.bincount(j, minlength=nb))
        return q_ptr, i[order], order
    # Large: scipy's CSR -> CSC conversion is a linear-time counting sort.
    import scipy.sparse as sp

    entry = np.arange(len(i), dtype=np.int64 if len(i) > ir.MAX_VALUE else np.int32)
    csc = sp.csr_matrix((entry, j, kv_ptr), shape=(nb, nb)).tocsc()
    return csc.indptr, csc.indices, csc.data
