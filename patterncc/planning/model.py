"""The plan and its cost model: what the planner decides, and how it prices it.

A ``Plan`` lists the ``Component``s the kernels run at one length, each a
disjoint piece of the pattern in its own token order (``patterncc.orders``)
with its layout over slots; the cost model predicts each strategy's time in
units of one FULL block pair, so that ``planner.build_plan`` can choose.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ir
from ..blocklayout import BlockLayout
from ..orders import Columns, Residue, TokenOrder

# -- the cost model --------------------------------------------------------------
# Costs are in units of one FULL block pair computed forward and backward,
# fitted to per-launch times of the Triton kernels on the GPU (block 64,
# H = 16, bf16, D = 64; bench/profile_plan.py, PERFORMANCE.md "The cost
# model"): a FULL block on a long row costs 0.24 us (forward + dK/dV + dQ); a
# PARTIAL one also evaluates the predicate; every query-block row of every
# component pays for loading its queries, storing its output, filling the
# software pipeline and its share of the merge, which is what makes short
# rows (bands, residue classes) dear per block. Blocks in residue order read
# K and V rows 128 bytes at a time from addresses l rows apart: they
# measured 2.6-3.5x the natural cost while their predicate divided in
# int64, and 1.6-1.7x since it divides in int32 (gpu_check.sh profile:
# bench/results/2026-11-28-h200-profile-residue/profile.log,
# relative to the natural component of the same plan, which the model
# over-predicts by 15-22% since the kernels walk runs); gathered columns
# (runs of c keys) 1.0-1.1x.
COST_FULL = 1.0
COST_PARTIAL = 1.6
COST_RESIDUE = 1.7            # multiplier for the blocks of a residue-order component
COST_COLUMNS = 1.1            # multiplier for the blocks of a gathered-columns component
COST_PASS_PER_ROW = 2.7       # per component, per query-block row (prologue, epilogue, merge)
COST_DENSE_FLASH = 1.2        # SDPA flash per causal block, relative to our causal kernel
# the multiplier of a component's blocks by the orders it runs in (natural: 1)
COST_ORDER = {Residue: COST_RESIDUE, Columns: COST_COLUMNS}


@dataclass(frozen=True, eq=False)
class Component:
    """One disjoint piece of the pattern, run in its own token order.

    ``pattern`` is the piece over token positions. ``slot_pattern`` is the
    same piece over slots: ``(tq, tk)`` is allowed when the positions of
    slot ``tq`` of ``q_order`` and slot ``tk`` of ``k_order`` are (padding
    slots never are). The kernels run ``slot_pattern`` with the slots mapped
    to tokens in their address arithmetic; ``layout`` is its BlockLayout,
    ``layout.seq_len`` slots a side (keys gathered into fewer slots are
    padded to the query count): exact, except for gathered columns, where it
    is sound (``planning.columns``: some EMPTY or FULL blocks may be PARTIAL).
    ``predicate`` is what the kernels evaluate (see there).
    """

    pattern: ir.Pattern
    q_order: TokenOrder
    k_order: TokenOrder
    slot_pattern: ir.Pattern
    layout: BlockLayout
    reason: str
    kernel_pattern: ir.Pattern | None = None

    @property
    def predicate(self) -> ir.Pattern:
        """What the kernels evaluate on PARTIAL blocks: ``kernel_pattern``, the
        slot pattern with its length-specific parts written over the kernels'
        runtime ``n`` (the slot count) and without the padding tests (the
        kernels mask slots past the tokens themselves). It is the same for
        every length, so kernels are generated once."""
        return self.kernel_pattern if self.kernel_pattern is not None else self.slot_pattern

    @property
    def reordered(self) -> bool:
        return self.q_order.reordered or self.k_order.reordered

    @property
    def blocks(self) -> int:
        return self.layout.nnz

    def cost(self) -> float:
        full = self.layout.n_full
        partial = self.layout.nnz - full
        blocks = COST_FULL * full + COST_PARTIAL * partial
        blocks *= max(COST_ORDER.get(type(order), 1.0) for order in (self.q_order, self.k_order))
        return blocks + COST_PASS_PER_ROW * self.layout.heads * self.layout.n_qblocks


@dataclass(frozen=True, eq=False)
class Plan:
    """How a pattern runs at one length.

    ``strategy`` is ``"natural"`` (one component: the pattern in natural
    order), ``"planned"`` (several components in their own orders, merged by
    log-sum-exp) or ``"dense"`` (the pattern is ``causal`` or ``all``: dense
    flash attention). ``components`` always lists what the kernels run (for
    ``dense``, the natural component, which the Triton backend may replace by
    SDPA). ``computed_blocks`` is the total of their non-empty blocks;
    ``natural_blocks`` what natural order alone computes (an upper bound when
    ``natural_built`` is False: the natural layout was too dense to be worth
    building); ``costs`` the cost model's prediction per strategy.
    """

    pattern: ir.Pattern
    seq_len: int
    block: int
    heads: int
    strategy: str
    components: tuple[Component, ...]
    natural_blocks: int
    natural_built: bool
    costs: dict
    reason: str

    @property
    def computed_blocks(self) -> int:
        return sum(c.blocks for c in self.components)

    def describe(self) -> str:
        n, B = self.seq_len, self.block
        causal_blocks = self.heads_effective * _causal_blocks(n, B)
        lines = [
            f"plan for {self.pattern}",
            f"  n = {n}, block = {B}, heads = {self.heads}: strategy {self.strategy!r}",
            f"  computed blocks: {self.computed_blocks} "
            f"({self.computed_blocks / max(1, causal_blocks):.2%} of causal attention's {causal_blocks}); "
            f"natural order alone: {'' if self.natural_built else 'at most '}{self.natural_blocks} "
            f"({self.natural_blocks / max(1, causal_blocks):.2%})",
            "  predicted cost (full-block units): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in self.costs.items()),
            f"  why: {self.reason}",
        ]
        for idx, comp in enumerate(self.components):
            lay = comp.layout
            lines.append(
                f"  component {idx}: {comp.pattern}\n"
                f"    queries in {comp.q_order} order ({comp.q_order.formula()}), "
                f"keys in {comp.k_order} order ({comp.k_order.formula()})\n"
                f"    {lay.nnz} blocks ({lay.n_full} full, {lay.n_partial} partial) over "
                f"{lay.n_qblocks} x {lay.n_kblocks} slots-blocks; {comp.reason}"
            )
        return "\n".join(lines)

    @property
    def heads_effective(self) -> int:
        return max((c.layout.heads for c in self.components), default=1)

    def __str__(self) -> str:
        return self.describe()


def _causal_blocks(n: int, B: int) -> int:
    nb = -(-n // B)
    return nb * (nb + 1) // 2
