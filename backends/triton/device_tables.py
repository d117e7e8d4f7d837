"""Device tables: each kernel's step lists and tile order (``tables.py``), and
the random tables with the pattern's integers, on the device, per layout and
config (``TritonAttention`` caches them per shape)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patterncc import randomblocks
from patterncc.errors import LimitError

from . import tables
from .config import KernelConfig
from .resident import to_device, to_device_all


@dataclass(frozen=True, eq=False)
class _DeviceTables:
    """The step lists of each kernel (tables.py) and the random tables, on the device."""

    layout_heads: int
    fwd: tuple  # (full_ptr, full_steps, part_ptr, part_steps, tile_order): query tiles of block_m
    dq: tuple  # the same for query tiles of block_m2
    dkdv: tuple  # the same for key tiles of block_n1 (tile order per key/value head)
    random: torch.Tensor  # int32: table offsets, then the random(...) tables
    # how each kernel walks its tiles: "steps" (full_steps is the FULL step
    # list), "runs" (full_steps is tables.run_table, two runs per tile,
    # flattened) or "band" (tables.band_table, flattened; backward only)
    fwd_walk: str = "steps"
    dq_walk: str = "steps"
    dkdv_walk: str = "steps"

    @staticmethod
    def build(lay, Hkv: int, config: KernelConfig, module, device, packing=None,
              runs: bool = True) -> "_DeviceTables":
        """``module``: the kernels' (``load_kernels``), whose random tables and
        integers ``RANDOM`` holds. ``packing``: ``(first_slot, align)`` for a packed batch's layout
        (``tables.local_steps``): each tile's steps counted from its sequence's first slot.
        ``runs=False``: FULL steps are walked one by one even where they form runs."""

        def steps_of(orientation: str, tile: int, step: int) -> tables.StepLists:
            ptr, idx, full = ((lay.kv_ptr, lay.kv_idx, lay.kv_full) if orientation == "kv"
                              else (lay.q_ptr, lay.q_idx, lay.q_full))
            rows = tables.kernel_steps(ptr, idx, full, lay.seq_len, lay.block, tile, step)
            return rows if packing is None else tables.local_steps(rows, tile, step, *packing)

        return _DeviceTables.from_steps(steps_of, lay.heads, lay.seq_len, Hkv, config, module, device, runs)

    @staticmethod
    def from_steps(steps_of, heads: int, n: int, Hkv: int, config: KernelConfig, module,
                   device, runs: bool = True) -> "_DeviceTables":
        """The tables of the kernels' step lists ``steps_of(orientation, tile,
        step)`` (``"kv"``: query tiles walking key steps, ``"q"``: key tiles
        walking query steps) of a layout with ``heads`` heads over ``n`` slots."""

        def lists(steps: tables.StepLists, cost, band: bool = False):
            """The kernel's five host tables, and how it walks them."""
            table = tables.band_table(steps) if band else None
            walk = "band"
            if table is None and runs:
                table, walk = tables.run_table(steps), "runs"
            if table is None:
                table, walk = steps.full_steps, "steps"
            arrays = (steps.full_ptr, table.ravel(), steps.part_ptr, steps.part_steps, tables.tile_order(cost))
            return [np.ascontiguousarray(a, dtype=np.int32) for a in arrays], walk

        rows = steps_of("kv", config.block_m, config.block_n)
        fwd, fwd_walk = lists(rows, rows.cost)
        if (config.block_m2, config.block_n2) != (config.block_m, config.block_n):
            rows = steps_of("kv", config.block_m2, config.block_n2)
            dq, dq_walk = lists(rows, rows.cost, config.bwd_band)
        else:  # the forward's tiles: its tables too, unless dQ walks bands
            dq, dq_walk = lists(rows, rows.cost, True) if config.bwd_band else (fwd, fwd_walk)
        cols = steps_of("q", config.block_n1, config.block_m1)
        kv_cost = tables.group_cost(cols.cost, Hkv) if heads > 1 else cols.cost
        dkdv, dkdv_walk = lists(cols, kv_cost, config.bwd_band)
        random = _random_host(module.RANDOM_TABLES, n, module.PATTERN_ARGS)
        # all of it in one copy (dQ's lists are the forward's own when they are the same object)
        host = [*fwd, *(dq if dq is not fwd else []), *dkdv, random]
        on = iter(to_device_all(host, device))
        fwd_t = tuple(next(on) for _ in fwd)
        dq_t = tuple(next(on) for _ in dq) if dq is not fwd else fwd_t
        dkdv_t = tuple(next(on) for _ in dkdv)
        return _DeviceTables(layout_heads=heads, fwd=fwd_t, dq=dq_t, dkdv=dkdv_t, random=next(on),
                             fwd_walk=fwd_walk, dq_walk=dq_walk, dkdv_walk=dkdv_walk)


def _random_buffer(specs, n: int, device, args: tuple[int, ...]) -> torch.Tensor:
    """``_random_host`` on ``device``."""
    return to_device(_random_host(specs, n, args), device)


def _random_host(specs, n: int, args: tuple[int, ...]) -> np.ndarray:
    """int32: ``len(specs)`` offsets (one dummy entry if none), the pattern's
    integers ``args`` (``codegen.pattern_args``: the generated predicate's
    ``a0, a1, ...``), then each ``random(r, b, seed)`` table ``[nb, min(r,
    nb)]`` from ``randomblocks.draw``."""
    parts = [np.array(args, dtype=np.int64)]
    offset = max(len(specs), 1) + len(args)
    offsets = []
    for r, b, seed in specs:
        nb = -(-n // b)
        table = randomblocks.draw(r, nb, seed, np.arange(nb)).ravel()
        offsets.append(offset)
        offset += table.size
        parts.append(table)
    if offset >= 2**31:
        raise LimitError(f"the random(...) tables at n={n} hold {offset} entries, over the int32 limit")
    return np.concatenate([np.array(offsets or [0], dtype=np.int64), *parts]).astype(np.int32)  # args fit: codegen
