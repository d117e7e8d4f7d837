"""Rules of positions, not of their difference: ``block``, ``summary``,
``global``, ``sink``. Their tiles are classified from the tile's row and key
ranges; ``summary`` and ``sink`` read the key alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import Loc, PatternValueError
from ..nodes import _LOC, Arg, BinOp, BoolOp, Compare, Const
from .base import (
    _K, _Q, Primitive, _band_blocks, _classes, _column_runs, _first_blocks, _key_interval, _lt, _row_bounds,
    _size_arg, independent_arguments,
)
from .constant import All, Empty


@dataclass(frozen=True)
class Block(Primitive):
    """``block(l)``: ``q // l == k // l``; ``l >= 1``."""

    l: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "block"
    MINIMUM = {"l": 1}
    DEPENDS_ON = frozenset()
    HULL = True
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        return q // self.l == k // self.l

    def rows(self, ctx, rows, win):
        qlo, qhi = _row_bounds(ctx, rows)
        l = self.l
        return _key_interval(ctx, rows, (qlo // l) * l, (qhi // l + 1) * l - 1)

    def classify(self, t):
        l = self.l
        a0, a1, b0, b1 = t.qlo // l, t.qhi // l, t.klo // l, t.khi // l
        return _classes((a0 <= b1) & (b0 <= a1), (a0 == a1) & (b0 == b1) & (a0 == b0))

    def estimate(self, ctx):
        return ctx.nb * _band_blocks(ctx, self.l - 1)

    def period(self):
        return self.l

    def emit(self, e):
        l = e.arg(self.l)
        return f"q // {l} == k // {l}", f"block(l = {l})"

    def order_hint(self):
        return None  # natural order: blocks on the diagonal

    def over_residues(self, l, positive):
        return None  # not a rule of q - k

    def condition(self):
        return Compare("==", BinOp("//", _Q, Const(self.l)), BinOp("//", _K, Const(self.l)))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, _size_arg(1))


@dataclass(frozen=True)
class Summary(Primitive):
    """``summary(l, c)``: ``k % l >= l - c``, the last ``c`` of every run of ``l``; ``1 <= c <= l``."""

    l: Arg
    c: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "summary"
    MINIMUM = {"l": 1, "c": 1}
    DEPENDS_ON = frozenset("k")
    HULL = False
    TABLE = False

    @classmethod
    def check_values(cls, values, loc):
        if values["c"] > values["l"]:
            raise PatternValueError(
                f"summary(l, c) needs 1 <= c <= l, got l={values['l']}, c={values['c']}", loc
            )

    def simplified(self):
        return All(loc=self.loc) if self.l == self.c else self

    def mask(self, q, k, n, random=None):
        return np.broadcast_to(k % self.l >= self.l - self.c, np.broadcast_shapes(q.shape, k.shape))

    def count(self, x):
        """``#{0 <= k < x : k % l >= l - c}``."""
        l, c = self.l, self.c
        return (x // l) * c + np.maximum(0, x % l - (l - c))

    def columns(self, ctx) -> np.ndarray:
        """bool ``[nb]``: key blocks holding some summary key."""
        klo = np.arange(ctx.nb, dtype=np.int64) * ctx.B
        khi = np.minimum(klo + ctx.B, ctx.n) - 1
        return self.count(khi + 1) > self.count(klo)

    def rows(self, ctx, rows, win):
        cols = self.columns(ctx)
        if cols.all():
            return None
        return _column_runs(cols, rows)

    def classify(self, t):
        allowed = self.count(t.khi + 1) - self.count(t.klo)
        return _classes(allowed > 0, allowed == t.cols)

    def estimate(self, ctx):
        return ctx.nb * int(self.columns(ctx).sum())

    def period(self):
        return self.l

    def emit(self, e):
        l, last = e.arg(self.l), e.arg(self.l - self.c)
        return f"k % {l} >= {last}", f"summary(l = {l}, c): k % l >= l - c = {last}, the last c of every l"

    def order_hint(self):
        # gather just the summary keys: their columns become dense
        return (("natural",), ("columns", self.l, self.c)) if self.c < self.l else None

    def over_residues(self, l, positive):
        return None  # not a rule of q - k

    def condition(self):
        return Compare(">=", BinOp("%", _K, Const(self.l)), Const(self.l - self.c))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.integers(1, 16).flatmap(lambda l: st.builds(cls, st.just(l), st.integers(1, l)))


@dataclass(frozen=True)
class Global(Primitive):
    """``global(g)``: ``q < g or k < g``; ``g >= 0``."""

    g: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "global"
    MINIMUM = {"g": 0}
    DEPENDS_ON = frozenset()
    HULL = True
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return Empty(loc=self.loc) if self.g == 0 else self

    def mask(self, q, k, n, random=None):
        return (q < self.g) | (k < self.g)

    def rows(self, ctx, rows, win):
        G = _first_blocks(ctx, self.g)
        return rows, np.zeros_like(rows), np.where(rows < G, ctx.nb - 1, G - 1)

    def classify(self, t):
        g = self.g
        return _classes((t.qlo < g) | (t.klo < g), (t.qhi < g) | (t.khi < g))

    def estimate(self, ctx):
        return 2 * ctx.nb * _first_blocks(ctx, self.g)

    def period(self):
        return None

    def emit(self, e):
        g = e.arg(self.g)
        return f"(q < {g}) | (k < {g})", f"global(g = {g})"

    def order_hint(self):
        return None  # natural order: its rows and columns are dense already

    def over_residues(self, l, positive):
        return None  # not a rule of q - k

    def condition(self):
        return BoolOp("or", (_lt(_Q, Const(self.g)), _lt(_K, Const(self.g))))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, _size_arg(0))


@dataclass(frozen=True)
class Sink(Primitive):
    """``sink(g)``: ``k < g``; ``g >= 0``."""

    g: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "sink"
    MINIMUM = {"g": 0}
    DEPENDS_ON = frozenset("k")
    HULL = True
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return Empty(loc=self.loc) if self.g == 0 else self

    def mask(self, q, k, n, random=None):
        return np.broadcast_to(k < self.g, np.broadcast_shapes(q.shape, k.shape))

    def rows(self, ctx, rows, win):
        G = _first_blocks(ctx, self.g)
        return rows, np.zeros_like(rows), np.full_like(rows, G - 1)

    def classify(self, t):
        return _classes(t.klo < self.g, t.khi < self.g)

    def estimate(self, ctx):
        return ctx.nb * _first_blocks(ctx, self.g)

    def period(self):
        return None

    def emit(self, e):
        g = e.arg(self.g)
        return f"k < {g}", f"sink(g = {g})"

    def order_hint(self):
        return None  # natural order: its first key blocks are dense already

    def over_residues(self, l, positive):
        return None  # not a rule of q - k

    def condition(self):
        return _lt(_K, Const(self.g))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, _size_arg(0))
