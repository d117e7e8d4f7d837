"""Which keys each rank needs, and the exchange that moves exactly those.

From the pattern bound at the full length ``n``, each rank's queries need
the keys that some allowed pair reaches. That set is found from layouts,
never from an ``n x n`` mask (``n`` may be a million), in two ways whose
intersection is kept (each is a superset of what is needed, so their
intersection is too):

- the natural block layout: a key block is needed when any of the rank's
  query blocks has a non-EMPTY cell in it (every head's layout at once, so
  ``heads{}`` and ``cycle()`` take the union over heads);
- the planner's components, in their token orders: the rank's queries are
  mapped to their slots, the non-EMPTY slot blocks of those rows give key
  slots, and the key order maps them back to positions. For gathered
  columns (``fixed``'s ``summary(l, c)``) that is the column tokens alone,
  not the whole blocks that hold them.

So a sliding window needs a halo of at most ``w + block`` keys from the
ranks before it, whatever ``n``; ``fixed(l, c)`` needs its band's blocks and
``c`` keys of every earlier run of ``l``. ``strided(l)`` cannot do better
than every earlier key: ``l`` consecutive queries meet every residue class.

The exchange (``gather_kv``) is one message per peer that has something to
send (k's and v's rows together), through ``torch.distributed``'s batched
point-to-point operations, so a halo costs two messages whatever the world
size; its backward sends each gathered row's gradient back to the rank that
owns it, which adds it into its local dK/dV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .. import ir
from ..blocklayout import build as build_layout
from ..errors import LimitError
from ..pipeline import as_pattern
from ..planner import build_plan
from ..planning.columns import _has_causal_factor
from . import sharding as sh


@dataclass(frozen=True, eq=False)
class ExchangePlan:
    """What one rank sends and receives in one exchange.

    - ``positions`` int64 ``[M]``, ascending: the absolute positions of the
      keys this rank gathers (its own needed keys among them);
    - ``send[p]`` int64: rows of this rank's local k/v that rank ``p``
      needs, ascending (``send[rank]``: the rows it keeps for itself);
    - ``recv[p]``: how many rows rank ``p`` sends to this rank
      (``recv[rank] == len(send[rank])``);
    - ``order`` int64 ``[M]``: the rows received, concatenated by source
      rank, taken in this order are the keys in ascending position.
    """

    rank: int
    world_size: int
    positions: np.ndarray
    send: tuple[np.ndarray, ...]
    recv: tuple[int, ...]
    order: np.ndarray


def needed_keys(pattern, n: int, heads: int, query_positions: np.ndarray, block: int = 64) -> np.ndarray:
    """int64, ascending: a superset of the keys that ``query_positions``
    attend to under ``pattern`` (text or IR, unbound) at length ``n``."""
    return needed_keys_all(pattern, n, heads, [query_positions], block)[0]


def needed_keys_all(pattern, n: int, heads: int, query_sets, block: int = 64) -> list[np.ndarray]:
    """``needed_keys`` for several sets of queries, building the layouts once."""
    pattern = ir.split_terms(as_pattern(pattern))[0]  # score terms never change which pairs attend
    ir.check_heads(pattern, heads)
    bound = ir.bind(pattern, n)
    try:
        natural = build_layout(bound, n, block, heads)
    except LimitError:  # too many blocks to list: the planned components alone decide
        natural = None
    try:
        plan = build_plan(pattern, n, block, heads, mode="planned")
    except LimitError:  # neither can be listed (causal at a million tokens): every key the queries may reach
        plan = None
    out = []
    for qpos in query_sets:
        qpos = np.asarray(qpos, dtype=np.int64)
        keys = _planned_keys(plan, qpos, n, block) if plan is not None else _reachable(bound, qpos, n)
        if natural is not None:
            keys = np.intersect1d(keys, _layout_keys(natural, np.unique(qpos // block), block, n), assume_unique=True)
        out.append(keys)
    return out


def _reachable(bound: ir.Pattern, qpos: np.ndarray, n: int) -> np.ndarray:
    """Every key, or under a causal factor every key up to the last query:
    the superset left when no layout of the pattern can be built."""
    last = int(qpos.max()) + 1 if len(qpos) and _has_causal_factor(bound) else (0 if len(qpos) == 0 else n)
    return np.arange(last, dtype=np.int64)


def _planned_keys(plan, qpos: np.ndarray, n: int, block: int) -> np.ndarray:
    """Union over the plan's components of the key positions their slot
    layouts reach from the slots of ``qpos``."""
    found = [np.zeros(0, dtype=np.int64)]
    for comp in plan.components:
        slots = comp.q_order.slots(qpos, n)
        rows = np.unique(slots[slots >= 0] // block)
        key_slots = _layout_keys(comp.layout, rows, block, comp.layout.seq_len)
        keys = comp.k_order.positions(key_slots, n)
        found.append(keys[keys >= 0])
    return np.unique(np.concatenate(found))


def _layout_keys(layout, rows: np.ndarray, block: int, length: int) -> np.ndarray:
    """int64, ascending: the tokens (slots) of every key block that a
    non-EMPTY cell of query block ``rows`` reaches, in any head."""
    ptr = layout.kv_ptr.astype(np.int64)
    starts, stops = ptr[:, rows].ravel(), ptr[:, rows + 1].ravel()
    cols = np.unique(layout.kv_idx[_ranges(starts, stops)].astype(np.int64))
    return _ranges(cols * block, np.minimum((cols + 1) * block, length))


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """int64: ``arange(starts[i], stops[i])`` for every i, concatenated."""
    lengths = np.maximum(stops - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths  # where each range begins in the output
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def exchange_plan(pattern: ir.Pattern, n: int, heads: int, world_size: int, rank: int, sharding: str,
                  block: int = 64) -> ExchangePlan:
    """Rank ``rank``'s ``ExchangePlan``. Every rank derives every rank's
    needs from the pattern itself, so no index lists travel."""
    held = [sh.positions(n, world_size, r, sharding) for r in range(world_size)]
    needed = needed_keys_all(pattern, n, heads, held, block)
    owner = np.empty(n, dtype=np.int64)
    local = np.empty(n, dtype=np.int64)  # each position's row in its owner's shard
    for r, pos in enumerate(held):
        owner[pos], local[pos] = r, np.arange(len(pos))
    send = tuple(local[keys[owner[keys] == rank]] for keys in needed)
    mine = needed[rank]
    by_source = [mine[owner[mine] == p] for p in range(world_size)]
    order = np.argsort(np.concatenate(by_source), kind="stable")
    return ExchangePlan(rank, world_size, mine, send, tuple(len(x) for x in by_source), order)


class Exchange:
    """An ``ExchangePlan`` bound to a process group, with the bytes sent
    by the last forward and backward (``bytes_sent``, ``bytes_sent_backward``)."""

    def __init__(self, plan: ExchangePlan, group, device: torch.device):
        self.plan = plan
        self.group = group
        self.peers = [dist.get_global_rank(group, p) if group is not None else p for p in range(plan.world_size)]
        self.send = [torch.as_tensor(s, device=device) for s in plan.send]
        self.order = torch.as_tensor(plan.order, device=device)
        self.bytes_sent = 0
        self.bytes_sent_backward = 0

    def swap(self, outgoing: dict[int, torch.Tensor], incoming: dict[int, torch.Tensor]) -> int:
        """Send ``outgoing[p]`` to rank ``p`` and receive ``incoming[p]`` from it,
        all at once; the bytes sent."""
        ops = [dist.P2POp(dist.isend, t, self.peers[p], self.group) for p, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[p], self.group) for p, t in incoming.items()]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return sum(t.numel() * t.element_size() for t in outgoing.values())


def gather_kv(exchange: Exchange, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` ``[B, Hkv, n_local, D]`` -> the needed keys and values of
    every rank, ``[B, Hkv, M, D]`` in ascending position
    (``exchange.plan.positions``); differentiable."""
    return _GatherKV.apply(k, v, exchange)


