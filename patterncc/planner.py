"""The planner: run a pattern at its true sparsity, not its block density.

In natural token order the Sparse Transformer's own patterns are not block
sparse: ``stride(128)`` and ``summary(128, 32)`` put an allowed element in
every 128 x 128 causal tile. The planner

1. splits the pattern into a union of terms and groups them into disjoint
   components (``A | B`` -> ``A``, ``B - A``), per head;
2. gives each component the token order that makes it block-dense:
   - ``residue(l)`` for a term with ``stride(l)`` (or ``dilated(w, l)``):
     token ``p`` sits at ``t = (p % l) * S + p // l`` with ``S = ceil(n / l)``,
     so tokens of one residue class are contiguous and ``stride(l)`` becomes
     ``block(S)``;
   - ``columns(l, c)`` for a term with ``summary(l, c)``: keys are gathered,
     ``t -> p = (t // c) * l + (l - c) + t % c``, queries stay in order;
   - natural order for bands and blocks (``sink``/``global`` columns and
     ``global`` rows are contiguous runs already, so natural order gathers them);
3. builds each component's layout in its own order (the kernels map ``t``
   back to ``p`` in their address arithmetic: every order here is a closed
   form);
4. compares, with a cost model, running the natural layout, the planned
   components, and dense attention (only when the pattern *is* dense:
   ``causal`` or ``all``), and records the choice and the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from . import ir
from .errors import LimitError, PatternValueError
from .blocklayout import (EMPTY, FULL, PARTIAL, BlockLayout, HeadCSR, build as build_layout, check_entries,
                          classify_rectangles, estimate_blocks, head_csr, run_offsets, run_ranges)
from .blocklayout import from_heads as layouts_from_heads
from .simplify import simplify

# The layout block a compiled attention plans at unless ``block`` or ``config``
# says otherwise, and so the default of ``pcc.layout``, ``pcc.plan`` and
# ``patterncc explain``: what they show is what ``pcc.compile`` runs. Why 64:
# ``backends/triton/config.py``'s docstring.
DEFAULT_BLOCK = 64

# Above this many terms the union-of-intersections expansion stops and the
# pattern is kept whole (the expansion is a product over intersections).
MAX_TERMS = 16

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

# The natural layout is not built when its upper bound is over this many
# times the planned blocks and over SKIP_NATURAL_MIN blocks (the bound is
# an intersection's sparsest part: tight for strided and fixed).
SKIP_NATURAL_RATIO = 2
SKIP_NATURAL_MIN = 2**20


# ----------------------------------------------------------------------------
# Token orders
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenOrder:
    """How a component's kernel index ``t`` maps to a token position ``p``.

    - ``natural``: ``p = t``, ``n`` slots;
    - ``residue(l)``: ``p = (t % S) * l + t // S`` with ``S = ceil(n / l)``,
      ``l * S`` slots (slots with ``p >= n`` are padding);
    - ``columns(l, c)``: ``p = (t // c) * l + (l - c) + t % c``,
      ``c * ceil(n / l)`` slots (the last ``c`` of every run of ``l``).
    """

    kind: str = "natural"
    l: int = 1
    c: int = 0

    # the kernels' code of each kind (their ORDER constexprs, ``kernels._token``)
    CODES = {"natural": 0, "residue": 1, "columns": 2}

    @property
    def code(self) -> int:
        return self.CODES[self.kind]

    def classes(self, n):
        """``S = ceil(n / l)``: the slots per residue class (the kernels'
        ORD_S) and the runs of ``l`` gathered from; ``n`` an int or an int array."""
        return -(-n // max(1, self.l))

    def length(self, n):
        """The slots of ``n`` tokens (``n`` an int or an int array)."""
        if self.kind == "residue":
            return self.l * self.classes(n)
        if self.kind == "columns":
            return self.c * self.classes(n)
        return n

    def positions(self, t: np.ndarray, n: int) -> np.ndarray:
        """int64 token positions of slots ``t``; ``-1`` for padding slots."""
        t = np.asarray(t, dtype=np.int64)
        if self.kind == "residue":
            S = -(-n // self.l)
            p = (t % S) * self.l + t // S
        elif self.kind == "columns":
            p = (t // self.c) * self.l + (self.l - self.c) + t % self.c
        else:
            p = t
        return np.where(p < n, p, -1)

    def __str__(self) -> str:
        if self.kind == "residue":
            return f"residue({self.l})"
        if self.kind == "columns":
            return f"columns({self.l}, {self.c})"
        return "natural"

    def formula(self) -> str:
        if self.kind == "residue":
            return f"p = (t % S) * {self.l} + t // S, S = ceil(n / {self.l})"
        if self.kind == "columns":
            return f"p = (t // {self.c}) * {self.l} + {self.l - self.c} + t % {self.c}"
        return "p = t"


NATURAL = TokenOrder()


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------


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
    is sound (``_columns_layout``: some EMPTY or FULL blocks may be PARTIAL).
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
        return self.q_order.kind != "natural" or self.k_order.kind != "natural"

    @property
    def blocks(self) -> int:
        return self.layout.nnz

    def cost(self) -> float:
        full = self.layout.n_full
        partial = self.layout.nnz - full
        blocks = COST_FULL * full + COST_PARTIAL * partial
        if "residue" in (self.q_order.kind, self.k_order.kind):
            blocks *= COST_RESIDUE
        elif "columns" in (self.q_order.kind, self.k_order.kind):
            blocks *= COST_COLUMNS
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


# ----------------------------------------------------------------------------
# Building a plan
# ----------------------------------------------------------------------------


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
    reorders = any(o != (NATURAL, NATURAL) for ps in pieces for o in ps)
    refused = None
    try:
        planned = _components(pieces, seq_len, block, H) if reorders and mode != "natural" else None
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


# -- 1. terms ---------------------------------------------------------------------


def _expand(p: ir.Pattern) -> list[ir.Pattern]:
    """A union of terms equal to ``p``; each term an intersection (maybe minus
    something). Stops expanding where the product would exceed MAX_TERMS."""
    if isinstance(p, ir.Union):
        out = [t for part in p.parts for t in _expand(part)]
        return out if len(out) <= MAX_TERMS else [p]
    if isinstance(p, ir.Intersect):
        terms: list[ir.Pattern | None] = [None]
        for part in p.parts:
            options = _expand(part)
            terms = [x if t is None else t & x for t in terms for x in options]
            if len(terms) > MAX_TERMS:
                return [p]
        return terms
    if isinstance(p, ir.Difference):
        return [t - p.right for t in _expand(p.left)]
    return [p]


def _factors(term: ir.Pattern) -> tuple[ir.Pattern, ...]:
    """The positive factors of a term (an intersection, maybe minus something)."""
    if isinstance(term, ir.Difference):
        return _factors(term.left)
    if isinstance(term, ir.Intersect):
        return tuple(f for part in term.parts for f in _factors(part))
    return (term,)


def _order_of(term: ir.Pattern, block: int) -> tuple[TokenOrder, TokenOrder]:
    """The (query, key) orders that make a term block-dense: the first factor
    whose hint (``order_hint``) reorders the queries (residue order), else
    the first that reorders the keys alone (gathered columns)."""
    hints = [h for f in _factors(term) if isinstance(f, ir.Primitive) and (h := f.order_hint()) is not None]
    hints.sort(key=lambda h: h[0][0] == "natural")  # stable: residue hints first, in factor order
    if hints:
        qo, ko = hints[0]
        return TokenOrder(*qo), TokenOrder(*ko)
    return NATURAL, NATURAL


def _decompose(p: ir.Pattern) -> dict[tuple[TokenOrder, TokenOrder], ir.Pattern]:
    """Disjoint pieces of a head-free pattern keyed by their orders: natural
    first, then the others, each minus everything before it."""
    # random() is a table, not a rule over positions: it cannot be rewritten
    # over slots, so a pattern holding one runs in natural order.
    if any(isinstance(node, ir.Primitive) and node.TABLE for node in ir.walk(p)):
        return {(NATURAL, NATURAL): p}
    groups: dict[tuple[TokenOrder, TokenOrder], list[ir.Pattern]] = {}
    for term in _expand(p):
        groups.setdefault(_order_of(term, 0), []).append(term)
    keys = sorted(groups, key=lambda o: (o[0].kind != "natural" or o[1].kind != "natural", str(o)))
    pieces, before = {}, None
    for key in keys:
        union = groups[key][0]
        for t in groups[key][1:]:
            union = union | t
        piece = union if before is None else union - before
        pieces[key] = simplify(piece)
        before = union if before is None else before | union
    return {k: v for k, v in pieces.items() if not isinstance(v, ir.Empty)}


# -- 2./3. components and their layouts --------------------------------------------


def _pieces(bound: ir.Pattern, H: int) -> list[dict]:
    """Each layout head's disjoint pieces keyed by their orders."""
    return [_decompose(ir.for_head(bound, h)) for h in range(H)]


def pieces(p: ir.Pattern, seq_len: int, heads: int = 1) -> list[tuple[TokenOrder, TokenOrder, ir.Pattern]]:
    """The pattern's disjoint pieces at ``seq_len`` over token positions, with
    the (query, key) orders that make each block-dense: what the planner's
    components run, without their layouts (decoding builds just the rows it
    reads, ``slot_pattern_of``). A pattern with heads gets one piece per
    order, ``heads { .. }`` over the heads."""
    ir.check_heads(p, heads)
    bound = ir.bind(p, seq_len)
    H = heads if ir.depends_on_head(bound) else 1
    return [(qo, ko, piece) for (qo, ko), piece in _by_order(_pieces(bound, H), H)]


def _by_order(per_head_pieces: list[dict], H: int):
    orders = []
    for ps in per_head_pieces:
        orders += [o for o in ps if o not in orders]
    for order in orders:
        per_head = [ps.get(order, ir.Empty()) for ps in per_head_pieces]
        yield order, per_head[0] if H == 1 else _per_head(per_head)


def _components(pieces: list[dict], n: int, block: int, H: int) -> list[Component]:
    out = []
    for order, piece in _by_order(pieces, H):
        comp = _component(piece, order[0], order[1], n, block, H)
        if comp.layout.nnz:
            out.append(comp)
    return out


def _per_head(per_head: list[ir.Pattern]) -> ir.Pattern:
    if all(p == per_head[0] for p in per_head):
        return per_head[0]
    ranges, start = [], 0
    for h in range(1, len(per_head) + 1):
        if h == len(per_head) or per_head[h] != per_head[start]:
            ranges.append(ir.HeadRange(start, h, per_head[start]))
            start = h
    return ir.Heads(tuple(ranges))


def slot_pattern_of(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, padding: bool = True) -> ir.Pattern:
    """A reordered piece over slots at ``n`` tokens (``Component.slot_pattern``);
    ``padding=False`` leaves out the tests that keep padding slots out (for
    a caller that masks slots past the tokens itself): the pattern then
    depends on ``n`` only through the class size ``S = ceil(n / l)``."""
    return _slot_patterns(piece, qo, ko, n, padding)[0]


def _slot_patterns(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, padding: bool = True) -> tuple:
    """``(slot_pattern, kernel_pattern, reason)`` of a reordered piece at ``n`` tokens."""
    if qo.kind == "residue":
        l, S = qo.l, -(-n // qo.l)
        slots = qo.length(n)
        translated, exact = _translate_residue(piece, l, True)
        # In the kernels, n is the slot count l * S, so S = n // l for every
        # length. Written max(n // l, 1) (the same, as n >= l): a divisor the
        # code generator can see is positive lets it divide in int32 with the
        # native operator instead of an emulated int64 floor division, which
        # cost the residue kernels 5-7x per PARTIAL step (PERFORMANCE.md).
        S_runtime = ir.Call("max", (ir.BinOp("//", ir.Var("n"), ir.Const(l)), ir.Const(1)))
        same_class = ir.Where(ir.Compare("==", ir.BinOp("//", ir.Var("q"), S_runtime),
                                         ir.BinOp("//", ir.Var("k"), S_runtime)))
        if exact:
            kernel_pattern = same_class & translated
        else:  # a node that is not a rule of q - k: rewrite every rule over slot positions
            translated = _translate_where(piece, _position_expr(qo, "q", S), _position_expr(ko, "k", S), n)
            kernel_pattern = same_class & _translate_where(piece, _position_expr(qo, "q", S_runtime),
                                                           _position_expr(ko, "k", S_runtime), n)
        slot_pattern = ir.Block(S) & translated
        if slots > n and padding:  # padding slots: the tails of the residue classes that end early
            slot_pattern = slot_pattern & _inside(qo, "q", n) & _inside(ko, "k", n)
        reason = f"residue order: stride({l}) becomes block({S}), each residue class contiguous"
    else:
        keys = _columns_count(ko, n)
        kernel_pattern = _translate_where(piece, None, _position_expr(ko, "k", None), n)
        slot_pattern = kernel_pattern & ir.Where(ir.Compare("<", ir.Var("k"), ir.Const(keys)))
        reason = f"gathered columns: only the {keys} keys of summary({ko.l}, {ko.c}) are read"
    return slot_pattern, kernel_pattern, reason


def _component(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, block: int, H: int) -> Component:
    if qo.kind == "natural" and ko.kind == "natural":
        return Component(piece, qo, ko, piece, build_layout(piece, n, block, H), "natural order: a band or blocks")
    slot_pattern, kernel_pattern, reason = _slot_patterns(piece, qo, ko, n)
    if qo.kind == "residue":
        lay = build_layout(slot_pattern, qo.length(n), block, H)
    else:
        lay = _columns_layout(piece, slot_pattern, ko, n, block, H)
    return Component(piece, qo, ko, slot_pattern, lay, reason, kernel_pattern)


_COLUMN_RUN = 32  # slot blocks classified together before block by block (_columns_layout)


def _columns_layout(piece: ir.Pattern, slot_pattern: ir.Pattern, order: TokenOrder, n: int, block: int,
                    H: int) -> BlockLayout:
    """The layout of gathered columns, sound but not always exact, in closed
    form: slot block ``j`` holds the summary keys between positions
    ``K(j * block)`` and ``K((j + 1) * block - 1)``, and on those keys the
    piece is the piece with ``summary(l, c)`` read as ``all``. So each (query
    block, slot block) is that pattern's class over a token rectangle
    (``classify_rectangles``): FULL or EMPTY there is FULL or EMPTY on the
    keys, anything undecided PARTIAL (the kernels apply the predicate). No
    element is evaluated, so a million tokens cost seconds, not a refusal.

    At 1M tokens ``fixed(128, 32)`` has 8.4M entries, nearly all FULL, each
    query row a prefix of the slot blocks: ``_prefix_csr`` writes both
    orientations from the rows' lengths without listing the pairs first."""
    l, c, B = order.l, order.c, block
    keys = _columns_count(order, n)
    nb, nu = -(-n // B), -(-keys // B)
    padded = keys % B != 0  # the last slot block runs past the last key: padding slots, never FULL
    plain = ir._map(piece, lambda node: ir.All() if isinstance(node, ir.Summary) and (node.l, node.c) == (l, c)
                    else node)
    rows = np.arange(nb, dtype=np.int64)
    qhi_rows = np.minimum((rows + 1) * B, n) - 1
    if _has_causal_factor(plain):  # slots whose first key is past the row's last query are empty
        reach = (qhi_rows + 1) // l * c + np.maximum(0, (qhi_rows + 1) % l - (l - c))  # summary keys <= qhi
        count = np.clip(-(-reach // B), 0, nu)
    else:
        count = np.full(nb, nu, dtype=np.int64)
    # Classify runs of G slot blocks first: a run FULL or EMPTY as a whole
    # is so block by block (a sound class of a rectangle holds on its parts),
    # and only the runs it cannot decide are classified block by block. At
    # 1M tokens that is ~1/G of the 8.4M rectangles of fixed(128, 32).
    G = _COLUMN_RUN
    runs = -(-count // G)
    run_row = np.repeat(rows, runs)
    j0 = run_offsets(runs) * G
    j1 = np.minimum(j0 + G, count[run_row])  # one past the run's last slot block

    def classify(ph, i, jlo, jhi):  # query row i against slot blocks jlo .. jhi - 1, as a token rectangle
        return classify_rectangles(ph, n, i * B, qhi_rows[i], order.positions(jlo * B, n),
                                   order.positions(np.minimum(jhi * B, keys) - 1, n))

    heads = []
    seen: dict = {}
    for h in range(H):
        ph = ir.for_head(plain, h)
        if ph not in seen:
            pieces = _column_pieces(functools.partial(classify, ph), run_row, j0, j1)
            csr = _prefix_csr(*pieces, nb, nu, padded)
            seen[ph] = csr if csr is not None else _pieces_csr(*pieces, nb, nu, padded)
        heads.append(seen[ph])
    return layouts_from_heads(slot_pattern, n, B, heads)


def _column_pieces(classify, run_row, j0, j1):
    """One head's non-empty slot blocks as pieces ``(row, start, length,
    cls)`` (int64 ``[P]``, ``cls`` int8) in (row, start) order, every block
    of a piece of class ``cls``: a run classified FULL whole, or one block of
    a run that could not be decided whole (so PARTIAL pieces are single blocks)."""
    run_cls = classify(run_row, j0, j1)
    undecided = run_cls == PARTIAL
    split = np.where(undecided, j1 - j0, 1)  # pieces per run
    run = np.repeat(np.arange(run_cls.size), split)
    start = j0[run] + run_offsets(split)
    length = np.where(undecided, 1, j1 - j0)[run]
    row, cls, single = run_row[run], run_cls[run], undecided[run]
    cls[single] = classify(row[single], start[single], start[single] + 1)
    keep = cls != EMPTY
    return row[keep], start[keep], length[keep], cls[keep]


def _prefix_csr(row, start, length, cls, nb: int, nu: int, padded: bool) -> HeadCSR | None:
    """Both orientations in closed form when every query row ``i`` holds the
    slot blocks ``0 .. m[i] - 1`` and ``m`` never decreases (a causal piece:
    later rows reach more summary keys); None otherwise.

    Then key block ``j`` is held by the rows ``first[j] .. nb - 1``, the
    rows whose ``m`` exceeds ``j``, so both index arrays are runs of
    consecutive numbers (``run_ranges``: no sort, no temporary as large as
    the layout), and both flag arrays are True but at the few PARTIAL
    blocks, which are written where each orientation puts them."""
    end = start + length
    row_begins = np.diff(row, prepend=-1) != 0
    # each piece starts where the one before it ends, or at 0 where a row begins
    if not np.array_equal(start, np.where(row_begins, 0, np.roll(end, 1))):
        return None
    m = np.zeros(nb, dtype=np.int64)  # slot blocks per query row
    row_ends = np.diff(row, append=nb) != 0
    m[row[row_ends]] = end[row_ends]
    if np.any(m[1:] < m[:-1]):
        return None
    nnz = int(m.sum())
    check_entries(nnz)  # before allocating what would not fit
    first = np.searchsorted(m, np.arange(nb), side="right")  # [nb]: the first row holding key block j
    kv_ptr, q_ptr = np.zeros(nb + 1, dtype=np.int64), np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(m, out=kv_ptr[1:])
    np.cumsum(nb - first, out=q_ptr[1:])
    kv_idx = run_ranges(0, m, np.int32)
    q_idx = run_ranges(first, nb - first, np.int32)
    kv_full, q_full = np.ones(nnz, dtype=bool), np.ones(nnz, dtype=bool)
    partial = cls == PARTIAL
    i = np.repeat(row[partial], length[partial])
    j = run_ranges(start[partial], length[partial])
    kv_full[kv_ptr[i] + j] = False
    q_full[q_ptr[j] + (i - first[j])] = False
    if padded:  # the last slot block, held by the rows that reach it
        kv_full[kv_ptr[1:][m == nu] - 1] = False
        q_full[q_ptr[nu - 1]:q_ptr[nu]] = False
    return HeadCSR(kv_ptr, kv_idx, kv_full, q_ptr, q_idx, q_full)


def _pieces_csr(row, start, length, cls, nb: int, nu: int, padded: bool) -> HeadCSR:
    """Both orientations for any pieces: list every (row, slot block) pair,
    then sort them by slot block (``head_csr``)."""
    i = np.repeat(row.astype(np.int32), length)
    j = run_ranges(start, length, np.int32)
    full = np.repeat(cls == FULL, length)
    if padded:
        full[j == nu - 1] = False
    return head_csr(i, j, full, nb)


def _has_causal_factor(p: ir.Pattern) -> bool:
    """True when every head's pattern lies inside ``causal`` by its structure."""
    match p:
        case ir.Causal():
            return True
        case ir.Intersect(parts=parts):
            return any(_has_causal_factor(x) for x in parts)
        case ir.Difference(left=a):
            return _has_causal_factor(a)
        case ir.Heads(ranges=ranges):
            return all(_has_causal_factor(r.pattern) for r in ranges)
    return False


def _position_expr(order: TokenOrder, var: str, S) -> ir.Expr:
    """The token position of slot ``var`` in ``order``, as an expression;
    ``S`` is the residue class size (an int, or an expression over ``n``)."""
    t = ir.Var(var)
    if order.kind == "residue":
        if isinstance(S, int):
            return ir.BinOp("+", ir.BinOp("*", ir.BinOp("%", t, ir.Const(S)), ir.Const(order.l)),
                            ir.BinOp("//", t, ir.Const(S)))
        # Over the kernels' runtime S: t // S <= l - 1 for every slot t < l * S,
        # written min(t // S, l - 1) so that the code generator can bound the
        # position below 2**31 and compute it in int32 (with native division).
        cls = ir.Call("min", (ir.BinOp("//", t, S), ir.Const(order.l - 1)))
        return ir.BinOp("+", ir.BinOp("*", ir.BinOp("%", t, S), ir.Const(order.l)), cls)
    if order.kind == "columns":
        l, c = order.l, order.c
        return ir.BinOp("+", ir.BinOp("+", ir.BinOp("*", ir.BinOp("//", t, ir.Const(c)), ir.Const(l)), ir.Const(l - c)),
                        ir.BinOp("%", t, ir.Const(c)))
    return t


def _inside(order: TokenOrder, var: str, n: int) -> ir.Pattern:
    return ir.Where(ir.Compare("<", _position_expr(order, var, -(-n // order.l)), ir.Const(n)))


def _columns_count(order: TokenOrder, n: int) -> int:
    """Key slots whose position is inside the sequence: the summary keys
    ``k < n``, which come first in slot order."""
    l, c = order.l, order.c
    return (n // l) * c + max(0, n % l - (l - c))


def _translate_residue(p: ir.Pattern, l: int, positive: bool) -> tuple[ir.Pattern, bool]:
    """The pattern over residue slots, for pairs in the same residue class
    (where ``q - k = (tq - tk) * l``). Exact for primitives of ``q - k``; any
    other node becomes ``all`` where it counts positively and ``none`` where
    it counts negatively, a superset either way (then ``exact`` is False)."""
    match p:
        case ir.Primitive() if (done := p.over_residues(l, positive)) is not None:
            return done
        case ir.Union(parts=parts) | ir.Intersect(parts=parts):
            done = [_translate_residue(x, l, positive) for x in parts]
            return type(p)(tuple(d[0] for d in done)), all(d[1] for d in done)
        case ir.Difference(left=a, right=b):
            (ta, ea), (tb, eb) = _translate_residue(a, l, positive), _translate_residue(b, l, not positive)
            return ta - tb, ea and eb
        case ir.Complement(arg=a):
            ta, ea = _translate_residue(a, l, not positive)
            return ~ta, ea
        case ir.Heads(ranges=ranges):
            done = [_translate_residue(r.pattern, l, positive) for r in ranges]
            return ir.Heads(tuple(replace(r, pattern=d[0]) for r, d in zip(ranges, done))), all(d[1] for d in done)
    return (ir.All() if positive else ir.Empty()), False


def _translate_where(p: ir.Pattern, q_pos: ir.Expr | None, k_pos: ir.Expr | None, n: int) -> ir.Pattern:
    """The pattern over slots: every primitive is rewritten as its ``where``
    rule with ``q`` and ``k`` replaced by the slots' positions (exact; the
    planner never reorders a piece holding ``random``, a table). A rule's
    ``n`` becomes the token count ``n``: over slots, the layout's and the
    kernels' ``n`` is the slot count, which padding makes larger (and the
    position expressions may use it, so it is replaced first)."""

    def rewrite(node: ir.Pattern) -> ir.Pattern:
        cond = as_condition(node)
        if cond is None:
            return node
        cond = ir.substitute(cond, "n", n)
        if k_pos is not None:
            cond = ir.substitute(cond, "k", ir.Var("k_slot"))
        if q_pos is not None:
            cond = ir.substitute(cond, "q", q_pos)
        if k_pos is not None:
            cond = ir.substitute(cond, "k_slot", k_pos)
        return ir.Where(cond)

    return ir._map(p, rewrite)


def as_condition(p: ir.Pattern) -> ir.Expr | None:
    """A primitive's rule as a ``where`` condition (None for combinators and
    ``random``, whose rule is a table)."""
    if isinstance(p, ir.Primitive):
        return p.condition()
    if isinstance(p, ir.Where):
        return p.cond
    return None


def component_at(comp: Component, n: int, block: int) -> Component:
    """``comp``'s piece in the same token orders at another length ``n``: a
    packed batch runs one plan, with each component's layout at each
    sequence's length (the piece must not depend on ``n``)."""
    return _component(comp.pattern, comp.q_order, comp.k_order, n, block, comp.layout.heads)
