"""The IR: an algebra of small frozen nodes.

A pattern is a predicate on ``(h, q, k)``: query ``q`` may attend to key ``k``
in head ``h``. Positions are 0-based and ``0 <= q, k < n``. Nodes are frozen,
hashable dataclasses, so patterns key caches and compare structurally; they
hold no numpy. ``|``, ``&``, ``-`` and ``~`` build nodes, and ``str(p)``
prints source that parses back to an equal pattern.

Primitive arguments are ``int`` or an integer ``Expr`` over ``n`` (for
example ``local(isqrt(n))``); ``bind(p, n)`` turns them into checked ints.
``where`` conditions keep ``q``, ``k``, ``h`` and ``n`` symbolic.

Every node may carry a ``loc`` (where it came from in the user's text); it
takes no part in equality or hashing.

This module is the IR's one public face. The nodes live in two modules below
it, re-exported here: ``nodes`` (expressions, the ``Pattern`` base,
``where``, combinators, heads, score terms, printing) and ``primitives`` (one
class per primitive, with every stage's rule for it). Here are the functions
over whole patterns: walking, binding a length, picking a head, and the
bounds that keep ``where`` arithmetic exact.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Iterator

from .errors import HeadsError, LimitError, PatternValueError
from .nodes import (  # noqa: F401  (re-exported: ir is the IR's public face)
    CMP_OPS, FUNCS, INT_OPS, MAX_HEADS, MAX_VALUE, NO_TERMS, TERM_NAMES, VARS, _LOC, Arg, BinOp, BoolOp,
    Call, Compare, Complement, Const, Cycle, Difference, Expr, HeadRange, Heads, Intersect, Not, Pattern,
    Scored, Terms, Union, Var, Where, args_of, check_softcap, eval_int, expr_children, expr_source,
    expr_vars, number_source, scored, source, split_terms,
)
from .primitives import (  # noqa: F401
    PRIMITIVES, All, Band, Block, Causal, Dilated, Empty, Global, Local, Primitive, Random, Sink, Stride,
    Summary,
)

PRIMITIVE_NAMES = {cls: name for name, cls in PRIMITIVES.items()}


def children(p: Pattern) -> tuple[Pattern, ...]:
    if isinstance(p, (Union, Intersect, Cycle)):
        return p.parts
    if isinstance(p, Difference):
        return (p.left, p.right)
    if isinstance(p, Complement):
        return (p.arg,)
    if isinstance(p, Heads):
        return tuple(r.pattern for r in p.ranges)
    if isinstance(p, Scored):
        return (p.body,)
    return ()


def walk(p: Pattern) -> Iterator[Pattern]:
    """Every node, parents before children (iterative: deep trees are fine)."""
    stack = [p]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def depends_on_head(p: Pattern) -> bool:
    return any(
        isinstance(node, (Heads, Cycle)) or (isinstance(node, Where) and "h" in expr_vars(node.cond))
        for node in walk(p)
    )


def within_causal(p: Pattern) -> bool:
    """True when, by its structure, ``p`` lets no query see a later key in any
    head: ``causal``, an intersection with it, a difference from such a
    pattern, and unions, head splits and cycles of such patterns. (A pattern
    may lie inside causal in other ways; this is the test a plan and a
    kernel can rely on without evaluating the mask.)"""
    match p:
        case Causal():
            return True
        case Intersect(parts=parts):
            return any(within_causal(x) for x in parts)
        case Union(parts=parts) | Cycle(parts=parts):
            return all(within_causal(x) for x in parts)
        case Difference(left=a):
            return within_causal(a)
        case Heads(ranges=ranges):
            return all(within_causal(r.pattern) for r in ranges)
        case Scored(body=body):
            return within_causal(body)
    return False


def uses_n(p: Pattern) -> bool:
    """True when the pattern's meaning changes with the sequence length beyond
    the bounds check (then kernels are specialized per length)."""
    for node in walk(p):
        if isinstance(node, Where) and "n" in expr_vars(node.cond):
            return True
        if type(node) in PRIMITIVE_NAMES and any(isinstance(a, Expr) for a in args_of(node)):
            return True
    return False


# ----------------------------------------------------------------------------
# Binding a length: symbolic arguments -> checked ints
# ----------------------------------------------------------------------------


def check_args(p: Pattern, values: dict[str, int]) -> None:
    """Raise a located PatternValueError if a primitive's ints are out of range:
    each argument against its class's ``MINIMUM`` and ``MAX_VALUE``, then the
    class's own rule between its arguments (``check_values``)."""
    name = PRIMITIVE_NAMES[type(p)]
    for arg, lo in type(p).MINIMUM.items():
        v = values[arg]
        if not isinstance(v, int) or isinstance(v, bool):
            raise PatternValueError(f"{name}: `{arg}` must be an integer, got {v!r}", p.loc)
        if v < lo:
            raise PatternValueError(f"{name}: `{arg}` must be >= {lo}, got {arg}={v}", p.loc)
        if v > MAX_VALUE:
            raise LimitError(f"{name}: `{arg}`={v} is larger than the limit {MAX_VALUE}", p.loc)
    type(p).check_values(values, p.loc)


