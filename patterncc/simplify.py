"""IR -> IR: algebraic clean-up that never changes what a pattern means.

``simplify(p)`` is pure and idempotent (``simplify(simplify(p)) ==
simplify(p)``). It rebuilds the tree bottom-up, each node through one of the
rewrites below, which assume simplified children and return a simplified
node:

- unions and intersections are flattened, their duplicate parts dropped
  (the first one stays, in order), ``none`` dropped from unions and ``all``
  from intersections; ``all`` in a union gives ``all``, ``none`` in an
  intersection gives ``none``; an empty chain is its identity, one part is
  that part;
- ``~~A`` -> ``A``, ``~all`` -> ``none``, ``~none`` -> ``all``;
- ``A - none`` -> ``A``, ``none - A`` -> ``none``, ``A - all`` -> ``none``,
  ``A - A`` -> ``none``, ``all - A`` -> ``~A``;
- ``cycle(A, A, ...)`` -> ``A``;
- a pattern with score terms (``A with ...``) keeps them on its simplified
  mask ``A`` (and is ``A`` when it has none);
- primitives that are constant for every valid ``n``: ``summary(l, l)`` and
  ``stride(1)`` -> ``all``; ``global(0)``, ``sink(0)`` and ``random(0, b, s)``
  -> ``none``; only with int arguments, so an argument that depends on ``n``
  is still range-checked by ``ir.bind``.

``heads { }`` keeps every range, even when all say the same thing: its
coverage of the head count is still to be checked (``ir.check_heads``).
``where`` conditions are left as written.

Locations stay on every node that survives; a node made by a rewrite takes
the location of the node it replaces. The walk is iterative, and trees deeper
than ``parse.MAX_DEPTH`` (possible only when built in Python) are refused
with ``LimitError`` before anything recurses on them.
"""

from __future__ import annotations

from dataclasses import replace

from . import ir
from .errors import LimitError, Loc
from .parser import MAX_DEPTH


def simplify(p: ir.Pattern) -> ir.Pattern:
    """The simplified equivalent of ``p``."""
    _check_depth(p)
    done: dict[int, ir.Pattern] = {}  # id(node) -> its simplified form
    stack = [p]
    while stack:
        node = stack[-1]
        kids = ir.children(node)
        pending = [c for c in kids if id(c) not in done]
        if pending:
            stack.extend(reversed(pending))
            continue
        stack.pop()
        done[id(node)] = _rewrite(node, [done[id(c)] for c in kids])
    return done[id(p)]


def _rewrite(node: ir.Pattern, kids: list[ir.Pattern]) -> ir.Pattern:
    if isinstance(node, ir.Union):
        return _union(kids, node.loc)
    if isinstance(node, ir.Intersect):
        return _intersect(kids, node.loc)
    if isinstance(node, ir.Complement):
        return _complement(kids[0], node.loc)
    if isinstance(node, ir.Difference):
        return _difference(kids[0], kids[1], node.loc)
    if isinstance(node, ir.Cycle):
        return kids[0] if all(k == kids[0] for k in kids) else _rebuilt(node, parts=tuple(kids))
    if isinstance(node, ir.Heads):
        ranges = tuple(replace(r, pattern=k) if r.pattern is not k else r for r, k in zip(node.ranges, kids))
        return _rebuilt(node, ranges=ranges)
    if isinstance(node, ir.Scored):
        if not node.terms:
            return kids[0]
        return node if kids[0] is node.body else replace(node, body=kids[0])
    return _primitive(node)


def _rebuilt(node: ir.Pattern, **changes: tuple) -> ir.Pattern:
    """``node`` with new children, or ``node`` itself when none changed."""
    if all(len(getattr(node, name)) == len(new) and all(a is b for a, b in zip(getattr(node, name), new))
           for name, new in changes.items()):
        return node
    return replace(node, **changes)


def _flat(kind, parts: list[ir.Pattern]) -> list[ir.Pattern]:
    out: list[ir.Pattern] = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return out


def _union(parts: list[ir.Pattern], loc: Loc | None) -> ir.Pattern:
    parts = _flat(ir.Union, parts)
    if any(isinstance(p, ir.All) for p in parts):
        return ir.All(loc=loc)
    kept = list(dict.fromkeys(p for p in parts if not isinstance(p, ir.Empty)))
    if not kept:
        return ir.Empty(loc=loc)
    return kept[0] if len(kept) == 1 else ir.Union(tuple(kept), loc)


def _intersect(parts: list[ir.Pattern], loc: Loc | None) -> ir.Pattern:
    parts = _flat(ir.Intersect, parts)
    if any(isinstance(p, ir.Empty) for p in parts):
        return ir.Empty(loc=loc)
    kept = list(dict.fromkeys(p for p in parts if not isinstance(p, ir.All)))
    if not kept:
        return ir.All(loc=loc)
    return kept[0] if len(kept) == 1 else ir.Intersect(tuple(kept), loc)


def _complement(a: ir.Pattern, loc: Loc | None) -> ir.Pattern:
    if isinstance(a, ir.Complement):
        return a.arg
    if isinstance(a, ir.All):
        return ir.Empty(loc=loc)
    if isinstance(a, ir.Empty):
        return ir.All(loc=loc)
    return ir.Complement(a, loc)


def _difference(a: ir.Pattern, b: ir.Pattern, loc: Loc | None) -> ir.Pattern:
    if isinstance(b, ir.Empty):
        return a
    if isinstance(a, ir.Empty) or isinstance(b, ir.All) or a == b:
        return ir.Empty(loc=loc)
    if isinstance(a, ir.All):
        return _complement(b, loc)
    return ir.Difference(a, b, loc)


def _primitive(p: ir.Pattern) -> ir.Pattern:
    args = ir.args_of(p) if type(p) in ir.PRIMITIVE_NAMES else ()
    if not args or not all(isinstance(a, int) for a in args):
        return p
    return p.simplified()  # each primitive's own identities (patterncc.primitives)


def _check_depth(p: ir.Pattern) -> None:
    """Refuse trees deeper than MAX_DEPTH (patterns and their expressions).

    Level by level, each shared node once, so it is cheap even on a pattern
    built in Python that reuses one sub-pattern many times."""
    level = {id(p): p}
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            node = next(iter(level.values()))
            raise LimitError(
                f"the pattern is nested too deeply: more than {MAX_DEPTH} levels",
                getattr(node, "loc", None),
            )
        below = {}
        for node in level.values():
            for kid in _all_children(node):
                below[id(kid)] = kid
        level = below


def _all_children(node) -> tuple:
    """Sub-patterns and expressions of a pattern node, or sub-expressions of an expression."""
    if not isinstance(node, ir.Pattern):
        return ir.expr_children(node)
    if isinstance(node, ir.Where):
        return (node.cond,)
    if type(node) in ir.PRIMITIVE_NAMES:
        return tuple(a for a in ir.args_of(node) if isinstance(a, ir.Expr))
    return ir.children(node)
