"""Host tables the kernels walk, derived from a BlockLayout (numpy, no torch).

A kernel program owns a *tile* of positions on one axis (queries for the
forward pass and dQ, keys for dK/dV) and walks the other axis one *step* at a
time. Tile and step sizes are the kernel's (``KernelConfig``), the layout's
block is independent of them: a layout block wider than a step is walked in
several steps, and a step or tile wider than a block merges several blocks
(EMPTY only if all of them are, FULL only if all of them are). A layout block
finer than the steps therefore lets the kernels skip every empty step, which
the block-128 sparsity of FlexAttention cannot.

Each tile's non-empty steps, ascending, go to one of two lists:

- FULL steps: FULL and lying wholly inside the sequence, walked with no
  predicate and no bounds mask;
- PARTIAL steps: the others (PARTIAL, or FULL but reaching past ``seq_len``),
  walked with the predicate and the bounds mask.

Each list is one software-pipelined loop in the kernel that reads the step
index, then the step's keys (or queries). A step index loaded inside the loop
puts a dependent global load in front of every K/V address, which the
pipeline does not hide: on an H200 the causal forward ran 15-19% faster
when the FULL loop computed its steps instead (the forward's inner loop timed
alone in both forms). So a kernel's FULL list can also be given as *runs* of
consecutive steps, walked as one loop per run with no index load: causal
and banded tiles are one run, a band plus global or sink columns two. The
kernels take at most ``MAX_RUNS`` = 2 runs per tile (``run_table``), as
separate loops in sequence: a loop over runs around the step loop measured
slower than the step list (its inner loop pipelines badly). A kernel walks
runs when every tile has at most two and they are long (``RUN_MIN`` steps
per run on average: every loop costs the pipeline's fill and drain), and the
step list otherwise (scattered FULL blocks: random, per-block summaries).

``StepLists`` (all int32, pointers are global offsets):

- ``full_ptr`` ``[H * n_tiles + 1]``: tile ``t`` of layout head ``h`` owns
  entries ``full_ptr[h * n_tiles + t] : full_ptr[h * n_tiles + t + 1]`` of
- ``full_steps`` ``[n_full]``: step indices (position ``s * step``), ascending;
- ``part_ptr``, ``part_steps``: the same for PARTIAL steps;
- ``cost`` (int64 ``[H, n_tiles]``): non-empty steps per tile, for ordering programs;
- ``steps`` (int): the number of non-empty (tile, step) pairs, all heads.

``Runs`` (int32): ``ptr`` ``[H * n_tiles + 1]`` over runs, ``bounds``
``[2 * n_runs]`` the runs' ``first, end`` steps, interleaved; ``run_table``
(int32 ``[H * n_tiles, 2 * MAX_RUNS]``) the same as a fixed-width table,
empty runs ``(0, 0)``.

A *band* (``band_table``, the backward kernels' walk where
``KernelConfig.bwd_band`` asks for it) is a tile whose non-empty steps are
one contiguous range with its FULL steps one contiguous range inside it, so
its PARTIAL steps lie only before and after them: causal and banded
patterns. The kernel then walks the whole range as one software-pipelined
loop, computing the predicate only on the steps outside the FULL range (a
branch on the step index): one pipeline fill and drain per tile instead of
one per loop.

``tile_order`` turns a cost into the order programs take their tiles
(heaviest first, so the last wave of a launch is short).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterncc.primitives.base import run_offsets, run_ranges


@dataclass(frozen=True, eq=False)
class StepLists:
    """FULL and PARTIAL steps of one kernel's tiles (see the module docstring)."""

    n_tiles: int
    full_ptr: np.ndarray
    full_steps: np.ndarray
    part_ptr: np.ndarray
    part_steps: np.ndarray
    cost: np.ndarray
    steps: int


