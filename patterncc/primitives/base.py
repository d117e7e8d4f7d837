"""What every primitive provides, and the helpers their rules share.

A primitive is one frozen dataclass, a subclass of ``Primitive``: its fields
are its integer arguments (then ``loc``), its docstring is its exact rule, and
its methods carry that rule to every stage of the pipeline. The stages keep
their engines and dispatch here:

========================  =================================================
stage                     what the class provides
========================  =================================================
language (``ir``)         ``NAME``; ``MINIMUM`` per argument and
                          ``check_values`` for rules between arguments
``simplify``              ``simplified()``: an equal, simpler node
``masks``                 ``mask(q, k, n, random)``: the numpy rule
``blocklayout``           ``rows`` (candidate key blocks per query-block
                          row), ``classify`` (EMPTY / PARTIAL / FULL of
                          tiles, exact), ``estimate`` (an upper bound on the
                          candidates), ``DEPENDS_ON`` and ``period()`` (what
                          exact evaluation may exploit), ``HULL`` and
                          ``TABLE``
codegen (Triton, torch)   ``emit(e)``: the predicate's text, through the
                          emitter's dialect ``e.d``
``planner``               ``order_hint()`` (the token order that makes it
                          block-dense, or None), ``over_residues(l,
                          positive)`` (the rule over residue slots),
                          ``condition()`` (the rule as a ``where``
                          condition)
``testing``               ``strategy()``: hypothesis strategy of instances
========================  =================================================

The base class defines none of these: each class states every one itself
(``tests/test_primitives.py`` checks it), so a new primitive cannot silently
inherit a rule that is wrong for it.

Tiles and contexts (``t``, ``ctx``) are the layout builder's
(``blocklayout.tiles``: ``_Tiles``, ``_Ctx``); the rules read only their documented
attributes: ``t.qlo, t.qhi, t.klo, t.khi`` (clipped element bounds),
``t.dlo, t.dhi`` (bounds of ``q - k``), ``t.cols``, ``t.i, t.j``, ``t.size``,
``t.ctx``; ``ctx.n, ctx.B, ctx.nb`` and ``ctx.random(node)``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..nodes import BinOp, Compare, Pattern, Var

EMPTY, PARTIAL, FULL = 0, 1, 2

# Generated kernels compute positions in int32.
INT32_MAX = 2**31 - 1


class Primitive(Pattern):
    """Base of the primitives (see the module docstring for the interface)."""

    __slots__ = ()

    NAME: ClassVar[str]
    # Smallest value of each argument, in field order (the largest is ir.MAX_VALUE).
    MINIMUM: ClassVar[dict[str, int]]
    # "d" when the rule reads only q - k, "k" when only k (all and none: both).
    DEPENDS_ON: ClassVar[frozenset[str]]
    # True when rows() gives exactly one key-block interval per row, for every
    # row: an intersection may then use it as a cheap window for its other parts.
    HULL: ClassVar[bool]
    # True when the rule is a drawn table, not a rule over positions: it cannot
    # be rewritten over reordered slots nor classified over arbitrary rectangles.
    TABLE: ClassVar[bool]

    @classmethod
    def check_values(cls, values: dict[str, int], loc) -> None:
        """Raise a located error when checked ints break a rule between arguments."""
        raise NotImplementedError(f"{cls.__name__} has no check_values")

    def simplified(self) -> Pattern:
        raise NotImplementedError(f"{type(self).__name__} has no simplified")

    def mask(self, q: np.ndarray, k: np.ndarray, n: int, random=None) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no mask")

    def rows(self, ctx, rows: np.ndarray, win):
        raise NotImplementedError(f"{type(self).__name__} has no rows")

    def classify(self, t) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no classify")

    def estimate(self, ctx) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no estimate")

    def period(self) -> int | None:
        raise NotImplementedError(f"{type(self).__name__} has no period")

    def emit(self, e) -> tuple[str, str | None]:
        raise NotImplementedError(f"{type(self).__name__} has no emit")

    def order_hint(self):
        raise NotImplementedError(f"{type(self).__name__} has no order_hint")

    def over_residues(self, l: int, positive: bool):
        raise NotImplementedError(f"{type(self).__name__} has no over_residues")

    def condition(self):
        raise NotImplementedError(f"{type(self).__name__} has no condition")

    @classmethod
    def strategy(cls):
        raise NotImplementedError(f"{cls.__name__} has no strategy")


def independent_arguments(cls, values: dict[str, int], loc) -> None:
    """``check_values`` of a primitive whose arguments are independent
    (``check_values = classmethod(independent_arguments)``)."""


# ----------------------------------------------------------------------------
# Generated code and conditions: nothing but ints reaches the text
# ----------------------------------------------------------------------------


# The positions of ``condition()``: a rule as a ``where`` condition.
_Q, _K = Var("q"), Var("k")
_DIFF = BinOp("-", _Q, _K)


def _lt(a, b):
    return Compare("<", a, b)


def lit(value) -> str:
    """An integer literal; anything else is a bug in an earlier stage."""
    assert type(value) is int, f"only int literals reach generated code, got {value!r}"
    return f"({value})" if value < 0 else str(value)


def _int(value) -> int:
    lit(value)
    return value


# ----------------------------------------------------------------------------
# Block classes and the interval helpers of the layout rules
#
# ``rows(node, ctx, rows, win)`` returns ``(row, jlo, jhi)`` intervals of key
# blocks (inclusive, clipped later), or None for "every key block". ``win`` is
# ``(lo, hi)``, the key blocks wanted per row (what an enclosing intersection
# allows); a rule may use it to skip work, never needs to clip.
# ``classify(node, t)`` returns int8 classes for the tiles ``t``.
# ----------------------------------------------------------------------------


def _classes(nonempty: np.ndarray, full: np.ndarray) -> np.ndarray:
    return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)


def _abs_range(lo, hi):
    """min and max of ``abs(x)`` for integer ``x`` in ``[lo, hi]``."""
    amin = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(np.abs(lo), np.abs(hi)))
    return amin, np.maximum(np.abs(lo), np.abs(hi))


def run_offsets(lengths: np.ndarray, dtype=np.int64) -> np.ndarray:
    """Each entry's index inside its run, for runs of ``lengths`` laid end to
    end: ``0 .. lengths[r] - 1`` for every run ``r``, concatenated."""
    return run_ranges(0, lengths, dtype)


def run_ranges(starts, lengths: np.ndarray, dtype=np.int64) -> np.ndarray:
    """``starts[r] .. starts[r] + lengths[r] - 1`` for every run ``r``,
    concatenated (``starts`` may be one number for every run).

    Built as one cumulative sum, in place, over steps of 1 with a jump where
    each run begins, so that the result is the only array of its length (the
    index arrays of a layout hold millions of entries; ``arange - repeat``
    would take three such arrays)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.broadcast_to(np.asarray(starts, dtype=np.int64), lengths.shape)
    nonempty = lengths > 0
    starts, lengths = starts[nonempty], lengths[nonempty]
    out = np.ones(int(lengths.sum()), dtype=dtype)
    if out.size:
        begins = np.cumsum(lengths) - lengths  # where each run begins in `out`
        out[0] = starts[0]
        out[begins[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)  # from the last value of the run before
        np.cumsum(out, dtype=dtype, out=out)
    return out


def _row_bounds(ctx, rows: np.ndarray):
    qlo = rows * ctx.B
    return qlo, np.minimum(qlo + ctx.B, ctx.n) - 1


def _key_interval(ctx, rows, klo, khi):
    """Key blocks holding keys ``[klo, khi]`` (clipped to ``0 .. n-1``)."""
    klo = np.maximum(klo, 0)
    khi = np.minimum(khi, ctx.n - 1)
    return rows, klo // ctx.B, np.where(klo <= khi, khi // ctx.B, -1)


def _stride_is_dense(ctx, l) -> bool:
    """True when stride(l)'s diagonals reach about every key block of a row."""
    return 2 * ((ctx.n + ctx.B) // l + 1) >= ctx.nb


def _diagonals(ctx, rows, win, step, mmin=None, mmax=None):
    """Key-block intervals of the diagonals ``q - k = m * step`` per row that
    meet the window, ``m`` descending so the intervals come out ascending."""
    qlo, qhi = _row_bounds(ctx, rows)
    kmin = np.maximum(win[0] * ctx.B, 0)
    kmax = np.minimum(win[1] * ctx.B + ctx.B - 1, ctx.n - 1)
    lo = -((kmax - qlo) // step)  # smallest m with some k = q - m * step <= kmax
    hi = (qhi - kmin) // step  # largest m with some k >= kmin
    if mmin is not None:
        lo, hi = np.maximum(lo, mmin), np.minimum(hi, mmax)
    count = np.maximum(hi - lo + 1, 0)
    r = np.repeat(rows, count)
    m = np.repeat(hi, count) - run_offsets(count)
    qlo, qhi = _row_bounds(ctx, r)
    return _key_interval(ctx, r, qlo - m * step, qhi - m * step)


def _band_blocks(ctx, reach: int) -> int:
    """Key blocks a row can meet within ``reach`` positions either side."""
    return (ctx.B + 2 * reach - 1) // ctx.B + 2


def _first_blocks(ctx, g) -> int:
    """Number of blocks holding positions below ``g``."""
    return -(-min(g, ctx.n) // ctx.B)


def _column_runs(cols: np.ndarray, rows: np.ndarray):
    """Each row paired with every run of True in ``cols``."""
    edges = np.diff(np.concatenate([[0], cols.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    R = starts.size
    return np.repeat(rows, R), np.tile(starts, rows.size), np.tile(stops, rows.size)


# ----------------------------------------------------------------------------
# Strategies (hypothesis is imported only when a strategy is asked for)
# ----------------------------------------------------------------------------

# Small arguments, so that masks are interesting at n <= 64. Every strategy
# lists its simplest values first: hypothesis shrinks towards them.


def _size_arg(minimum: int):
    """A primitive argument: mostly a small int, sometimes an expression of
    ``n`` (which makes kernels specialize per length) that is ``>= minimum``
    for every ``n >= 1``."""
    from hypothesis import strategies as st

    from ..nodes import BinOp, Call, Const, Var

    n = Var("n")
    exprs = [
        Call("isqrt", (n,)),                                 # 1 .. 8 for n <= 64
        BinOp("+", BinOp("//", n, Const(8)), Const(1)),      # n // 8 + 1
    ]
    if minimum <= 0:
        exprs.append(BinOp("//", n, Const(4)))
    ints = st.integers(minimum, 16) if minimum >= 1 else st.integers(0, 8)
    return st.one_of(ints, st.sampled_from(exprs))
