"""A Plan on the generated kernels, as one autograd Function (runtime._AttentionFunction).

Forward: each component runs the forward kernel with its token order folded
into the kernels' address arithmetic (``kernels._token``: residue order and
gathered columns are closed forms), so q, k, v are read and o, lse written
in token order with no copies; the partial results merge exactly by
log-sum-exp inside the forward kernels (each launch after the first merges
its result into the running one in its epilogue: ``merge._merged``).
Only q, k, v, the merged o and the merged lse are saved.

Score terms (``patterncc.scores``) ride along: every component applies
them at its tokens' own positions (the kernels map slots to tokens), and the
sink joins the denominators of one component that reaches every query, so
the merge counts it once.

Backward: ``delta = rowsum(dO * O)`` once, from the merged o; then every
component runs the dK/dV and dQ kernels with the *merged* lse and delta (the
Sparse Transformer's recomputation: P is rebuilt from lse, never stored),
and the gradients add up in token order inside the kernels: each launch adds
the fp32 sum of the launches before it, the last writes the inputs' dtype
(``merge._summed``).
"""

from __future__ import annotations

import numpy as np
import torch

from patterncc import ir
from patterncc.lru import LRU
from patterncc.blocklayout.builder import build as build_layout
from patterncc.orders import Residue, SlotOrder, shaping
from patterncc.packing import PackedSlots, packed_layout, residue_padding
from patterncc.planned import PlannedAttention, _term_kwargs
from patterncc.planner import build_plan, component_at, reorders, slot_pattern_of
from patterncc.scores import NO_TERMS, ScoreTerms, check_terms

from .resident import to_device
from .standin import StandIns
from .runtime import _DeviceTables, _Run, attend, check_inputs, launch_key, load_bitmap_kernels
from .tables import crop_steps, kernel_steps

_LAUNCH_ENTRIES = 32  # launch lists kept per TritonPlannedAttention
_PACKED_ENTRIES = 8  # packed batches' launch lists kept (a training loop brings a new batch every step)
_LENGTH_ENTRIES = 256  # component layouts kept per sequence length (reordered components of packed batches)
# Packed batches run the strategy (natural order or planned) the planner picks at this many times
# the pattern's reach and this many blocks, whatever their longest sequence: where its choice has
# settled (strided(128) and fixed(128, 32) are planned from 2048 tokens, 16x their integer and 32
# blocks of 64; strided(8) in blocks of 16 from 256 tokens, 16 blocks).
_PACKED_REFERENCE_REACH = 8
_PACKED_REFERENCE_BLOCKS = 64


