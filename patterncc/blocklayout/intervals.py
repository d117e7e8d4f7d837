"""Interval arithmetic over ``where`` expressions, elementwise over arrays of ranges.

Over a set of tiles (each a product of a row range and a key range) an
integer expression becomes a ``_Span``: bounds ``[lo, hi]`` on its value in
each tile; ``wild`` where no bound is known (a division by a range holding 0,
a value beyond +-(2**62 - 1)); ``tight`` where both bounds are attained by some
element of the tile; ``dense`` when every integer in between is attained;
``vars``, the positions (q, k) it reads. Parts that read disjoint positions
vary independently over a tile, which is what makes bounds attained. A
condition becomes ``(true, false, partial)``: holds in every element, in
none, in some but not all (none of the three: unknown, so the layout
evaluates the tile). Python semantics, as in ``masks.eval_expr``.

Two stages use it: the layout builder classifies tiles with ``_truth``
(``rules.py``), and code generation asks ``bounds`` whether a value can leave
int32 and whether a division's operands are non-negative
(``backends/triton/codegen.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .. import ir
from ..primitives.base import _abs_range

# Bounds stay within +-_BIG, so that the sum or difference of two never
# leaves int64 (products are checked in floating point first). That is
# about ``ir.LIMIT`` (2**62), beyond which no `where` value may go, and it
# holds the product of two positions, which code generation asks about.
_BIG = 2**62 - 1


class _Span(NamedTuple):
    lo: np.ndarray
    hi: np.ndarray
    wild: np.ndarray
    tight: np.ndarray
    dense: bool
    vars: frozenset


_FALSE = np.bool_(False)
_TRUE = np.bool_(True)
_UNKNOWN = _Span(np.int64(0), np.int64(0), _TRUE, _FALSE, False, frozenset())


def _const(v: int) -> _Span:
    return _span(np.int64(v), np.int64(v), np.bool_(abs(v) > _BIG), _TRUE, True, frozenset())


def _span(lo, hi, wild, tight, dense, vars) -> _Span:
    """Mark values beyond +-_BIG wild and zero wild bounds (no overflow later)."""
    wild = wild | (np.abs(lo) > _BIG) | (np.abs(hi) > _BIG)
    tight = (tight | dense) & ~wild  # dense implies both bounds attained
    return _Span(np.where(wild, 0, lo), np.where(wild, 0, hi), wild, tight, dense, frozenset(vars))


def _is_bool(e: ir.Expr) -> bool:
    if isinstance(e, (ir.Compare, ir.Not)):
        return True
    return isinstance(e, ir.BoolOp) and all(_is_bool(a) for a in e.args)


def _independent(*spans: _Span) -> bool:
    seen: set = set()
    for s in spans:
        if seen & s.vars:
            return False
        seen |= s.vars
    return True


def _range(e, env) -> _Span:
    """The ``_Span`` of an integer expression."""
    if isinstance(e, int):
        return _const(e)
    if _is_bool(e):  # a condition used as a number: 0 or 1
        true, false, partial = _truth(e, env)
        return _span(np.where(true, 1, 0), np.where(false, 0, 1), _FALSE, true | false | partial,
                     False, _positions(e))
    match e:
        case ir.Const(value=v):
            return _const(v)
        case ir.Var(name=name):
            if name not in env:
                return _UNKNOWN
            lo, hi = env[name]
            positional = name in ("q", "k")
            return _span(np.int64(lo) if np.isscalar(lo) else lo, np.int64(hi) if np.isscalar(hi) else hi,
                         _FALSE, _TRUE, True, {name} if positional else ())
        case ir.BinOp(op=op, left=a, right=b):
            if _is_bool(a) and _is_bool(b):  # numpy's bool arithmetic is not Python's
                return _UNKNOWN
            return _binop(op, _range(a, env), _range(b, env))
        case ir.Call(fn="abs", args=(a,)):
            s = _range(a, env)
            amin, amax = _abs_range(s.lo, s.hi)
            one_side = (s.lo >= 0) | (s.hi <= 0)  # abs is monotone there
            return _span(amin, amax, s.wild, s.tight & one_side, s.dense, s.vars)
        case ir.Call(fn="min" | "max", args=args):
            pick = np.minimum if e.fn == "min" else np.maximum
            spans = [_range(a, env) for a in args]
            lo, hi = functools.reduce(pick, [s.lo for s in spans]), functools.reduce(pick, [s.hi for s in spans])
            wild = functools.reduce(np.logical_or, [s.wild for s in spans])
            apart = _independent(*spans)
            tight = functools.reduce(np.logical_and, [s.tight for s in spans]) & apart
            dense = apart and all(s.dense for s in spans)
            return _span(lo, hi, wild, tight, dense, frozenset().union(*[s.vars for s in spans]))
        case ir.Call(fn="isqrt"):
            if not ir.expr_vars(e):
                return _const(ir.eval_int(e, {}))
    return _UNKNOWN


def _positions(e) -> frozenset:
    return frozenset(ir.expr_vars(e) & {"q", "k"})


def _binop(op: str, a: _Span, b: _Span) -> _Span:
    wild = a.wild | b.wild
    vars = a.vars | b.vars
    apart = _independent(a, b)
    if op == "+":
        return _span(a.lo + b.lo, a.hi + b.hi, wild, a.tight & b.tight & apart, a.dense and b.dense and apart, vars)
    if op == "-":
        return _span(a.lo - b.hi, a.hi - b.lo, wild, a.tight & b.tight & apart, a.dense and b.dense and apart, vars)
    constant = not b.vars and bool(np.all(b.lo == b.hi))  # the right operand is one number
    if op == "*":
        big = np.maximum(np.abs(a.lo), np.abs(a.hi)).astype(float) * np.maximum(np.abs(b.lo), np.abs(b.hi))
        wild = wild | (big > _BIG)
        with np.errstate(over="ignore"):
            corners = (a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)
        unit = constant and bool(np.all(np.abs(b.lo) == 1))
        return _span(np.minimum.reduce(corners), np.maximum.reduce(corners), wild,
                     a.tight & b.tight & apart, a.dense and unit, vars)
    if op not in ("//", "%"):
        return _UNKNOWN
    wild = wild | ((b.lo <= 0) & (b.hi >= 0))  # the divisor's range holds 0
    blo, bhi = np.where(wild, 1, b.lo), np.where(wild, 1, b.hi)
    if op == "//":  # floor(x / y) is monotone in each argument while y keeps its sign
        corners = (a.lo // blo, a.lo // bhi, a.hi // blo, a.hi // bhi)
        return _span(np.minimum.reduce(corners), np.maximum.reduce(corners), wild,
                     a.tight & b.tight & apart, a.dense and constant, vars)
    one_period = (blo == bhi) & (a.lo // blo == a.hi // blo)  # x % m = x - m * const there
    lo = np.where(one_period, a.lo % blo, np.where(blo > 0, 0, blo + 1))
    below = np.where(a.lo >= 0, np.minimum(a.hi, bhi - 1), bhi - 1)  # 0 <= x % m <= x for x >= 0
    hi = np.where(one_period, a.hi % blo, np.where(blo > 0, below, 0))
    every_residue = a.dense and constant and bool(np.all(a.hi - a.lo + 1 >= np.abs(blo)))
    tight = (one_period & a.tight) if constant else _FALSE
    return _span(lo, hi, wild, tight, (a.dense and constant and bool(np.all(one_period))) or every_residue, vars)


def _truth(e, env):
    """``(true, false, partial)`` bool arrays for a condition."""
    match e:
        case ir.Compare(op=op, left=a, right=b):
            sa, sb = _range(a, env), _range(b, env)
            known = ~(sa.wild | sb.wild)
            lt_always, lt_never = sa.hi < sb.lo, sa.lo >= sb.hi  # a < b
            le_always, le_never = sa.hi <= sb.lo, sa.lo > sb.hi  # a <= b
            eq_always = (sa.lo == sa.hi) & (sb.lo == sb.hi) & (sa.lo == sb.lo)
            eq_never = (sa.hi < sb.lo) | (sa.lo > sb.hi)
            true, false = {
                "<": (lt_always, lt_never), "<=": (le_always, le_never),
                ">": (le_never, le_always), ">=": (lt_never, lt_always),
                "==": (eq_always, eq_never), "!=": (eq_never, eq_always),
            }[op]
            true, false = true & known, false & known
            # Independent sides whose bounds are attained reach both outcomes
            # (for == and != every value in between must be attained too).
            if op in ("==", "!="):
                reach = sa.dense and sb.dense
            else:
                reach = sa.tight & sb.tight
            partial = known & ~true & ~false & reach & _independent(sa, sb)
            return true, false, partial
        case ir.Not(arg=a):
            true, false, partial = _truth(a, env)
            return false, true, partial
        case ir.BoolOp(op=op, args=args) if _is_bool(e):
            parts = [_truth(a, env) for a in args]
            if op == "or":  # De Morgan: or is and with true and false swapped
                parts = [(f, t, p) for t, f, p in parts]
            true = functools.reduce(np.logical_and, [t for t, _, _ in parts])
            false = functools.reduce(np.logical_or, [f for _, f, _ in parts])
            settled = functools.reduce(np.logical_and, [t | p for t, _, p in parts])
            if _independent(*[_Span(0, 0, _FALSE, _FALSE, False, _positions(a)) for a in args]):
                # parts on disjoint positions: their witnesses combine freely
                partial = settled & ~true
            else:
                undecided = sum(np.asarray(~t, dtype=np.int8) for t, _, _ in parts)
                partial = settled & (undecided == 1)
            return (false, true, partial) if op == "or" else (true, false, partial)
        case ir.BoolOp():  # numpy's & | on integers is bitwise: leave it to evaluation
            return _FALSE, _FALSE, _FALSE
    s = _range(e, env)  # an integer used as a condition: nonzero
    true = ~s.wild & ((s.lo > 0) | (s.hi < 0))
    false = ~s.wild & (s.lo == 0) & (s.hi == 0)
    zero_and_other = (s.lo == 0) | (s.hi == 0) | s.dense  # both 0 and a nonzero value attained
    return true, false, s.tight & ~true & ~false & zero_and_other


def bounds(e: ir.Expr, ranges: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """``(lo, hi)`` bounding an integer expression when each variable ``v``
    takes any value in ``ranges[v]`` (inclusive), or None where no bound is
    known: a value could pass +-(2**62 - 1), a divisor's range holds 0, a variable
    has no range, or a call this arithmetic does not follow (``isqrt`` of a
    variable)."""
    s = _range(e, dict(ranges))
    if bool(s.wild):
        return None
    return int(s.lo), int(s.hi)
