"""The planner: run a pattern at its true sparsity, not its block density.

In natural token order the Sparse Transformer's own patterns are not block
sparse: ``stride(128)`` and ``summary(128, 32)`` put an allowed element in
every 128 x 128 causal tile. The planner

1. splits the pattern into a union of terms and groups them into disjoint
   components (``A | B`` -> ``A``, ``B - A``), per head;
2. gives each component the token order that makes it block-dense
   (``patterncc.orders``): residue order for a term with ``stride(l)`` (or
   ``dilated(w, l)``), so that ``stride(l)`` becomes ``block(S)``; gathered
   columns for a term with ``summary(l, c)``, its keys alone; natural order
   for bands and blocks (``sink``/``global`` columns and ``global`` rows are
   contiguous runs already, so natural order gathers them);
3. builds each component's layout in its own order (the kernels map ``t``
   back to ``p`` in their address arithmetic: every order here is a closed
   form);
4. compares, with a cost model, running the natural layout, the planned
   components, and dense attention (only when the pattern *is* dense:
   ``causal`` or ``all``), and records the choice and the reason.

Its parts: ``orders`` (the token orders), ``planning.model`` (``Plan``,
``Component`` and the cost model), ``planning.decompose`` (step 1 and each
piece's orders), ``planning.reorder`` (step 3, with gathered columns' closed
form in ``planning.columns``). This module drives them, and every name
callers use is importable from here.
"""

from __future__ import annotations

from . import ir
from .blocklayout import build as build_layout, estimate_blocks
from .errors import LimitError, PatternValueError
from .orders import NATURAL, TokenOrder  # noqa: F401  (re-exported)
from .planning.decompose import MAX_TERMS, _by_order, _order_of, _pieces, pieces  # noqa: F401
from .planning.model import (  # noqa: F401  (re-exported)
    COST_COLUMNS, COST_DENSE_FLASH, COST_FULL, COST_PARTIAL, COST_PASS_PER_ROW, COST_RESIDUE, Component, Plan,
)
from .planning.reorder import _component, as_condition, component_at, slot_pattern_of  # noqa: F401

# The layout block a compiled attention plans at unless ``block`` or ``config``
# says otherwise, and so the default of ``pcc.layout``, ``pcc.plan`` and
# ``patterncc explain``: what they show is what ``pcc.compile`` runs. Why 64:
# ``backends/triton/config.py``'s docstring.
DEFAULT_BLOCK = 64

# The natural layout is not built when its upper bound is over this many
# times the planned blocks and over SKIP_NATURAL_MIN blocks (the bound is
# an intersection's sparsest part: tight for strided and fixed).
SKIP_NATURAL_RATIO = 2
SKIP_NATURAL_MIN = 2**20


def build_plan(p: ir.Pattern, seq_len: int, block: int, heads: int = 1, *, mode: str = "auto") -> Plan:
    """Plan ``p`` at ``seq_len`` tokens. ``mode``: ``"auto"`` (the cost model
    decides), ``"natural"`` (never reorder) or ``"planned"`` (always use the
    components when there is more than one)."""
    if mode not in ("auto", "natural", "planned"):
        raise PatternValueError(f"plan mode must be 'auto', 'natural' or 'planned', got {mode=}")
    p = ir.split_terms(p)[0]  # score terms never change which pairs attend
    ir.check_heads(p, heads)
    bound = ir.bind(p, seq_len)
    H = heads if ir.depends_on_head(bound) else 1

    pieces = _pieces(bound, H)
    reordered = any(o != (NATURAL, NATURAL) for ps in pieces for o in ps)
    refused = None
    try:
        planned = _components(pieces, seq_len, block, H) if reordered and mode != "natural" else None
    except LimitError as err:  # a component's slot layout is too costly to build: run natural order
        planned, refused = None, str(err).splitlines()[0]
    planned = planned or None  # every component empty: the natural run gives zeros and -inf
    planned_blocks = sum(c.blocks for c in planned) if planned else 0

    # The natural layout of a strided or fixed pattern is block-dense (every
    # causal tile): when even an upper bound shows the components are far
    # cheaper, it is not built at all (at 1M tokens it is 33M blocks).
    natural_bound = estimate_blocks(bound, seq_len, block, heads)
    natural = None
    if planned is None or natural_bound <= max(SKIP_NATURAL_RATIO * planned_blocks, SKIP_NATURAL_MIN):
        natural = Component(bound, NATURAL, NATURAL, bound, build_layout(bound, seq_len, block, heads), "the pattern as written")
    natural_blocks = natural.layout.nnz if natural else natural_bound
    costs = {"natural": natural.cost() if natural else COST_PARTIAL * natural_bound}

    dense = _is_dense(bound)
    if dense:
        costs["dense"] = COST_DENSE_FLASH * natural_blocks
    if planned is not None:
        costs["planned"] = sum(c.cost() for c in planned)

    strategy, reason = _choose(costs, mode, dense, planned, natural_blocks)
    if refused:
        reason = f"the reordered components were refused ({refused})"
    components = tuple(planned) if strategy == "planned" else (natural,)
    return Plan(bound, seq_len, block, heads, strategy, components, natural_blocks, natural is not None, costs, reason)


def reorders(p: ir.Pattern, heads: int = 1) -> bool:
    """Whether some term of ``p`` runs in another token order, so that the
    planner has components to weigh against natural order (at any length: a
    pattern that does not use n)."""
    p = ir.split_terms(p)[0]
    bound = ir.bind(p, 1 << 20)
    H = heads if ir.depends_on_head(bound) else 1
    return any(o != (NATURAL, NATURAL) for ps in _pieces(bound, H) for o in ps)


def _choose(costs: dict, mode: str, dense: bool, planned, natural_blocks: int) -> tuple[str, str]:
    if planned is None:
        why = "planning is off" if mode == "natural" else "no component needs another token order"
        if dense and mode != "natural":
            if costs["dense"] < costs["natural"]:
                return "dense", f"the pattern is dense attention and SDPA flash is predicted cheaper; {why}"
            return "natural", (f"the pattern is dense attention, and the generated kernels are predicted "
                               f"cheaper than SDPA flash ({costs['natural'] / costs['dense']:.2f}x its cost); {why}")
        return "natural", why
    if mode == "planned":
        return "planned", "planning forced on"
    ratio = costs["natural"] / max(costs["planned"], 1e-9)
    if min(costs, key=costs.get) == "planned":
        return "planned", (
            f"the components compute {sum(c.blocks for c in planned)} blocks against "
            f"{natural_blocks} in natural order: predicted {ratio:.1f}x cheaper"
        )
    return "natural", f"natural order is predicted cheaper ({1 / ratio:.2f}x the planned cost)"


def _is_dense(p: ir.Pattern) -> bool:
    return isinstance(p, (ir.Causal, ir.All))


def _components(pieces: list[dict], n: int, block: int, H: int) -> list[Component]:
    """The non-empty components of each order's piece, with their layouts."""
    out = []
    for order, piece in _by_order(pieces, H):
        comp = _component(piece, order[0], order[1], n, block, H)
        if comp.layout.nnz:
            out.append(comp)
    return out