class TritonPlannedAttention(PlannedAttention):
    """``PlannedAttention`` whose components share one autograd Function
    (merged lse and delta in the backward pass) instead of composing each
    component's own Function with a differentiable merge."""

    def __init__(self, *args, standins: bool = True, **kwargs):
        super().__init__(*args, check=check_inputs, **kwargs)
        self._launches = LRU(_LAUNCH_ENTRIES)
        self._packed = LRU(_PACKED_ENTRIES)
        self._at_length = LRU(_LENGTH_ENTRIES)
        self._packed_inner: dict = {}
        # a first call's kernels while the plan's compile (none with a config of the caller's)
        self._standins = StandIns(self.pattern, self.block, load_bitmap_kernels) if standins else None

    def combine(self, runs, q, k, v, scale, terms=NO_TERMS):
        standins = None if self._standins is None else _PlanStandIns(self._standins, runs)
        return attend(q, k, v, scale, lambda q, k: self.launches(runs, q, k), terms, standins)

    def launches_for(self, q, k) -> list:
        """The launches ``(launcher, SlotOrder)`` of a call on checked inputs
        whose head dim is padded: what ``__call__`` runs (never SDPA), for
        the ``patterncc::attention`` op, which owns the autograd."""
        runs = self._runs(self.plan(q.shape[2], q.shape[1]), q.device)
        if len(runs) == 1 and not runs[0].component.reordered:
            return [(runs[0].attn.launcher(*launch_key(q, k)), SlotOrder())]
        return self.launches(runs, q, k)

    def launches(self, runs, q, k) -> list:
        """``(launcher, SlotOrder)`` per component for inputs shaped like ``q``
        and ``k`` (head dim already padded); kept per shape, since a planned
        call is often bound by the host's time to issue it."""
        key = launch_key(q, k)
        hit = self._launches.get(key)
        if hit is not None and hit[0] is runs:  # the list it was made for (it holds runs: no id reuse)
            return hit[1]
        n = key[0]
        made = [(run.attn.launcher(run.slots, *key[1:]), SlotOrder.of(run.component.q_order, run.component.k_order, n))
                for run in runs]
        self._launches[key] = (runs, made)
        return made

    # -- packed batches

    def packed(self, q, k, v, offsets: np.ndarray, scale=None, return_lse: bool = False, *, softcap=None,
               alibi_slopes=None, sinks=None, rel_bias=None):
        """Attention over a packed batch: q ``[1, H, total, D]``, k, v ``[1,
        Hkv, total, D]``, ``offsets`` the sequences' token offsets (numpy
        int64 ``[S + 1]``, checked: ``checks.check_cu_seqlens``). Each sequence
        is attended alone, with q, k and n relative to it; the result is
        each sequence's own, concatenated (o, lse, and the gradients).

        A pattern whose mask does not depend on n runs fused: every
        component of one plan (made at the longest sequence) over the
        batch's packed layout (``patterncc.packing``), through the same
        kernels for every batch. One that does (``n`` in an argument or a
        ``where``, ``random``) runs the sequences grouped by length, one
        call per distinct length (each length its own layout, and its own
        kernels where the arguments use n)."""
        q, k, v = check_inputs(q, k, v)
        if q.shape[0] != 1:
            raise ValueError(f"a packed batch has batch size 1 (q [1, H, total, D]), got q {tuple(q.shape)}")
        terms = ScoreTerms(softcap, alibi_slopes, sinks, rel_bias)
        if terms:
            terms = check_terms(terms, q.shape[1], q.device)
        if not length_free(self.pattern):
            o, lse = self._packed_by_length(q, k, v, offsets, scale, terms)
        else:
            o, lse = attend(q, k, v, scale, lambda q, k: self.packed_launches(q, k, offsets), terms)
        return (o, lse) if return_lse else o

    def packed_launches(self, q, k, offsets: np.ndarray) -> list:
        """``(launcher, SlotOrder)`` per component of a packed batch for inputs
        shaped like ``q`` and ``k`` (head dim padded), kept for the last few batches."""
        key = (offsets.tobytes(), *launch_key(q, k))
        if key not in self._packed:
            self._packed[key] = self._build_packed(q, k, offsets)
        return self._packed[key]

    def _build_packed(self, q, k, offsets: np.ndarray) -> list:
        """Every component's packed layout, device tables and kernels: the
        kernels are the ones of the plan at the longest sequence (no compile
        for a new batch), the layouts per sequence (``packing_of``)."""
        _, H, Hkv, head_dim, dtype, device = launch_key(q, k)
        plan = self.packed_plan(offsets, H)
        launches = []
        for comp in plan.components:
            attn = self._inner_of(comp, H)
            config = attn.config_for(head_dim, dtype, comp.layout)
            align = max(config.block, config.block_m, config.block_n, config.block_m1, config.block_n1,
                        config.block_m2, config.block_n2)
            packing, sources, source_of, unfull = self.packing_of(comp, offsets, align)
            module = attn.kernels(plan.seq_len, config, device)
            if comp.reordered:
                lay = packed_layout(comp.slot_pattern, sources, source_of, packing, unfull)
                tables = _DeviceTables.build(lay, Hkv, config, module, device,
                                             packing=(packing.first_slots(), align))
            else:  # every sequence crops one layout: so do its step lists (no packed layout needed)
                def steps_of(orientation, tile, step, comp=comp, packing=packing):
                    return crop_steps(self.source_steps(comp, orientation, tile, step), np.diff(offsets),
                                      packing.first, tile, step, packing.total)

                tables = _DeviceTables.from_steps(steps_of, comp.layout.heads, packing.total, Hkv, config,
                                                  module, device)
            seqs = to_device(packing.table(), device)
            launcher = _Run(module, tables, config, head_dim, H, Hkv, packing.total, dtype, packing=(seqs, align))
            launches.append((launcher, SlotOrder.of(comp.q_order, comp.k_order, plan.seq_len)))
        return launches

    def packing_of(self, comp, offsets: np.ndarray, align: int):
        """``(PackedSlots, sources, source_of, unfull)`` of one component over a
        packed batch (``packing.packed_layout``'s arguments). Natural order:
        every sequence crops the component's layout at the longest one
        (the mask at length m is the top-left m x m of the mask at any
        longer length, for a pattern that does not use n). Residue order:
        one layout per class size (``residue_layout``). Gathered columns:
        the component's layout at each distinct length (closed form, cached
        per length)."""
        lengths = np.diff(offsets)
        if not comp.reordered:
            return PackedSlots.of(offsets, lengths, np.ones_like(lengths), align), [comp.layout], \
                np.zeros(lengths.size, dtype=np.int64), None
        # queries walk the slots of the query order (keys gathered into fewer are padded to them)
        slots = comp.q_order.length(lengths)
        packing = PackedSlots.of(offsets, slots, shaping(comp.q_order, comp.k_order).classes(lengths), align)
        if isinstance(comp.q_order, Residue):  # one layout per class size, its padding slots' blocks never FULL
            distinct, source_of = np.unique(np.maximum(comp.q_order.classes(lengths), 1), return_inverse=True)
            sources = [self.residue_layout(comp, int(S)) for S in distinct]
            return packing, sources, source_of, residue_padding(lengths, comp.q_order, comp.layout.block)
        distinct, source_of = np.unique(np.maximum(lengths, 1), return_inverse=True)
        sources = [self.component_at(comp, int(n)).layout for n in distinct]
        if any(lay.seq_len != comp.q_order.length(int(n)) for lay, n in zip(sources, distinct)):
            raise AssertionError("a component's layout must span its query order's slots")
        return packing, sources, source_of, None

    def source_steps(self, comp, orientation: str, tile: int, step: int):
        """The step lists of a natural-order component's layout (at the plan's
        length), which every packed batch of the plan crops (``tables.crop_steps``)."""
        key = (comp.pattern, comp.layout.seq_len, comp.layout.heads, orientation, tile, step)
        if key not in self._at_length:
            lay = comp.layout
            ptr, idx, full = ((lay.kv_ptr, lay.kv_idx, lay.kv_full) if orientation == "kv"
                              else (lay.q_ptr, lay.q_idx, lay.q_full))
            self._at_length[key] = kernel_steps(ptr, idx, full, lay.seq_len, lay.block, tile, step)
        return self._at_length[key]

    def residue_layout(self, comp, S: int):
        """A residue-order component's layout over ``l * S`` slots without the
        tests that keep padding slots out (``planner.slot_pattern_of(...,
        padding=False)``), so one per class size ``S`` serves every length
        with that class size (``packing.residue_padding`` marks the blocks
        that hold padding slots). Cached per class size: at most
        ``ceil(longest / l)`` of them, shared by every batch."""
        key = (comp.pattern, comp.q_order, comp.k_order, comp.layout.heads, "classes", S)
        if key not in self._at_length:
            n = comp.q_order.l * S
            pattern = slot_pattern_of(comp.pattern, comp.q_order, comp.k_order, n, padding=False)
            self._at_length[key] = build_layout(pattern, n, comp.layout.block, comp.layout.heads)
        return self._at_length[key]

    def packed_plan(self, offsets: np.ndarray, heads: int):
        """The plan a packed batch runs, so that every batch of a training run
        runs the same kernels (a new batch compiles nothing): at the power of
        two at or above its longest sequence (a natural layout that every
        sequence's layout crops from), in one strategy for every batch
        (``_packed_mode``). A planned one is made at least at the pattern's
        reach (``_reach``), where every component has something to compute:
        a component left out would change the others' kernels (which launch
        merges into which)."""
        mode = self._packed_mode(heads)
        longest = int(np.diff(offsets).max())
        n = _power_of_two(max(longest, _reach(self.pattern)) if mode == "planned" else longest)
        key = ("plan", n, heads, mode)
        if key not in self._at_length:
            self._at_length[key] = build_plan(self.pattern, n, self.block, heads, mode=mode)
        return self._at_length[key]

    def _packed_mode(self, heads: int) -> str:
        """The strategy of every packed batch: the plan mode asked for, or
        under "auto" the planner's choice at ``_PACKED_REFERENCE_REACH``
        times the reach and ``_PACKED_REFERENCE_BLOCKS`` blocks. The cost
        model's choice changes with the length (strided(128) runs natural
        order up to 1024 tokens and planned from 2048), and a batch whose
        longest sequence crossed that line would compile the other
        strategy's kernels."""
        if self.mode != "auto":
            return self.mode
        key = ("mode", heads)
        if key not in self._at_length:
            mode = "natural"  # natural order at every length unless some term reorders
            if reorders(self.pattern, heads):
                reference = max(_PACKED_REFERENCE_REACH * _reach(self.pattern), _PACKED_REFERENCE_BLOCKS * self.block)
                mode = "planned" if self.plan(_power_of_two(reference), heads).strategy == "planned" else "natural"
            self._at_length[key] = mode
        return self._at_length[key]

    def _inner_of(self, comp, heads: int):
        """The kernels' attention of a component's predicate (the same at every
        length, unlike its slot pattern): one per predicate, so no batch loads kernels anew."""
        key = (comp.predicate, heads)
        if key not in self._packed_inner:
            self._packed_inner[key] = self.make_inner(comp, heads)
        return self._packed_inner[key]

    def component_at(self, comp, n: int):
        key = (comp.pattern, comp.q_order, comp.k_order, comp.layout.heads, n)
        if key not in self._at_length:
            self._at_length[key] = component_at(comp, n, self.block)
        return self._at_length[key]

    def _packed_by_length(self, q, k, v, offsets: np.ndarray, scale, terms: ScoreTerms):
        """o, lse of a packed batch of a pattern that depends on n: the
        sequences of each distinct length as one batch ``[G, H, n, D]``
        through the plain call, then back in token order (autograd through
        the gathers and the concatenation)."""
        lengths = np.diff(offsets)
        parts = {}
        for n in np.unique(lengths[lengths > 0]):
            seqs = np.flatnonzero(lengths == n)
            index = torch.as_tensor(np.concatenate([np.arange(offsets[s], offsets[s] + n) for s in seqs]),
                                    device=q.device)

            def group(x):  # [1, h, G * n, D] -> [G, h, n, D]
                return x.index_select(2, index).reshape(x.shape[1], seqs.size, int(n), x.shape[3]).transpose(0, 1)

            o, lse = self(group(q), group(k), group(v), scale=scale, return_lse=True, **_term_kwargs(terms))
            for g, s in enumerate(seqs):
                parts[s] = (o[g:g + 1], lse[g:g + 1])
        order = [s for s in range(lengths.size) if lengths[s] > 0]
        return torch.cat([parts[s][0] for s in order], dim=2), torch.cat([parts[s][1] for s in order], dim=2)