def kernel_steps(ptr: np.ndarray, idx: np.ndarray, full: np.ndarray, seq_len: int, block: int,
                 tile: int, step: int) -> StepLists:
    """The ``step``-wide steps of each ``tile``-wide tile, from one CSR
    orientation of a layout (``ptr`` ``[H, R + 1]`` global offsets, ``idx``,
    ``full``: rows are blocks of the tile axis, ``idx`` blocks of the step axis)."""
    H, R = ptr.shape[0], ptr.shape[1] - 1
    n_tiles, n_steps = -(-seq_len // tile), -(-seq_len // step)
    counts = np.diff(ptr, axis=1).astype(np.int64).ravel()
    flat_row = np.repeat(np.arange(H * R, dtype=np.int64), counts)
    if tile == block == step:  # each entry is one (tile, step) pair, already in order: no merge, no sort
        col = np.asarray(idx, dtype=np.int64)
        fast = np.asarray(full, dtype=bool) & ((col + 1) * step <= seq_len)
        return StepLists(n_tiles, _pointers(flat_row[fast], H * n_tiles), col[fast].astype(np.int32),
                         _pointers(flat_row[~fast], H * n_tiles), col[~fast].astype(np.int32),
                         counts.reshape(H, n_tiles), int(col.size))
    h, row = flat_row // R, flat_row % R
    col = np.asarray(idx, dtype=np.int64)
    full = np.asarray(full, dtype=bool)

    # -- every (block row, block col) entry -> the (tile, step) pairs it overlaps
    under_t = _overlapping(row, block, tile)  # [entries, a]
    under_s = _overlapping(col, block, step)  # [entries, b]
    a, b = under_t.shape[1], under_s.shape[1]
    pairs_t = np.repeat(under_t, b, axis=1).ravel()
    pairs_s = np.tile(under_s, (1, a)).ravel()
    h, full = np.repeat(h, a * b), np.repeat(full, a * b)
    keep = (pairs_t < n_tiles) & (pairs_s < n_steps)  # pieces of a last block past the end
    h, full, pairs_t, pairs_s = h[keep], full[keep], pairs_t[keep], pairs_s[keep]

    # -- merge the blocks of each pair: FULL only if every block under it is present and FULL
    key = (h * n_tiles + pairs_t) * n_steps + pairs_s
    uniq, inverse, present = np.unique(key, return_inverse=True, return_counts=True)
    n_full = np.bincount(inverse, weights=full, minlength=uniq.size)
    u_row, u_step = uniq // n_steps, uniq % n_steps  # u_row = h * n_tiles + tile
    u_tile = u_row % n_tiles
    expected = _blocks_under(u_tile, tile, block, R) * _blocks_under(u_step, step, block, R)
    inside = (u_step + 1) * step <= seq_len  # the fast path loads the whole step unmasked
    fast = (present == expected) & (n_full == expected) & inside

    full_ptr = _pointers(u_row[fast], H * n_tiles)
    part_ptr = _pointers(u_row[~fast], H * n_tiles)
    cost = np.bincount(u_row, minlength=H * n_tiles).reshape(H, n_tiles)
    return StepLists(n_tiles, full_ptr, u_step[fast].astype(np.int32), part_ptr, u_step[~fast].astype(np.int32),
                     cost, int(uniq.size))


RUN_MIN = 3  # mean FULL steps per run from which a kernel walks runs (see the module docstring)
MAX_RUNS = 2  # FULL runs per tile the kernels' run loops cover


@dataclass(frozen=True, eq=False)
class Runs:
    """A FULL step list as runs of consecutive steps (see the module docstring)."""

    ptr: np.ndarray
    bounds: np.ndarray

    @property
    def count(self) -> int:
        return self.bounds.size // 2


def full_runs(lists: StepLists) -> Runs:
    """``lists``' FULL steps as runs: a run ends where the next step is not
    its successor or belongs to the next tile."""
    steps = lists.full_steps.astype(np.int64)
    rows = lists.full_ptr.size - 1
    row = np.repeat(np.arange(rows), np.diff(lists.full_ptr))
    first = np.ones(steps.size, dtype=bool)
    first[1:] = (steps[1:] != steps[:-1] + 1) | (row[1:] != row[:-1])
    starts = np.flatnonzero(first)
    lasts = np.append(starts[1:], steps.size)[: starts.size] - 1  # the slice: no runs, no lasts
    bounds = np.stack([steps[starts], steps[lasts] + 1], axis=1).ravel().astype(np.int32)
    return Runs(_pointers(row[starts], rows), bounds)


def run_table(lists: StepLists) -> np.ndarray | None:
    """The kernels' runs table of ``lists``' FULL steps, or None where the
    kernels should walk the step list (see the module docstring)."""
    runs = full_runs(lists)
    per_tile = np.diff(runs.ptr)
    if runs.count == 0 or per_tile.max() > MAX_RUNS or lists.full_steps.size < RUN_MIN * runs.count:
        return None
    table = np.zeros((per_tile.size, 2 * MAX_RUNS), dtype=np.int32)
    rows = np.repeat(np.arange(per_tile.size), per_tile)
    slot = np.arange(runs.count) - runs.ptr[rows]  # a run's place in its tile
    table[rows, 2 * slot] = runs.bounds[0::2]
    table[rows, 2 * slot + 1] = runs.bounds[1::2]
    return table


def band_table(lists: StepLists) -> np.ndarray | None:
    """int32 ``[H * n_tiles, 4]``: each tile's ``first, full_first, full_end,
    end`` steps (all 0 for an empty tile, ``full_first = full_end = first``
    for one without FULL steps), or None unless every tile is a band (see the
    module docstring)."""
    n_full, n_part = np.diff(lists.full_ptr), np.diff(lists.part_ptr)
    f_lo, f_last = _first_last(lists.full_ptr, lists.full_steps)
    p_lo, p_last = _first_last(lists.part_ptr, lists.part_steps)
    big = np.iinfo(np.int64).max
    lo = np.minimum(np.where(n_full > 0, f_lo, big), np.where(n_part > 0, p_lo, big))
    hi = np.maximum(np.where(n_full > 0, f_last, -1), np.where(n_part > 0, p_last, -1)) + 1
    some = n_full + n_part > 0
    contiguous = (hi - lo == n_full + n_part) & (f_last - f_lo + 1 == n_full)
    if not contiguous[some].all():
        return None
    f_lo, f_hi = np.where(n_full > 0, f_lo, lo), np.where(n_full > 0, f_last + 1, lo)
    return np.where(some[:, None], np.stack([lo, f_lo, f_hi, hi], axis=1), 0).astype(np.int32)


def _first_last(ptr: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each CSR row's first and last step (0 and -1 for an empty row)."""
    count = np.diff(ptr)
    padded = np.append(steps.astype(np.int64), 0)  # a valid index for empty rows
    first = np.where(count > 0, padded[ptr[:-1]], 0)
    last = np.where(count > 0, padded[np.maximum(ptr[1:] - 1, 0)], -1)
    return first, last


def _overlapping(blocks: np.ndarray, block: int, size: int) -> np.ndarray:
    """int64 ``[len(blocks), max(1, block // size)]``: the size-wide pieces under each block."""
    if block <= size:
        return (blocks * block // size)[:, None]
    per = block // size
    return blocks[:, None] * per + np.arange(per)[None, :]


def _blocks_under(pieces: np.ndarray, size: int, block: int, n_blocks: int) -> np.ndarray:
    """How many layout blocks (of ``n_blocks``) lie under each size-wide piece."""
    if block >= size:
        return np.ones_like(pieces)
    first = pieces * size // block
    last = np.minimum((pieces + 1) * size // block, n_blocks)
    return last - first


def _pointers(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """CSR pointers (int32 ``[n_rows + 1]``) of entries sorted by row."""
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))]).astype(np.int32)


def tile_order(cost: np.ndarray) -> np.ndarray:
    """int32 ``[H, n_tiles]``: tiles in the order programs take them, heaviest
    first (stable: ties keep position order)."""
    return np.argsort(-cost, axis=1, kind="stable").astype(np.int32)


def group_cost(cost: np.ndarray, kv_heads: int) -> np.ndarray:
    """Per-key-head cost for dK/dV: a program serves every query head of its
    group, so its work is the sum over them (``cost`` ``[H, T]`` -> ``[Hkv, T]``)."""
    H = cost.shape[0]
    if H == 1:
        return cost
    return cost.reshape(kv_heads, H // kv_heads, -1).sum(axis=1)


def local_steps(lists: StepLists, tile: int, step: int, first_slot: np.ndarray, align: int) -> StepLists:
    """``lists`` of a packed batch's layout with each tile's steps counted
    from the first slot of its sequence (the kernels' PACKED mode walks a
    tile's sequence in that sequence's own positions). ``first_slot``
    (int64 ``[chunks]``): the first slot of the sequence that holds slots
    ``c * align .. (c + 1) * align - 1``; ``align`` is a multiple of
    ``tile`` and ``step``, so no tile or step spans two sequences."""
    rows = lists.full_ptr.size - 1
    t = np.arange(rows, dtype=np.int64) % lists.n_tiles
    shift = first_slot[t * tile // align] // step if first_slot.size else np.zeros(rows, dtype=np.int64)

    def local(ptr, steps):
        return (steps - np.repeat(shift, np.diff(ptr))).astype(np.int32)

    return StepLists(lists.n_tiles, lists.full_ptr, local(lists.full_ptr, lists.full_steps), lists.part_ptr,
                     local(lists.part_ptr, lists.part_steps), lists.cost, lists.steps)


def crop_steps(src: StepLists, lengths: np.ndarray, first: np.ndarray, tile: int, step: int,
               total: int) -> StepLists:
    """The step lists of a packed batch whose sequences all crop one layout:
    sequence ``s`` (``lengths[s]`` slots from slot ``first[s]``, a multiple
    of ``tile``) gets the top-left crop of ``src``, the lists of that layout
    at a length at least the longest (a pattern whose mask at length m is
    the top-left m x m of its mask at any longer length). Its tile ``t`` is
    the batch's tile ``first[s] // tile + t``, its steps counted from the
    sequence's first slot (the kernels' PACKED mode); a FULL step reaching
    past the sequence's end becomes the last PARTIAL step of its tile (FULL
    steps are walked without a bounds mask). No sort: a binary search per
    tile and gathers."""
    heads = (src.full_ptr.size - 1) // src.n_tiles
    n_tiles = total // tile
    lengths = np.asarray(lengths, dtype=np.int64)
    n_t, n_s = -(-lengths // tile), -(-lengths // step)
    seq = np.repeat(np.arange(lengths.size), n_t)  # one per (sequence, tile)
    t = run_offsets(n_t)
    g_tile = first[seq] // tile + t
    width = int(max(src.full_steps.max(initial=0), src.part_steps.max(initial=0), n_s.max(initial=0))) + 2

    def keyed(ptr, steps):  # row * width + step: ascending, so a row's steps below m are one search away
        return np.repeat(np.arange(ptr.size - 1, dtype=np.int64), np.diff(ptr)) * width + steps

    full_keys, part_keys = keyed(src.full_ptr, src.full_steps), keyed(src.part_ptr, src.part_steps)
    full_ptr, part_ptr = src.full_ptr.astype(np.int64), src.part_ptr.astype(np.int64)
    out_full, out_part, n_full, n_part = [], [], np.zeros(heads * n_tiles, np.int64), np.zeros(heads * n_tiles, np.int64)
    for h in range(heads):
        x = h * src.n_tiles + t  # the source row
        limit = x * width + n_s[seq]
        f0, kf = full_ptr[x], np.searchsorted(full_keys, limit) - full_ptr[x]
        p0, kp = part_ptr[x], np.searchsorted(part_keys, limit) - part_ptr[x]
        last = src.full_steps[np.maximum(f0 + kf - 1, 0)] if src.full_steps.size else np.zeros_like(kf)
        moved = (kf > 0) & (last == n_s[seq] - 1) & (lengths[seq] % step != 0)
        kf = kf - moved
        out_full.append(src.full_steps[run_ranges(f0, kf)])
        part = np.empty(int((kp + moved).sum()), dtype=np.int32)
        begins = np.cumsum(kp + moved) - (kp + moved)
        part[np.repeat(begins, kp) + run_ranges(0, kp)] = src.part_steps[run_ranges(p0, kp)]
        part[(begins + kp)[moved]] = last[moved]
        out_part.append(part)
        n_full[h * n_tiles + g_tile] = kf
        n_part[h * n_tiles + g_tile] = kp + moved

    def pointers(counts):
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    cost = (n_full + n_part).reshape(heads, n_tiles)
    return StepLists(n_tiles, pointers(n_full), np.concatenate(out_full).astype(np.int32), pointers(n_part),
                     np.concatenate(out_part).astype(np.int32), cost, int(cost.sum()))