class _GatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, exchange: Exchange):
        plan, me = exchange.plan, exchange.plan.rank
        B, Hkv, _, D = k.shape
        kv = torch.stack([k, v])  # (2, B, Hkv, n_local, D): one message per peer carries both
        outgoing = {p: kv.index_select(3, idx).contiguous()
                    for p, idx in enumerate(exchange.send) if p != me and len(idx)}
        incoming = {p: kv.new_empty(2, B, Hkv, count, D) for p, count in enumerate(plan.recv) if p != me and count}
        exchange.bytes_sent = exchange.swap(outgoing, incoming)
        parts = [kv.index_select(3, exchange.send[p]) if p == me else incoming.get(p, kv[:, :, :, :0])
                 for p in range(plan.world_size)]
        gathered = torch.cat(parts, dim=3).index_select(3, exchange.order)  # (2, B, Hkv, M, D)
        ctx.exchange, ctx.local_len = exchange, k.shape[2]
        return gathered[0], gathered[1]

    @staticmethod
    def backward(ctx, dk_gathered, dv_gathered):
        exchange = ctx.exchange
        plan, me = exchange.plan, exchange.plan.rank
        dkv = torch.stack([dk_gathered, dv_gathered])  # (2, B, Hkv, M, D)
        _, B, Hkv, M, D = dkv.shape
        by_source = torch.empty_like(dkv).index_copy_(3, exchange.order, dkv)  # undo the sort
        parts = dict(enumerate(torch.split(by_source, list(plan.recv), dim=3)))
        outgoing = {p: t.contiguous() for p, t in parts.items() if p != me and t.shape[3]}
        incoming = {p: dkv.new_empty(2, B, Hkv, len(idx), D)
                    for p, idx in enumerate(exchange.send) if p != me and len(idx)}
        exchange.bytes_sent_backward = exchange.swap(outgoing, incoming)
        # Sum in float32 at least: a key read by several ranks gets one term from each.
        acc = torch.promote_types(dkv.dtype, torch.float32)
        total = dkv.new_zeros(2, B, Hkv, ctx.local_len, D, dtype=acc)
        total.index_add_(3, exchange.send[me], parts[me].to(acc))
        for p, t in incoming.items():
            total.index_add_(3, exchange.send[p], t.to(acc))
        total = total.to(dkv.dtype)
        return total[0], total[1], None
