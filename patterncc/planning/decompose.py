"""Decomposition: a pattern as disjoint pieces, each with the token orders that make it block-dense.

A pattern is expanded into a union of terms (intersections, maybe minus
something); each term takes the orders its factors' hints ask for
(``Primitive.order_hint``: residue order for ``stride``/``dilated``,
gathered columns for ``summary``, natural order otherwise); the terms of one
order are unioned, and each group keeps only what no group before it holds
(``A | B`` -> ``A``, ``B - A``), per head.
"""

from __future__ import annotations

from .. import ir
from ..orders import NATURAL, TokenOrder
from ..simplify import simplify

# Above this many terms the union-of-intersections expansion stops and the
# pattern is kept whole (the expansion is a product over intersections).
MAX_TERMS = 16


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
    hints = [(TokenOrder.of(h[0]), TokenOrder.of(h[1])) for f in _factors(term)
             if isinstance(f, ir.Primitive) and (h := f.order_hint()) is not None]
    hints.sort(key=lambda h: not h[0].reordered)  # stable: residue hints first, in factor order
    return hints[0] if hints else (NATURAL, NATURAL)


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
    keys = sorted(groups, key=lambda o: (o[0].reordered or o[1].reordered, str(o)))
    pieces, before = {}, None
    for key in keys:
        union = groups[key][0]
        for t in groups[key][1:]:
            union = union | t
        piece = union if before is None else union - before
        pieces[key] = simplify(piece)
        before = union if before is None else before | union
    return {k: v for k, v in pieces.items() if not isinstance(v, ir.Empty)}


# -- 2. pieces per head, grouped by order ---------------------------------------------
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



def _per_head(per_head: list[ir.Pattern]) -> ir.Pattern:
    if all(p == per_head[0] for p in per_head):
        return per_head[0]
    ranges, start = [], 0
    for h in range(1, len(per_head) + 1):
        if h == len(per_head) or per_head[h] != per_head[start]:
            ranges.append(ir.HeadRange(start, h, per_head[start]))
            start = h
    return ir.Heads(tuple(ranges))
