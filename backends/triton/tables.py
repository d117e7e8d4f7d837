"""Host tables the kernels walk, derived from a BlockLayout (numpy, no torch).

The kernels do not read the layout's CSR entry by entry. Each CSR row (a query
block for the forward pass and dQ, a key block for dK/dV) is split into

- FULL runs: maximal runs of consecutive FULL blocks, walked with no predicate
  and no bounds mask, and
- PARTIAL runs: maximal runs of consecutive blocks that need the predicate and
  the bounds mask: the layout's PARTIAL blocks plus any FULL block on the
  ragged last block row or column (``seq_len % block != 0``), whose padding
  must be masked.

A run ``[lo, hi)`` of blocks becomes one software-pipelined inner loop over
positions ``lo * block .. hi * block``; causal attention is one FULL run and
one PARTIAL run per row.

``RunLists`` (all int32, pointers are global offsets):

- ``full_ptr`` ``[H * R + 1]``: row ``r`` of layout head ``h`` owns runs
  ``full_ptr[h * R + r] : full_ptr[h * R + r + 1]`` of
- ``full_runs`` ``[2 * n_full_runs]``: ``lo, hi`` block indices, one pair per run;
- ``part_ptr``, ``part_runs``: the same for PARTIAL runs;
- ``cost`` (int64 ``[H, R]``): blocks per row, for ordering the programs.

``tile_order`` turns a cost into the order programs take their tiles
(heaviest first, so the last wave of a launch is short).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RunLists:
    """FULL and PARTIAL runs of one CSR orientation (see the module docstring)."""

    rows: int
    full_ptr: np.ndarray
    full_runs: np.ndarray
    part_ptr: np.ndarray
    part_runs: np.ndarray
    cost: np.ndarray


def run_lists(ptr: np.ndarray, idx: np.ndarray, full: np.ndarray, seq_len: int, block: int) -> RunLists:
    """Split a CSR (``ptr`` ``[H, R + 1]`` global offsets, ``idx``, ``full``)
    into FULL and PARTIAL runs; columns are blocks of the other axis."""
    H, R = ptr.shape[0], ptr.shape[1] - 1
    counts = np.diff(ptr, axis=1).astype(np.int64)  # [H, R]
    row_of = np.repeat(np.arange(H * R), counts.ravel())  # flat h * R + r of every entry
    idx = np.asarray(idx, dtype=np.int64)
    fast = np.asarray(full, dtype=bool).copy()
    if seq_len % block:
        last = R - 1  # square layout: the last row and the last column are both ragged
        fast &= (row_of % R != last) & (idx != last)
    full_ptr, full_runs = _runs(row_of[fast], idx[fast], H * R)
    part_ptr, part_runs = _runs(row_of[~fast], idx[~fast], H * R)
    return RunLists(R, full_ptr, full_runs, part_ptr, part_runs, counts)


def _runs(rows: np.ndarray, idx: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive ``idx`` within each row (entries sorted by row, then idx)."""
    if rows.size == 0:
        return np.zeros(n_rows + 1, dtype=np.int32), np.zeros(0, dtype=np.int32)
    starts = np.ones(rows.size, dtype=bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (idx[1:] != idx[:-1] + 1)
    first = np.flatnonzero(starts)
    last = np.append(first[1:], rows.size) - 1
    runs = np.stack([idx[first], idx[last] + 1], axis=1).ravel()
    per_row = np.bincount(rows[first], minlength=n_rows)
    ptr = np.concatenate([[0], np.cumsum(per_row)])
    return ptr.astype(np.int32), runs.astype(np.int32)


def tile_order(cost: np.ndarray, seq_len: int, block: int, tile: int) -> np.ndarray:
    """int32 ``[H, n_tiles]``: the tiles of ``tile`` positions in the order
    programs take them, heaviest row first (stable: ties keep position order)."""
    n_tiles = -(-seq_len // tile)
    per_tile = cost[:, (np.arange(n_tiles) * tile) // block]  # [H, n_tiles]
    return np.argsort(-per_tile, axis=1, kind="stable").astype(np.int32)


def group_cost(cost: np.ndarray, kv_heads: int) -> np.ndarray:
    """Per-key-head cost for dK/dV: a program serves every query head of its
    group, so its work is the sum over them (``cost`` ``[H, R]`` -> ``[Hkv, R]``)."""
    H = cost.shape[0]
    if H == 1:
        return cost
    return cost.reshape(kv_heads, H // kv_heads, -1).sum(axis=1)
