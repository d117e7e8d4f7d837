"""Reordering: a piece of a pattern over the slots of its token orders, and its layout there.

A component runs its piece with the kernels walking slots (``orders``): its
*slot pattern* is the piece with ``q`` and ``k`` read as the slots'
positions, which is what its layout is built from; its *kernel pattern* is
the same over the kernels' runtime ``n`` (the slot count), so that one
generated module serves every length. Residue order rewrites rules of
``q - k`` directly (``stride(l)`` becomes ``block(S)``); every other rule is
rewritten through its ``where`` condition. Gathered columns get their layout
in closed form (``planning.columns``).
"""

from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..blocklayout import build as build_layout
from ..orders import Columns, Residue, TokenOrder
from .columns import columns_layout
from .model import Component


def slot_pattern_of(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, padding: bool = True) -> ir.Pattern:
    """A reordered piece over slots at ``n`` tokens (``Component.slot_pattern``);
    ``padding=False`` leaves out the tests that keep padding slots out (for
    a caller that masks slots past the tokens itself): the pattern then
    depends on ``n`` only through the class size ``S = ceil(n / l)``."""
    return _slot_patterns(piece, qo, ko, n, padding)[0]


def _slot_patterns(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, padding: bool = True) -> tuple:
    """``(slot_pattern, kernel_pattern, reason)`` of a reordered piece at ``n``
    tokens: in residue order on both sides, or with the keys gathered and
    the queries in natural order (the pairs ``order_hint`` gives)."""
    if isinstance(qo, Residue):
        return _residue_slots(piece, qo, ko, n, padding)
    if isinstance(ko, Columns) and not qo.reordered:
        return _column_slots(piece, ko, n)
    raise AssertionError(f"no slot pattern for queries in {qo} and keys in {ko} order")


def _residue_slots(piece: ir.Pattern, qo: Residue, ko: Residue, n: int, padding: bool) -> tuple:
    """``_slot_patterns`` in residue order: the pairs of one residue class,
    where ``q - k = (tq - tk) * l``."""
    l, S = qo.l, qo.classes(n)
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
        translated = _translate_where(piece, qo.position_expr("q", S), ko.position_expr("k", S), n)
        kernel_pattern = same_class & _translate_where(piece, qo.position_expr("q", S_runtime),
                                                       ko.position_expr("k", S_runtime), n)
    slot_pattern = ir.Block(S) & translated
    if slots > n and padding:  # padding slots: the tails of the residue classes that end early
        slot_pattern = slot_pattern & _inside(qo, "q", n) & _inside(ko, "k", n)
    reason = f"residue order: stride({l}) becomes block({S}), each residue class contiguous"
    return slot_pattern, kernel_pattern, reason


def _column_slots(piece: ir.Pattern, ko: Columns, n: int) -> tuple:
    """``_slot_patterns`` with the keys gathered: key slots past the last
    gathered token hold none."""
    keys = ko.filled(n)
    kernel_pattern = _translate_where(piece, None, ko.position_expr("k", None), n)
    slot_pattern = kernel_pattern & ir.Where(ir.Compare("<", ir.Var("k"), ir.Const(keys)))
    reason = f"gathered columns: only the {keys} keys of summary({ko.l}, {ko.c}) are read"
    return slot_pattern, kernel_pattern, reason


def _component(piece: ir.Pattern, qo: TokenOrder, ko: TokenOrder, n: int, block: int, H: int) -> Component:
    if not (qo.reordered or ko.reordered):
        return Component(piece, qo, ko, piece, build_layout(piece, n, block, H), "natural order: a band or blocks")
    slot_pattern, kernel_pattern, reason = _slot_patterns(piece, qo, ko, n)
    if isinstance(ko, Columns):  # in closed form: no element evaluated
        lay = columns_layout(piece, slot_pattern, ko, n, block, H)
    else:
        lay = build_layout(slot_pattern, qo.length(n), block, H)
    return Component(piece, qo, ko, slot_pattern, lay, reason, kernel_pattern)


def _inside(order: TokenOrder, var: str, n: int) -> ir.Pattern:
    """Slot ``var`` holds a token (is not padding)."""
    return ir.Where(ir.Compare("<", order.position_expr(var, order.classes(n)), ir.Const(n)))


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
