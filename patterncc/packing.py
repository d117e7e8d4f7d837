"""Packed batches: several sequences laid end to end, each under the pattern alone.

A packed batch is ``total`` tokens cut by ``offsets`` (int64 ``[S + 1]``,
``0 = offsets[0] <= ... <= offsets[S] = total``) into sequences; sequence
``s`` holds tokens ``offsets[s] .. offsets[s + 1] - 1`` and the pattern
applies to it alone, with ``q``, ``k`` and ``n`` relative to it.

The kernels walk a *slot space* in which every sequence starts on a
multiple of ``align`` (a multiple of the layout block and of every kernel
tile and step), so no block, tile or step ever holds two sequences and the
predicate needs no same-sequence test: sequence ``s`` occupies slots
``first[s] .. first[s] + slots[s] - 1`` (its slots in the component's token
order at its own length: ``n_s`` in natural order), and the slots after
them up to the next multiple of ``align`` are empty. The packed layout is
then the block-diagonal concatenation of the sequences' own layouts, built
from them without touching ``total**2`` or ``(total / block)**2`` cells
(``packed_layout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ir
from .blocklayout.format import BlockLayout
from .orders import Residue
from .primitives.base import run_offsets, run_ranges


@dataclass(frozen=True, eq=False)
class PackedSlots:
    """Where the sequences of a packed batch lie in one component's slot space.

    - ``offsets`` int64 ``[S + 1]``: the sequences' token offsets;
    - ``slots`` int64 ``[S]``: each sequence's slot count (the kernels' ``N``);
    - ``classes`` int64 ``[S]``: each sequence's residue class size
      (``ceil(n_s / l)``, the kernels' ``ORD_S``; 1 in natural order);
    - ``first`` int64 ``[S]``: each sequence's first slot, a multiple of ``align``;
    - ``total`` (int): the slot space's size, a multiple of ``align``.
    """

    offsets: np.ndarray
    slots: np.ndarray
    classes: np.ndarray
    first: np.ndarray
    align: int
    total: int

    @staticmethod
    def of(offsets: np.ndarray, slots: np.ndarray, classes: np.ndarray, align: int) -> "PackedSlots":
        span = -(-slots // align) * align  # an empty sequence takes no slots
        first = np.zeros(slots.size, dtype=np.int64)
        np.cumsum(span[:-1], out=first[1:])
        return PackedSlots(offsets, slots, classes, first, align, int(span.sum()))

    def chunk_sequences(self) -> np.ndarray:
        """int64 ``[total // align]``: the sequence each run of ``align`` slots belongs to."""
        return np.repeat(np.arange(self.slots.size), -(-self.slots // self.align))

    def table(self) -> np.ndarray:
        """int32 ``[total // align, 5]``, the kernels' SEQS: per run of
        ``align`` slots, its sequence's first slot, slot count, token count,
        residue class size and first token."""
        s = self.chunk_sequences()
        n = np.diff(self.offsets)
        return np.stack([self.first[s], self.slots[s], n[s], self.classes[s], self.offsets[:-1][s]],
                        axis=1).astype(np.int32)

    def first_slots(self) -> np.ndarray:
        """int64 ``[total // align]``: the first slot of each run's sequence."""
        return self.first[self.chunk_sequences()]


def residue_padding(lengths: np.ndarray, order: Residue, block: int) -> np.ndarray:
    """bool ``[sum of the sequences' blocks]``, sequence after sequence:
    the blocks of each sequence's residue order (``l`` classes of ``S =
    ceil(n / l)`` slots) that hold a padding slot, the last slot of each
    class that has ``S - 1`` tokens (classes ``r >= n - l * (S - 1)``)."""
    l, S, slots = order.l, order.classes(lengths), order.length(lengths)
    nb = -(-slots // block)
    start = np.concatenate([[0], np.cumsum(nb)])
    count = np.maximum(slots - lengths, 0)  # classes with a padding slot: the last l * S - n
    seq = np.repeat(np.arange(lengths.size), count)
    r = l - count[seq] + run_offsets(count)
    out = np.zeros(int(start[-1]), dtype=bool)
    out[start[seq] + (r * S[seq] + S[seq] - 1) // block] = True
    return out


def packed_layout(pattern: ir.Pattern, sources: list[BlockLayout], source_of: np.ndarray,
                  packing: PackedSlots, unfull: np.ndarray | None = None) -> BlockLayout:
    """The layout of a packed batch over ``packing.total`` slots: sequence
    ``s`` gets the top-left ``ceil(slots[s] / block)`` blocks a side of
    ``sources[source_of[s]]`` (its own layout at its length, or a longer
    one whose mask crops to it: a pattern whose mask does not depend on
    ``n``), moved to its first slot block. Blocks that hold a sequence's
    last slots without filling them are PARTIAL, so that FULL means every
    pair allowed and inside its sequence in both orientations: the
    kernels walk FULL steps without a bounds mask, and the slots after a
    sequence are the next one's tokens. ``unfull`` (bool ``[sum of the
    sequences' blocks]``, sequence after sequence, optional): more blocks
    that are never FULL as a row or a column (``residue_padding``: a
    source built without the tests that keep padding slots out). Cost:
    the entries written, plus a binary search per block row."""
    block = sources[0].block
    heads = sources[0].heads
    assert all(src.block == block and src.heads == heads for src in sources)
    assert packing.align % block == 0
    nb = -(-packing.slots // block)  # blocks a side per sequence
    tail = packing.slots % block != 0
    n_blocks = packing.total // block
    if unfull is None:
        unfull = np.zeros(int(nb.sum()), dtype=bool)
    kv = _concat([(s.kv_ptr, s.kv_idx, s.kv_full) for s in sources], source_of, nb, tail, unfull,
                 packing.first // block, n_blocks, heads)
    q = _concat([(s.q_ptr, s.q_idx, s.q_full) for s in sources], source_of, nb, tail, unfull,
                packing.first // block, n_blocks, heads)
    return BlockLayout(pattern, packing.total, block, heads, *kv, *q)


def _concat(orientations, source_of, nb, tail, unfull, first_block, n_blocks: int, heads: int):
    """One CSR orientation (``ptr`` ``[H, n_blocks + 1]``, ``idx``, ``full``)
    of the packed layout from the sources' (see ``packed_layout``)."""
    # The sources' entries as one pool: row x of the pool is the run
    # pool_ptr[x] .. pool_ptr[x + 1] (one source's rows after another, heads
    # in order), and its key pool_row * width + idx ascends, so the entries
    # of a row below a block are found by one binary search.
    width = max(int(ptr.shape[1]) for ptr, _, _ in orientations) + 1
    base, row_base, pool_ptr, pool_idx, pool_full = 0, [], [], [], []
    for ptr, idx, full in orientations:
        row_base.append(sum(p.size for p in pool_ptr))
        pool_ptr.append(ptr.astype(np.int64).ravel() + base)
        pool_idx.append(idx)
        pool_full.append(full)
        base += idx.size
    pool_ptr = np.concatenate(pool_ptr)
    pool_idx = np.concatenate(pool_idx).astype(np.int64)
    pool_full = np.concatenate(pool_full)
    entry_row = np.repeat(np.arange(pool_ptr.size - 1), np.diff(pool_ptr))
    keys = entry_row * width + pool_idx
    rows_of = np.array([ptr.shape[1] for ptr, _, _ in orientations], dtype=np.int64)  # rows + 1 per head

    seq = np.repeat(np.arange(nb.size), nb)  # one per (sequence, block row), the order of `unfull`
    i = run_offsets(nb)
    row_start = np.cumsum(nb) - nb  # each sequence's first row there
    src = source_of[seq]
    out_ptr, out_idx, out_full, total = [], [], [], 0
    for h in range(heads):
        x = np.asarray(row_base, dtype=np.int64)[src] + h * rows_of[src] + i  # the pool row
        start = pool_ptr[x]
        count = np.searchsorted(keys, x * width + nb[seq]) - start  # entries below block nb[s]
        take = run_ranges(start, count)
        j = pool_idx[take]
        row_seq = np.repeat(seq, count)
        full = pool_full[take].copy()
        cut = tail[row_seq]
        last = nb[row_seq] - 1
        full &= ~(cut & ((np.repeat(i, count) == last) | (j == last)))
        full &= ~(np.repeat(unfull, count) | unfull[row_start[row_seq] + j])
        counts = np.zeros(n_blocks, dtype=np.int64)
        counts[first_block[seq] + i] = count
        ptr = np.empty(n_blocks + 1, dtype=np.int64)
        ptr[0] = total
        np.cumsum(counts, out=ptr[1:])
        ptr[1:] += total
        total = int(ptr[-1])
        out_ptr.append(ptr)
        out_idx.append(j + first_block[row_seq])
        out_full.append(full)
    return (np.stack(out_ptr).astype(np.int32), np.concatenate(out_idx).astype(np.int32),
            np.concatenate(out_full).astype(bool))