def bind(p: Pattern, n: int) -> Pattern:
    """Evaluate every symbolic primitive argument at sequence length ``n`` and
    check its range. ``where`` conditions keep ``n`` symbolic; their values
    are proven to stay within what the backends' integers hold at this ``n``
    (``check_where``)."""
    return _map(p, lambda node: _bind_node(node, n))


def _bind_node(node: Pattern, n: int) -> Pattern:
    if isinstance(node, Where):
        check_where(node.cond, n, node.loc)
        return node
    if type(node) not in PRIMITIVE_NAMES or not any(isinstance(a, Expr) for a in args_of(node)):
        return node
    names = [f.name for f in fields(node) if f.name != "loc"]
    values = {a: eval_int(getattr(node, a), {"n": n}, node.loc) for a in names}
    check_args(node, values)
    return replace(node, **values)


def for_head(p: Pattern, h: int) -> Pattern:
    """The head-free pattern that head ``h`` uses."""

    def pick(node: Pattern) -> Pattern:
        if isinstance(node, Cycle):
            return for_head(node.parts[h % len(node.parts)], h)
        if isinstance(node, Heads):
            for r in node.ranges:
                if r.start <= h < r.stop:
                    return for_head(r.pattern, h)
            raise HeadsError(f"head {h} is not covered by any range of `heads`", node.loc)
        if isinstance(node, Where) and "h" in expr_vars(node.cond):
            return replace(node, cond=substitute(node.cond, "h", h))
        return node

    return _map(p, pick)


def natural_heads(p: Pattern) -> int | None:
    """A head count that shows every head's pattern: what a ``heads { .. }``
    block covers (its largest range end), else the longest ``cycle``; None
    when the pattern does not depend on the head that way."""
    stops = [r.stop for node in walk(p) if isinstance(node, Heads) for r in node.ranges]
    if stops:
        return max(stops)
    cycles = [len(node.parts) for node in walk(p) if isinstance(node, Cycle)]
    return max(cycles) if cycles else None


def check_heads(p: Pattern, heads: int) -> None:
    """Every ``heads { .. }`` must cover ``0..heads`` exactly, without overlap;
    and ``heads`` is within ``MAX_HEADS`` (layouts and masks work per head)."""
    if heads > MAX_HEADS:
        raise LimitError(f"{heads=} is over the limit of {MAX_HEADS} heads")
    for node in walk(p):
        if not isinstance(node, Heads):
            continue
        covered = 0
        for r in sorted(node.ranges, key=lambda r: r.start):
            if r.start != covered:
                what = "overlaps the range before it" if r.start < covered else f"leaves heads {covered}..{r.start} uncovered"
                raise HeadsError(f"heads range {r.start}..{r.stop} {what}", r.loc or node.loc)
            covered = r.stop
        if covered != heads:
            raise HeadsError(
                f"`heads` covers heads 0..{covered} but the attention has {heads=} heads",
                node.loc,
                hint=f"make the ranges cover 0..{heads} exactly",
            )


def substitute(e: Expr, name: str, value: "int | Expr") -> Expr:
    """``e`` with variable ``name`` replaced by ``value`` (an int or an expression)."""
    if isinstance(e, Var):
        if e.name != name:
            return e
        return Const(value, e.loc) if isinstance(value, int) else value
    if isinstance(e, (BinOp, Compare)):
        return replace(e, left=substitute(e.left, name, value), right=substitute(e.right, name, value))
    if isinstance(e, (Call, BoolOp)):
        return replace(e, args=tuple(substitute(a, name, value) for a in e.args))
    if isinstance(e, Not):
        return replace(e, arg=substitute(e.arg, name, value))
    return e


