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

The same layouts give each block of a rank's queries the span of gathered
keys it can reach (``ExchangePlan.chunks``), so the local attention reads
about ``w`` keys per row for a window, not the whole shard.

The exchange is one message per peer that has something to send (k's and
v's rows together), through ``torch.distributed``'s batched point-to-point
operations, so a halo costs two messages whatever the world size. It is
started (``Exchange.start``) before the rank attends to its own keys and
waited for (``remote_kv``) only after, so the transfer overlaps that work;
its backward sends each received row's gradient back to the rank that owns
it, which adds it into its local dK/dV.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .. import ir
from ..blocklayout import build as build_layout
from ..errors import LimitError
from ..pipeline import as_pattern
from ..planner import build_plan
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
      rank, taken in this order are the keys in ascending position;
    - ``chunks`` int64 ``[C, 4]``: ``(r0, r1, a, b)``, the local query rows
      ``r0:r1`` read only gathered keys ``a:b`` (from their blocks' reach in
      the layout); consecutive, covering every row, each at most
      ``CHUNK_PAIRS`` pairs unless one block row alone is more.

    The same keys split in two, the rank's own and the others', for the
    overlapped exchange (``own_keys``, ``remote_keys``).
    """

    rank: int
    world_size: int
    positions: np.ndarray
    send: tuple[np.ndarray, ...]
    recv: tuple[int, ...]
    order: np.ndarray
    chunks: np.ndarray

    def own_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """The rank's own needed keys: ``(positions, chunks)`` as
        ``positions`` and ``chunks`` are for all of them (its rows of local
        k/v are ``send[rank]``, in the same order)."""
        own = self.positions[self._own()]
        return own, self._chunks_within(own)

    def remote_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keys other ranks send: ``(positions, chunks, order)``; the
        rows received, concatenated by source rank without this one, taken
        in ``order`` are these keys in ascending position."""
        own = self._own()
        rows = self.order[~own]
        rows = rows - np.where(rows >= sum(self.recv[:self.rank]), self.recv[self.rank], 0)
        remote = self.positions[~own]
        return remote, self._chunks_within(remote), rows

    def _own(self) -> np.ndarray:
        """bool ``[M]``: which gathered keys this rank holds itself (``order``
        takes them from its own block of the concatenation by source)."""
        start = sum(self.recv[:self.rank])
        return (self.order >= start) & (self.order < start + self.recv[self.rank])

    def _chunks_within(self, keys: np.ndarray) -> np.ndarray:
        """``chunks`` over a sublist of ``positions``: each chunk's key span
        ``a:b`` becomes the span of ``keys`` in the same positions."""
        out = self.chunks.copy()
        spans = out[:, 3] > out[:, 2]
        lo = self.positions[out[spans, 2]]
        hi = self.positions[out[spans, 3] - 1]
        out[spans, 2] = np.searchsorted(keys, lo, side="left")
        out[spans, 3] = np.searchsorted(keys, hi, side="right")
        return out


def coalesced(chunks: np.ndarray) -> np.ndarray:
    """``chunks`` with each run of consecutive chunks that read no key made
    one chunk (its rows, keys ``0:0``): those rows get ``o = 0`` and ``lse =
    -inf`` from one small computation. The remote part of a window's rank
    is such chunks but for the first few: sliding_window(4096) at n = 65536
    on one rank has 1,003, which took 2.0 s of a forward+backward on the
    CPU one by one and take 0.03 s as one."""
    empty = chunks[:, 3] <= chunks[:, 2]
    first = np.ones(len(chunks), dtype=bool)
    first[1:] = ~(empty[1:] & empty[:-1])  # a chunk continues the run when it and the one before read nothing
    starts = np.flatnonzero(first)
    out = chunks[starts].copy()
    out[:, 1] = chunks[np.append(starts[1:] - 1, len(chunks) - 1), 1]  # each run ends where its last chunk does
    out[empty[starts], 2:] = 0
    return out


# Query rows x keys that the local attention computes at once (times batch
# and heads): its scores stay tens of MiB whatever the length.
CHUNK_PAIRS = 2**18


def needed_keys(pattern, n: int, heads: int, query_positions: np.ndarray, block: int = 64) -> np.ndarray:
    """int64, ascending: a superset of the keys that ``query_positions``
    attend to under ``pattern`` (text or IR, unbound) at length ``n``."""
    return needed_keys_all(pattern, n, heads, [query_positions], block)[0]


def needed_keys_all(pattern, n: int, heads: int, query_sets, block: int = 64) -> list[np.ndarray]:
    """``needed_keys`` for several sets of queries, building the layouts once."""
    needs = _Needs(pattern, n, heads, block)
    return [needs.keys(np.asarray(qpos, dtype=np.int64)) for qpos in query_sets]


class _Needs:
    """A pattern's layouts at one length, built once: the natural layout and
    the planner's components (either None when over the layout's limit)."""

    def __init__(self, pattern, n: int, heads: int, block: int):
        pattern = ir.split_terms(as_pattern(pattern))[0]  # score terms never change which pairs attend
        ir.check_heads(pattern, heads)
        self.n, self.block = n, block
        self.bound = ir.bind(pattern, n)
        try:
            self.natural = build_layout(self.bound, n, block, heads)
        except LimitError:  # too many blocks to list: the planned components alone decide
            self.natural = None
        try:
            self.plan = build_plan(pattern, n, block, heads, mode="planned")
        except LimitError:  # neither can be listed (causal at a million tokens): every key the queries may reach
            self.plan = None

    def keys(self, qpos: np.ndarray) -> np.ndarray:
        """int64, ascending: a superset of the keys ``qpos`` attend to."""
        n, block = self.n, self.block
        if self.plan is not None:
            keys = _planned_keys(self.plan, qpos, n, block)
        else:
            lo, hi = self.spans(qpos)
            keys = np.arange(lo.min(), hi.max(), dtype=np.int64) if len(qpos) else np.zeros(0, dtype=np.int64)
        if self.natural is not None:
            keys = np.intersect1d(keys, _layout_keys(self.natural, np.unique(qpos // block), block, n),
                                  assume_unique=True)
        return keys

    def spans(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``(lo, hi)`` ``[len(qpos)]``: each query's keys lie in
        ``lo:hi``, from its block's first and last non-EMPTY key block in any
        head; without a layout ``0:n``, or ``0:q + 1`` under a causal factor."""
        n, block = self.n, self.block
        if self.natural is None:
            hi = qpos + 1 if ir.within_causal(self.bound) else np.full(len(qpos), n, dtype=np.int64)
            return np.zeros(len(qpos), dtype=np.int64), hi
        ptr, idx = self.natural.kv_ptr.astype(np.int64), self.natural.kv_idx.astype(np.int64)
        if len(idx) == 0:  # the pattern allows no pair
            return np.zeros(len(qpos), dtype=np.int64), np.zeros(len(qpos), dtype=np.int64)
        rows = qpos // block
        starts, stops = ptr[:, rows], ptr[:, rows + 1]  # (H, len(qpos))
        some = stops > starts
        first = np.where(some, idx[np.minimum(starts, len(idx) - 1)], np.iinfo(np.int64).max).min(axis=0)
        last = np.where(some, idx[np.maximum(stops - 1, 0)], -1).max(axis=0)
        empty = last < 0
        lo = np.where(empty, 0, first * block)
        hi = np.where(empty, 0, np.minimum((last + 1) * block, n))
        return lo, hi


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
    needs = _Needs(pattern, n, heads, block)
    needed = [needs.keys(pos) for pos in held]
    owner = np.empty(n, dtype=np.int64)
    local = np.empty(n, dtype=np.int64)  # each position's row in its owner's shard
    for r, pos in enumerate(held):
        owner[pos], local[pos] = r, np.arange(len(pos))
    send = tuple(local[keys[owner[keys] == rank]] for keys in needed)
    mine = needed[rank]
    by_source = [mine[owner[mine] == p] for p in range(world_size)]
    order = np.argsort(np.concatenate(by_source), kind="stable")
    chunks = _chunks(held[rank], mine, *needs.spans(held[rank]), block)
    return ExchangePlan(rank, world_size, mine, send, tuple(len(x) for x in by_source), order, chunks)


def _chunks(qpos: np.ndarray, keys: np.ndarray, lo: np.ndarray, hi: np.ndarray, block: int) -> np.ndarray:
    """int64 ``[C, 4]`` ``(r0, r1, a, b)``: the rows of ``qpos`` in runs of
    whole query blocks, each reading gathered ``keys[a:b]`` (its rows' spans
    ``lo:hi``), merged while a run stays within ``CHUNK_PAIRS``."""
    if len(qpos) == 0:
        return np.zeros((1, 4), dtype=np.int64)  # one empty chunk: the rank still joins the exchange's backward
    a, b = np.searchsorted(keys, lo), np.searchsorted(keys, hi)
    none = b <= a  # rows with no key widen no span
    a, b = np.where(none, np.iinfo(np.int64).max, a), np.where(none, -1, b)
    cuts = np.flatnonzero(np.diff(qpos // block) != 0) + 1  # where a new query block (or a gap) starts
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(qpos)]])
    chunks = []
    r0, ca, cb = 0, int(a[0]), int(b[0])
    for s, e in zip(starts[1:], stops[1:]):
        na, nb = min(ca, int(a[s:e].min())), max(cb, int(b[s:e].max()))
        if (e - r0) * max(nb - na, 0) > CHUNK_PAIRS:
            chunks.append((r0, s, ca, cb))
            r0, na, nb = s, int(a[s:e].min()), int(b[s:e].max())
        ca, cb = na, nb
    chunks.append((r0, len(qpos), ca, cb))
    out = np.asarray(chunks, dtype=np.int64)
    empty = out[:, 3] < out[:, 2]
    out[empty, 2:] = 0
    return out


class Exchange:
    """An ``ExchangePlan`` bound to a process group, with the bytes sent
    by the last forward and backward (``bytes_sent``, ``bytes_sent_backward``)."""

    def __init__(self, plan: ExchangePlan, group, device: torch.device):
        self.plan = plan
        self.group = group
        self.peers = [dist.get_global_rank(group, p) if group is not None else p for p in range(plan.world_size)]
        self.send = [torch.as_tensor(s, device=device) for s in plan.send]
        # (positions, chunks) of the keys this rank holds and of those it receives, the chunks that
        # read none of them run together (coalesced)
        own, own_chunks = plan.own_keys()
        remote, remote_chunks, rows = plan.remote_keys()
        self.own = own, coalesced(own_chunks)
        self.remote = remote, coalesced(remote_chunks)
        self.remote_order = torch.as_tensor(rows, device=device)
        self.bytes_sent = 0
        self.bytes_sent_backward = 0
        self.masks: dict = {}  # the local attention's chunk masks at this length (attention.local_attention)
        # "posted" and "arrived" as the backward passes them, the last few (tests read the order)
        self.log: deque[str] = deque(maxlen=8)

    def start(self, k: torch.Tensor, v: torch.Tensor) -> "InFlight":
        """Post the sends of this rank's rows of ``k``, ``v`` that other
        ranks need and the receives of theirs, and return without waiting
        (``remote_kv`` waits)."""
        plan, me = self.plan, self.plan.rank
        B, Hkv, _, D = k.shape
        with torch.no_grad():
            kv = torch.stack([k, v])  # (2, B, Hkv, n_local, D): one message per peer carries both
            outgoing = {p: kv.index_select(3, idx).contiguous() for p, idx in enumerate(self.send) if p != me and len(idx)}
            incoming = {p: kv.new_empty(2, B, Hkv, count, D) for p, count in enumerate(plan.recv) if p != me and count}
        self.bytes_sent = _bytes(outgoing)
        return InFlight(self._post(outgoing, incoming), incoming, outgoing)

    def _post(self, outgoing, incoming) -> list:
        ops = [dist.P2POp(dist.isend, t, self.peers[p], self.group) for p, t in outgoing.items()]
        ops += [dist.P2POp(dist.irecv, t, self.peers[p], self.group) for p, t in incoming.items()]
        return dist.batch_isend_irecv(ops) if ops else []


def _bytes(tensors: dict[int, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(eq=False)
class InFlight:
    """A started exchange: its works, the buffers being received (by source
    rank) and those being sent (kept alive until the sends complete)."""

    works: list
    incoming: dict
    outgoing: dict
    device: torch.device | None = None


@dataclass(eq=False)
class Returning:
    """One call's gradients on their way back to their owners: posted by
    ``remote_kv``'s backward, awaited by ``arriving``'s."""

    flight: InFlight | None = None


def arriving(k: torch.Tensor, v: torch.Tensor, exchange: Exchange, returning: Returning):
    """``k``, ``v`` unchanged, as the inputs every later use of them reads
    (``remote_kv``'s transfer, the own part): in the backward pass this
    node runs after all of them, where it waits for the gradients the
    other ranks return for this rank's keys and adds them in. Created
    before the own part, so autograd reaches it only once the own part's
    backward has run: the returning gradients travel meanwhile."""
    return _Arriving.apply(k, v, exchange, returning)


def remote_kv(exchange: Exchange, flight: InFlight, k: torch.Tensor, v: torch.Tensor, returning: Returning):
    """The keys and values other ranks sent, ``[B, Hkv, M_remote, D]`` in
    ascending position (``exchange.remote``), once ``flight`` has arrived;
    differentiable in ``k`` and ``v`` (``arriving``'s outputs): the backward
    starts returning each received row's gradient to its owner, and
    receiving what the others return, without waiting; ``arriving``'s
    backward waits and adds it into this rank's dK/dV."""
    return _RemoteKV.apply(k, v, exchange, flight, returning)


class _Arriving(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, exchange: Exchange, returning: Returning):
        ctx.exchange, ctx.returning, ctx.shape, ctx.dtype = exchange, returning, k.shape, k.dtype
        return k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dk, dv):
        exchange, returning = ctx.exchange, ctx.returning.flight
        ctx.returning.flight = None
        if returning is not None:
            for work in returning.works:
                work.wait()
        exchange.log.append("arrived")
        if returning is None or not returning.incoming:
            return dk, dv, None, None
        # Summed in float32 at least: a key read by several ranks gets one term from each.
        acc = torch.promote_types(ctx.dtype, torch.float32)
        total = torch.zeros((2, *ctx.shape), dtype=acc, device=returning.device)
        for p, t in returning.incoming.items():
            total.index_add_(3, exchange.send[p], t.to(acc))
        for i, d in enumerate((dk, dv)):
            if d is not None:
                total[i] += d
        total = total.to(ctx.dtype)
        return total[0], total[1], None, None


class _RemoteKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, exchange: Exchange, flight: InFlight, returning: Returning):
        plan, me = exchange.plan, exchange.plan.rank
        for work in flight.works:
            work.wait()
        empty = k.new_empty(2, k.shape[0], k.shape[1], 0, k.shape[3])
        parts = [flight.incoming.get(p, empty) for p in range(plan.world_size) if p != me]
        received = torch.cat(parts or [empty], dim=3).index_select(3, exchange.remote_order)  # (2, B, Hkv, M_remote, D)
        ctx.exchange, ctx.returning = exchange, returning
        return received[0], received[1]

    @staticmethod
    def backward(ctx, dk_remote, dv_remote):
        exchange = ctx.exchange
        plan, me = exchange.plan, exchange.plan.rank
        dkv = torch.stack([dk_remote, dv_remote])  # (2, B, Hkv, M_remote, D)
        _, B, Hkv, _, D = dkv.shape
        by_source = torch.empty_like(dkv).index_copy_(3, exchange.remote_order, dkv)  # undo the sort
        peers = [p for p in range(plan.world_size) if p != me]
        parts = dict(zip(peers, torch.split(by_source, [plan.recv[p] for p in peers], dim=3)))
        outgoing = {p: t.contiguous() for p, t in parts.items() if t.shape[3]}
        incoming = {p: dkv.new_empty(2, B, Hkv, len(idx), D)
                    for p, idx in enumerate(exchange.send) if p != me and len(idx)}
        exchange.bytes_sent_backward = _bytes(outgoing)
        ctx.returning.flight = InFlight(exchange._post(outgoing, incoming), incoming, outgoing, dkv.device)
        exchange.log.append("posted")
        return None, None, None, None, None
