"""``all`` and ``none``: the constant patterns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import Loc
from ..nodes import _LOC, Compare, Const
from .base import FULL, Primitive, independent_arguments


@dataclass(frozen=True)
class All(Primitive):
    """``all``: true everywhere."""

    loc: Loc | None = field(**_LOC)

    NAME = "all"
    MINIMUM = {}
    DEPENDS_ON = frozenset("dk")
    HULL = False
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        return np.ones(np.broadcast_shapes(q.shape, k.shape), dtype=bool)

    def rows(self, ctx, rows, win):
        return None  # every key block

    def classify(self, t):
        return np.full(t.size, FULL, dtype=np.int8)

    def estimate(self, ctx):
        return ctx.nb * ctx.nb

    def period(self):
        return 1

    def emit(self, e):
        return "(q >= 0) & (k >= 0)", "all (positions are never negative: all true)"

    def order_hint(self):
        return None

    def over_residues(self, l, positive):
        return self, True

    def condition(self):
        return Compare("==", Const(0), Const(0))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.just(cls())


@dataclass(frozen=True)
class Empty(Primitive):
    """``none``: false everywhere."""

    loc: Loc | None = field(**_LOC)

    NAME = "none"
    MINIMUM = {}
    DEPENDS_ON = frozenset("dk")
    HULL = False
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        return np.zeros(np.broadcast_shapes(q.shape, k.shape), dtype=bool)

    def rows(self, ctx, rows, win):
        return rows[:0], rows[:0], rows[:0]  # no key block

    def classify(self, t):
        return np.zeros(t.size, dtype=np.int8)

    def estimate(self, ctx):
        return 0

    def period(self):
        return 1

    def emit(self, e):
        return "(q < 0) & (k < 0)", "none (all false)"

    def order_hint(self):
        return None

    def over_residues(self, l, positive):
        return self, True

    def condition(self):
        return Compare("!=", Const(0), Const(0))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.just(cls())