def _map(p: Pattern, fn) -> Pattern:
    """Rebuild the tree bottom-up, applying ``fn`` to each node first (pre-order).

    ``fn`` may replace a node; its result's children are then mapped too.
    """
    node = fn(p)
    if isinstance(node, (Union, Intersect, Cycle)):
        parts = tuple(_map(c, fn) for c in node.parts)
        return node if parts == node.parts and all(a is b for a, b in zip(parts, node.parts)) else replace(node, parts=parts)
    if isinstance(node, Difference):
        return replace(node, left=_map(node.left, fn), right=_map(node.right, fn))
    if isinstance(node, Complement):
        return replace(node, arg=_map(node.arg, fn))
    if isinstance(node, Heads):
        return replace(node, ranges=tuple(replace(r, pattern=_map(r.pattern, fn)) for r in node.ranges))
    if isinstance(node, Scored):
        return replace(node, body=_map(node.body, fn))
    return node



# ----------------------------------------------------------------------------
# Bounds of `where` expressions
# ----------------------------------------------------------------------------
# Exact bounds of ``where`` expressions, so that no backend's integers wrap.
#
# The language promises Python's unbounded integers; the backends compute in
# fixed width: numpy int64 (the reference backend and the layouts), and in
# the generated Triton kernels int32, or int64 where some value could leave
# int32 at any length (``codegen._needs_int64``), as in the FlexAttention
# ``mask_mod``. So every ``where`` expression is checked when ``n`` becomes
# known (``ir.bind``): interval arithmetic over Python integers, with
# ``0 <= q, k < n`` and ``0 <= h < MAX_HEADS``, bounds every intermediate
# value, and an expression that could leave ``[-LIMIT, LIMIT]`` is refused
# with a ``LimitError`` located at the sub-expression. ``LIMIT`` is 2**62, not
# 2**63 - 1, so that the kernels' floor division (``a - floor_mod(a, b)``)
# and ``abs`` cannot wrap either.

LIMIT = 2**62


def check_where(cond: Expr, n: int, where_loc=None) -> None:
    """Refuse ``cond`` if any intermediate value could leave ``[-LIMIT, LIMIT]`` at length ``n``."""
    ranges = {"q": (0, n - 1), "k": (0, n - 1), "n": (n, n), "h": (0, MAX_HEADS - 1)}
    _bounds(cond, ranges, n, where_loc)


def _bounds(e: Expr, ranges: dict, n: int, where_loc) -> tuple[int, int]:
    lo, hi = _node_bounds(e, ranges, n, where_loc)
    if lo < -LIMIT or hi > LIMIT:
        worst = hi if hi > LIMIT else lo
        raise LimitError(
            f"`{expr_source(e)}` can reach {worst} at n={n}: beyond +-2**62, where the backends' "
            "64-bit integers no longer compute it exactly",
            getattr(e, "loc", None) or where_loc,
            hint="keep the values of a `where` expression within +-2**62 (4.6e18)",
        )
    return lo, hi


def _node_bounds(e, ranges, n, where_loc) -> tuple[int, int]:
    sub = lambda x: _bounds(x, ranges, n, where_loc)  # noqa: E731
    match e:
        case int():
            return e, e
        case Const(value=v):
            return v, v
        case Var(name=name):
            return ranges[name]
        case Compare(left=a, right=b):
            sub(a), sub(b)
            return 0, 1
        case BoolOp(args=args):
            for a in args:
                sub(a)
            return 0, 1
        case Not(arg=a):
            sub(a)
            return 0, 1
        case BinOp(op=op, left=a, right=b):
            (a0, a1), (b0, b1) = sub(a), sub(b)
            if op == "+":
                return a0 + b0, a1 + b1
            if op == "-":
                return a0 - b1, a1 - b0
            if op == "*":
                corners = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
                return min(corners), max(corners)
            if b0 <= 0 <= b1:  # a divisor that may be 0 (evaluation refuses it): no bound
                big = max(abs(a0), abs(a1), abs(b0), abs(b1))
                return -big, big
            if op == "%":  # the sign of the divisor, smaller than it
                return (0, b1 - 1) if b0 > 0 else (b0 + 1, 0)
            corners = (a0 // b0, a0 // b1, a1 // b0, a1 // b1)
            return min(corners), max(corners)
        case Call(fn=fn, args=args):
            bounds = [sub(a) for a in args]
            if fn == "abs":
                (x0, x1), = bounds
                return (0 if x0 <= 0 <= x1 else min(abs(x0), abs(x1))), max(abs(x0), abs(x1))
            if fn == "min":
                return min(b[0] for b in bounds), min(b[1] for b in bounds)
            if fn == "max":
                return max(b[0] for b in bounds), max(b[1] for b in bounds)
            (x0, x1), = bounds  # isqrt
            return math.isqrt(max(x0, 0)), math.isqrt(max(x1, 0))
    raise TypeError(f"not an expression: {e!r}")
