"""Rules of ``q - k`` alone: ``causal``, ``local``, ``stride``, ``dilated``,
``band``. Each is constant along the diagonals of the attention matrix, so a
tile's class follows from the range ``[dlo, dhi]`` of ``q - k`` over it (a
tile holds every value in that range), and exact evaluation needs only the
``2 * block - 1`` diagonals of a tile."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import Loc, PatternValueError
from ..nodes import _LOC, Arg, BinOp, BoolOp, Call, Compare, Const
from .base import (
    _DIFF, _K, _Q, INT32_MAX, Primitive, _abs_range, _band_blocks, _classes, _diagonals, _key_interval, _lt,
    _row_bounds, _size_arg, _stride_is_dense, independent_arguments,
)
from .constant import All, Empty


@dataclass(frozen=True)
class Causal(Primitive):
    """``causal``: ``k <= q``."""

    loc: Loc | None = field(**_LOC)

    NAME = "causal"
    MINIMUM = {}
    DEPENDS_ON = frozenset("d")
    HULL = True
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        return k <= q

    def rows(self, ctx, rows, win):
        return rows, np.zeros_like(rows), rows

    def classify(self, t):
        return _classes(t.dhi >= 0, t.dlo >= 0)

    def estimate(self, ctx):
        nb = ctx.nb
        return nb * (nb + 1) // 2

    def period(self):
        return 1

    def emit(self, e):
        return "k <= q", "causal"

    def order_hint(self):
        return None  # natural order: a triangle of blocks

    def over_residues(self, l, positive):
        return self, True

    def condition(self):
        return Compare("<=", _K, _Q)

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.just(cls())


@dataclass(frozen=True)
class Local(Primitive):
    """``local(w)``: ``abs(q - k) < w``; ``w >= 1``."""

    w: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "local"
    MINIMUM = {"w": 1}
    DEPENDS_ON = frozenset("d")
    HULL = True
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        return np.abs(q - k) < self.w

    def rows(self, ctx, rows, win):
        qlo, qhi = _row_bounds(ctx, rows)
        return _key_interval(ctx, rows, qlo - self.w + 1, qhi + self.w - 1)

    def classify(self, t):
        amin, amax = _abs_range(t.dlo, t.dhi)
        return _classes(amin < self.w, amax < self.w)

    def estimate(self, ctx):
        return ctx.nb * _band_blocks(ctx, self.w - 1)

    def period(self):
        return 1

    def emit(self, e):
        w = e.arg(self.w)
        return f"{e.d.abs('q - k')} < {w}", f"local(w = {w}): abs(q - k) < w"

    def order_hint(self):
        return None  # natural order: a band

    def over_residues(self, l, positive):
        return Local(-(-self.w // l)), True

    def condition(self):
        return _lt(Call("abs", (_DIFF,)), Const(self.w))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, _size_arg(1))


@dataclass(frozen=True)
class Stride(Primitive):
    """``stride(l)``: ``(q - k) % l == 0``; ``l >= 1``."""

    l: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "stride"
    MINIMUM = {"l": 1}
    DEPENDS_ON = frozenset("d")
    HULL = False
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return All(loc=self.loc) if self.l == 1 else self

    def mask(self, q, k, n, random=None):
        return (q - k) % self.l == 0

    def rows(self, ctx, rows, win):
        return None if _stride_is_dense(ctx, self.l) else _diagonals(ctx, rows, win, self.l)

    def classify(self, t):
        l = self.l
        nonempty = (t.dhi // l) * l >= t.dlo  # some multiple of l in [dlo, dhi]
        full = (l == 1) | ((t.dlo == t.dhi) & (t.dlo % l == 0))
        return _classes(nonempty, full)

    def estimate(self, ctx):
        nb, l = ctx.nb, self.l
        return nb * nb if _stride_is_dense(ctx, l) else nb * 2 * ((ctx.n + ctx.B) // l + 2)

    def period(self):
        return 1

    def emit(self, e):
        l = e.arg(self.l)
        return f"(q - k) % {l} == 0", f"stride(l = {l}): a zero remainder is zero under either sign convention"

    def order_hint(self):
        # residue order makes each residue class contiguous: stride(l) becomes blocks
        return (("residue", self.l), ("residue", self.l)) if self.l > 1 else None

    def over_residues(self, l, positive):
        m = self.l // math.gcd(self.l, l)
        return (All() if m == 1 else Stride(m)), True

    def condition(self):
        return Compare("==", BinOp("%", _DIFF, Const(self.l)), Const(0))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, _size_arg(1))


@dataclass(frozen=True)
class Dilated(Primitive):
    """``dilated(w, d)``: ``abs(q - k) < w * d and (q - k) % d == 0``; ``w, d >= 1``."""

    w: Arg
    d: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "dilated"
    MINIMUM = {"w": 1, "d": 1}
    DEPENDS_ON = frozenset("d")
    HULL = False
    TABLE = False
    check_values = classmethod(independent_arguments)

    def simplified(self):
        return self

    def mask(self, q, k, n, random=None):
        diff = q - k
        return (np.abs(diff) < self.w * self.d) & (diff % self.d == 0)

    def rows(self, ctx, rows, win):
        w, d = self.w, self.d
        reach = (w - 1) * d  # the farthest allowed |q - k|
        if d <= ctx.B or _stride_is_dense(ctx, d):
            qlo, qhi = _row_bounds(ctx, rows)
            return _key_interval(ctx, rows, qlo - reach, qhi + reach)
        return _diagonals(ctx, rows, win, d, -(w - 1), w - 1)

    def classify(self, t):
        w, d = self.w, self.d
        mlo = np.maximum(-(-t.dlo // d), -(w - 1))  # allowed q - k are m * d, |m| <= w - 1
        mhi = np.minimum(t.dhi // d, w - 1)
        amin, amax = _abs_range(t.dlo, t.dhi)
        full = np.where(d == 1, amax < w, (t.dlo == t.dhi) & (t.dlo % d == 0) & (amax < w * d))
        return _classes(mlo <= mhi, full)

    def estimate(self, ctx):
        nb, w, d = ctx.nb, self.w, self.d
        if d <= ctx.B or _stride_is_dense(ctx, d):
            return nb * _band_blocks(ctx, (w - 1) * d)
        return nb * 2 * min(2 * w - 1, (ctx.n + ctx.B) // d + 2)

    def period(self):
        return 1

    def emit(self, e):
        # |q - k| <= 2**31 - 2, so a band wider than int32 is the same as 2**31 - 1
        band, d = e.arg(min(self.w * self.d, INT32_MAX)), e.arg(self.d)
        return (f"({e.d.abs('q - k')} < {band}) & ((q - k) % {d} == 0)",
                f"dilated(w, d = {d}): abs(q - k) < w * d = {band}")

    def order_hint(self):
        return (("residue", self.d), ("residue", self.d)) if self.d > 1 else None

    def over_residues(self, l, positive):
        w, d = self.w, self.d
        m = d // math.gcd(d, l)
        band = Local(-(-(w * d) // l))
        return (band if m == 1 else band & Stride(m)), True

    def condition(self):
        return BoolOp("and", (_lt(Call("abs", (_DIFF,)), Const(self.w * self.d)),
                              Compare("==", BinOp("%", _DIFF, Const(self.d)), Const(0))))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, st.integers(1, 6), st.integers(1, 6))


@dataclass(frozen=True)
class Band(Primitive):
    """``band(lo, hi)``: ``lo <= q - k < hi``; ``lo < hi`` (``hi - lo``
    diagonals, anywhere: ``band(1, 65)`` the 64 keys before the query,
    ``band(-64, 1)`` the query and the 64 keys after it). An empty band
    (``lo >= hi``) is an error, as ``local(0)`` is."""

    lo: Arg
    hi: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "band"
    MINIMUM = {"lo": -INT32_MAX, "hi": -INT32_MAX}
    DEPENDS_ON = frozenset("d")
    HULL = True
    TABLE = False

    @classmethod
    def check_values(cls, values, loc):
        if values["lo"] >= values["hi"]:
            raise PatternValueError(
                f"band(lo, hi) needs lo < hi (it allows lo <= q - k < hi), got lo={values['lo']}, "
                f"hi={values['hi']}", loc)

    def simplified(self):
        # symmetric about the diagonal: -(w - 1) <= q - k < w is abs(q - k) < w
        if self.lo < self.hi and self.lo == 1 - self.hi:
            return Local(self.hi, self.loc)
        return self

    def mask(self, q, k, n, random=None):
        diff = q - k
        return (diff >= self.lo) & (diff < self.hi)

    def rows(self, ctx, rows, win):
        qlo, qhi = _row_bounds(ctx, rows)  # keys q - hi + 1 .. q - lo
        return _key_interval(ctx, rows, qlo - self.hi + 1, qhi - self.lo)

    def classify(self, t):
        # a tile holds every q - k in [dlo, dhi]
        return _classes((t.dhi >= self.lo) & (t.dlo < self.hi), (t.dlo >= self.lo) & (t.dhi < self.hi))

    def estimate(self, ctx):
        # a row's keys span block - 1 + (hi - lo) positions
        return ctx.nb * ((ctx.B + (self.hi - self.lo) - 2) // ctx.B + 2)

    def period(self):
        return 1

    def emit(self, e):
        lo, hi = e.arg(self.lo), e.arg(self.hi)
        return f"((q - k) >= {lo}) & ((q - k) < {hi})", f"band(lo = {lo}, hi = {hi}): lo <= q - k < hi"

    def order_hint(self):
        return None  # natural order: a band

    def over_residues(self, l, positive):
        # same class: q - k = m * l, and lo <= m * l < hi is ceil(lo / l) <= m < ceil(hi / l)
        lo, hi = -(-self.lo // l), -(-self.hi // l)
        return (Band(lo, hi) if lo < hi else Empty()), True

    def condition(self):
        return BoolOp("and", (Compare("<=", Const(self.lo), _DIFF), _lt(_DIFF, Const(self.hi))))

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.integers(-8, 8).flatmap(lambda lo: st.builds(cls, st.just(lo), st.integers(lo + 1, lo + 12)))
