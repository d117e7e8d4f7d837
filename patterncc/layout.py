"""Block layouts: which (query block, key block) pairs a pattern touches.

PLACEHOLDER builder (brute force from the dense mask, small n only) until the
analytic builder lands; the BlockLayout record below is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ir
from .mask import dense_mask

EMPTY, PARTIAL, FULL = 0, 1, 2


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
      ``q_full`` bool ``[nnz]``: the same pairs by key block (for dK/dV).

    ``pattern`` is the bound pattern the layout was built from.
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
    def density(self) -> float:
        """Non-empty block pairs over all block pairs."""
        return self.nnz / max(1, self.heads * self.n_qblocks * self.n_kblocks)

    def to_dense(self) -> np.ndarray:
        """int8 ``[H, nq, nk]``: 0 empty, 1 partial, 2 full."""
        out = np.zeros((self.heads, self.n_qblocks, self.n_kblocks), dtype=np.int8)
        for h in range(self.heads):
            for i in range(self.n_qblocks):
                lo, hi = self.kv_ptr[h, i], self.kv_ptr[h, i + 1]
                out[h, i, self.kv_idx[lo:hi]] = np.where(self.kv_full[lo:hi], FULL, PARTIAL)
        return out


def from_dense_classes(pattern: ir.Pattern, seq_len: int, block: int, classes: np.ndarray) -> BlockLayout:
    """Build the CSR record from int8 ``[H, nq, nk]`` classes."""
    H, nq, nk = classes.shape
    h, i, j = np.nonzero(classes)
    full = classes[h, i, j] == FULL
    kv_counts = np.zeros((H, nq), dtype=np.int64)
    np.add.at(kv_counts, (h, i), 1)
    kv_flat = np.concatenate([[0], np.cumsum(kv_counts.ravel())])
    kv_ptr = np.concatenate([kv_flat[:-1].reshape(H, nq), kv_flat[nq::nq][:, None]], axis=1)
    order = np.lexsort((i, j, h))
    q_counts = np.zeros((H, nk), dtype=np.int64)
    np.add.at(q_counts, (h, j), 1)
    q_flat = np.concatenate([[0], np.cumsum(q_counts.ravel())])
    q_ptr = np.concatenate([q_flat[:-1].reshape(H, nk), q_flat[nk::nk][:, None]], axis=1)
    return BlockLayout(
        pattern=pattern, seq_len=seq_len, block=block, heads=H,
        kv_ptr=kv_ptr.astype(np.int32), kv_idx=j.astype(np.int32), kv_full=full,
        q_ptr=q_ptr.astype(np.int32), q_idx=i[order].astype(np.int32), q_full=full[order],
    )


def build(p: ir.Pattern, seq_len: int, block: int, heads: int = 1) -> BlockLayout:
    """PLACEHOLDER: brute force over the dense mask."""
    H = heads if ir.depends_on_head(p) else 1
    m = dense_mask(p, seq_len, heads)[:H]
    nb = -(-seq_len // block)
    pad = nb * block - seq_len
    valid = np.zeros((nb * block, nb * block), dtype=bool)
    valid[:seq_len, :seq_len] = True
    mp = np.zeros((H, nb * block, nb * block), dtype=bool)
    mp[:, :seq_len, :seq_len] = m
    tiles = mp.reshape(H, nb, block, nb, block)
    vt = valid.reshape(nb, block, nb, block)
    anyv = tiles.any(axis=(2, 4))
    allv = (tiles | ~vt[None]).all(axis=(2, 4))
    classes = np.where(anyv, np.where(allv, FULL, PARTIAL), EMPTY).astype(np.int8)
    return from_dense_classes(ir.bind(p, seq_len), seq_len, block, classes)
