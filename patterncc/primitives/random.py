"""``random(r, b, seed)``: a table of drawn blocks, not a rule over positions.

The draw itself is ``randomblocks.draw`` (seeded, documented there). The
layout builder maps the drawn cells onto its tiles once per context
(``ctx.random(node)``, a ``blocklayout.tiles._RandomTable``); the kernels read the
same table from the ``RANDOM`` argument (codegen's ``RANDOM_TABLES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import randomblocks
from ..errors import Loc
from ..nodes import _LOC, Arg
from .base import Primitive, _classes, _int, independent_arguments, lit as _lit
from .constant import Empty


@dataclass(frozen=True)
class Random(Primitive):
    """``random(r, b, seed)``: query block ``q // b`` attends ``r`` distinct key
    blocks ``k // b``, drawn by ``randomblocks.draw`` (seeded, documented there);
    ``r >= 0``, ``b >= 1``, ``seed >= 0``."""

    r: Arg
    b: Arg
    seed: Arg
    loc: Loc | None = field(**_LOC)

    NAME = "random"
    MINIMUM = {"r": 0, "b": 1, "seed": 0}
    DEPENDS_ON = frozenset()
    HULL = False
    TABLE = True
    check_values = classmethod(independent_arguments)

    def simplified(self):
        if self.r == 0 and self.b >= 1 and self.seed >= 0:
            return Empty(loc=self.loc)
        return self

    def mask(self, q, k, n, random=None):
        """``random(node, q, k)`` may replace the dense table lookup (the
        layout looks cells up sparsely)."""
        return random(self, q, k) if random else _eval_random(self.r, self.b, self.seed, q, k, n)

    def rows(self, ctx, rows, win):
        tab = ctx.random(self)
        lo, hi = np.searchsorted(tab.tile_keys, [rows[0] * ctx.nb, (rows[-1] + 1) * ctx.nb])
        keys = tab.tile_keys[lo:hi]
        i, j = keys // ctx.nb, keys % ctx.nb
        return i, j, j

    def classify(self, t):
        tab = t.ctx.random(self)
        b = self.b
        key = t.i * t.ctx.nb + t.j
        if tab.tile_keys.size == 0:
            return np.zeros(t.size, dtype=np.int8)
        pos = np.minimum(np.searchsorted(tab.tile_keys, key), tab.tile_keys.size - 1)
        count = np.where(tab.tile_keys[pos] == key, tab.tile_counts[pos], 0)
        cells = (t.qhi // b - t.qlo // b + 1) * (t.khi // b - t.klo // b + 1)
        return _classes(count > 0, count == cells)

    def estimate(self, ctx):
        return int(ctx.random(self).tile_keys.size)

    def period(self):
        return None

    def emit(self, e):
        r, b, seed = self.r, self.b, self.seed
        table = e.random_table((_int(r), _int(b), _int(seed)))
        if e.d.name == "triton":
            e.helpers.add("random_blocks")
        return e.d.random(table, r, b), f"random({_lit(r)}, {_lit(b)}, {_lit(seed)}): table {table} of RANDOM"

    def order_hint(self):
        return None  # a table: the planner runs a pattern holding one in natural order

    def over_residues(self, l, positive):
        return None  # a table (TABLE): never reordered

    def condition(self):
        return None  # a table, not a rule over positions

    @classmethod
    def strategy(cls):
        from hypothesis import strategies as st

        return st.builds(cls, st.integers(0, 4), st.integers(1, 16), st.integers(0, 1000))


def _eval_random(r: int, b: int, seed: int, q, k, n: int) -> np.ndarray:
    nb = -(-n // b)
    table = randomblocks.draw(r, nb, seed, np.arange(nb))  # [nb, min(r, nb)]
    if table.shape[1] == 0:
        return np.zeros(np.broadcast_shapes(q.shape, k.shape), dtype=bool)
    # A dense [nb, nb] membership table is small for the n that dense masks allow.
    member = np.zeros((nb, nb), dtype=bool)
    np.put_along_axis(member, table, True, axis=1)
    qb = np.clip(q // b, 0, nb - 1)
    kb = np.clip(k // b, 0, nb - 1)
    return member[qb, kb]