def _power_of_two(n: int) -> int:
    """The power of two at or above ``n`` (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _reach(pattern: ir.Pattern) -> int:
    """Twice the largest integer the pattern is written with (a primitive's
    argument or a constant of a ``where``): the length from which each of its
    terms has its shape at every longer length (stride(l) reaches a key
    outside local(l) from l + 1 tokens on; summary(l, c) fills its first
    column block from l on)."""
    ints = [1]
    for node in ir.walk(pattern):
        if type(node) in ir.PRIMITIVE_NAMES:
            ints += [a for a in ir.args_of(node) if isinstance(a, int)]
        elif isinstance(node, ir.Where):
            stack = [node.cond]
            while stack:
                e = stack.pop()
                ints += [abs(e.value)] if isinstance(e, ir.Const) else []
                stack.extend(ir.expr_children(e))
    return 2 * max(ints)


class _PlanStandIns:
    """A planned call's stand-in launches (``standin.py``): the whole
    pattern's in natural order, one launch, whose kernels any earlier
    stand-in call compiled; where that bitmap is over the limits (a planned
    strided or fixed from about 16K tokens, whose natural layout is mostly
    PARTIAL blocks), one per component of a plan that reorders tokens, over
    the component's own layout and slots in its token order, through the
    same bitmap kernels: its blocks are mostly FULL there (strided(128) at
    n = 65536: bitmaps of 5.0 and 4.5 MiB, mostly the codes of 1024 x 1024
    blocks, built in 72 ms on a 2-CPU machine)."""

    def __init__(self, natural: StandIns, runs):
        self.natural = natural
        self.runs = runs

    def launches(self, q, k) -> list | None:
        mine = self.natural.launches(q, k)
        if mine is not None or not any(run.component.reordered for run in self.runs):
            return mine
        n, *shape = launch_key(q, k)
        mine = []
        for run in self.runs:
            inner = run.attn._standins
            made = None if inner is None else inner.run(run.slots, *shape)
            if made is None:
                return None
            mine.append((made, SlotOrder.of(run.component.q_order, run.component.k_order, n)))
        return mine


def length_free(pattern: ir.Pattern) -> bool:
    """Whether a pattern's mask at length m is the top-left m x m of its mask
    at any longer length: no ``n`` in its arguments or conditions, no
    ``random`` (its tables are drawn per length)."""
    return not ir.uses_n(pattern) and not any(isinstance(node, ir.Random) for node in ir.walk(pattern))

