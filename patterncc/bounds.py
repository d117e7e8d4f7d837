"""Exact bounds of ``where`` expressions, so that no backend's integers wrap.

The language promises Python's unbounded integers; the backends compute in
fixed width: numpy int64 (the reference backend and the layouts), and in
the generated Triton kernels int32, or int64 where some value could leave
int32 at any length (``codegen._needs_int64``), as in the FlexAttention
``mask_mod``. So every ``where`` expression is checked when ``n`` becomes
known (``ir.bind``): interval arithmetic over Python integers, with
``0 <= q, k < n`` and ``0 <= h < MAX_HEADS``, bounds every intermediate
value, and an expression that could leave ``[-LIMIT, LIMIT]`` is refused
with a ``LimitError`` located at the sub-expression. ``LIMIT`` is 2**62, not
2**63 - 1, so that the kernels' floor division (``a - floor_mod(a, b)``)
and ``abs`` cannot wrap either.
"""

from __future__ import annotations

import math

from . import ir
from .errors import LimitError

LIMIT = 2**62


def check_where(cond: ir.Expr, n: int, where_loc=None) -> None:
    """Refuse ``cond`` if any intermediate value could leave ``[-LIMIT, LIMIT]`` at length ``n``."""
    ranges = {"q": (0, n - 1), "k": (0, n - 1), "n": (n, n), "h": (0, ir.MAX_HEADS - 1)}
    _bounds(cond, ranges, n, where_loc)


def _bounds(e: ir.Expr, ranges: dict, n: int, where_loc) -> tuple[int, int]:
    lo, hi = _node_bounds(e, ranges, n, where_loc)
    if lo < -LIMIT or hi > LIMIT:
        worst = hi if hi > LIMIT else lo
        raise LimitError(
            f"`{ir.expr_source(e)}` can reach {worst} at n={n}: beyond +-2**62, where the backends' "
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
        case ir.Const(value=v):
            return v, v
        case ir.Var(name=name):
            return ranges[name]
        case ir.Compare(left=a, right=b):
            sub(a), sub(b)
            return 0, 1
        case ir.BoolOp(args=args):
            for a in args:
                sub(a)
            return 0, 1
        case ir.Not(arg=a):
            sub(a)
            return 0, 1
        case ir.BinOp(op=op, left=a, right=b):
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
        case ir.Call(fn=fn, args=args):
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
