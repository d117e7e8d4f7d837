"""The layout builder's working state: the budget of one call, the context of
one head-free pattern at one length and block, and the tiles it classifies.

The tile of block pair ``(i, j)`` holds rows ``q in [i * B, (i + 1) * B - 1]``
and keys ``k in [j * B, (j + 1) * B - 1]``, both clipped to ``seq_len``. Sets
of block pairs travel as sorted int64 keys ``i * nb + j`` (``_unique``).
``random``'s drawn cells are mapped onto the tiles once per context
(``_RandomTable``). The primitives' layout rules read only the documented
attributes of tiles and contexts (``primitives/base.py``).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .. import ir, randomblocks
from ..errors import LimitError
from ..primitives.base import run_offsets
from . import limits


class _Budget:
    """The work one call may do, all its heads together."""

    def __init__(self, n: int, B: int):
        self.n, self.B = n, B
        self.candidates = 0
        self.evals = 0
        self.elements = 0  # of sparse_mask, all heads together

    def reserve(self, candidates: int, heads: int) -> None:
        """Count a head's estimated candidates against ``limits.MAX_CANDIDATES``."""
        self.candidates += candidates
        if self.candidates > limits.MAX_CANDIDATES:
            over = f"{heads} distinct heads" if heads > 1 else "one head"
            raise LimitError(
                f"the layout at seq_len={self.n}, block={self.B} would examine at least {self.candidates} "
                f"candidate block pairs ({over}), over the limit of {limits.MAX_CANDIDATES}",
                hint="use a larger block, a shorter sequence or fewer heads",
            )

    def charge(self, count: int) -> None:
        """Count element evaluations against ``limits.MAX_ELEMENT_EVALS``."""
        self.evals += count
        if self.evals > limits.MAX_ELEMENT_EVALS:
            raise LimitError(
                f"classifying this layout at seq_len={self.n}, block={self.B} needs more than "
                f"{limits.MAX_ELEMENT_EVALS} element evaluations",
                hint="the pattern has many blocks that only evaluation can classify (a generic `where`?); "
                "use a shorter sequence, or write it with the primitives",
            )


class _Ctx:
    """One head-free pattern at one length and block: shared tables, and the
    call's ``_Budget`` (its own when none is given)."""

    def __init__(self, n: int, B: int, budget: _Budget | None = None):
        self.n, self.B = int(n), int(B)
        self.nb = -(-self.n // self.B)
        self.budget = budget or _Budget(self.n, self.B)
        self._estimates: dict[int, int] = {}
        self._random: dict[tuple, _RandomTable] = {}

    def charge(self, count: int) -> None:
        self.budget.charge(count)

    @property
    def evals(self) -> int:
        return self.budget.evals

    def random(self, node: ir.Random) -> "_RandomTable":
        key = (node.r, node.b, node.seed)
        if key not in self._random:
            self._random[key] = _RandomTable(node.r, node.b, node.seed, self)
        return self._random[key]


class _Tiles:
    """Block pairs ``(i, j)`` with their clipped element bounds (int64 arrays):
    rows ``q in [qlo, qhi]``, keys ``k in [klo, khi]``, ``d = q - k in [dlo, dhi]``."""

    def __init__(self, i: np.ndarray, j: np.ndarray, ctx: _Ctx):
        B, n = ctx.B, ctx.n
        self.ctx = ctx
        self.i, self.j = i, j
        self.qlo = i * B
        self.klo = j * B
        # in place: these arrays can hold millions of tiles
        self.qhi = self.qlo + (B - 1)
        np.minimum(self.qhi, n - 1, out=self.qhi)
        self.khi = self.klo + (B - 1)
        np.minimum(self.khi, n - 1, out=self.khi)

    @property
    def size(self) -> int:
        return self.i.size

    @cached_property
    def dlo(self) -> np.ndarray:
        return self.qlo - self.khi

    @cached_property
    def dhi(self) -> np.ndarray:
        return self.qhi - self.klo

    @cached_property
    def rows(self) -> np.ndarray:
        return self.qhi - self.qlo + 1

    @cached_property
    def cols(self) -> np.ndarray:
        return self.khi - self.klo + 1

    def take(self, sel: np.ndarray) -> "_Tiles":
        return _Tiles(self.i[sel], self.j[sel], self.ctx)


class _Rects(_Tiles):
    """Arbitrary rectangles ``[qlo, qhi] x [klo, khi]`` (not block-aligned):
    classified in closed form only, never evaluated."""

    def __init__(self, qlo, qhi, klo, khi, ctx: _Ctx):
        self.ctx = ctx
        self.i = self.j = None
        self.qlo, self.qhi, self.klo, self.khi = qlo, qhi, klo, khi

    @property
    def size(self) -> int:
        return self.qlo.size

    def take(self, sel) -> "_Rects":
        return _Rects(self.qlo[sel], self.qhi[sel], self.klo[sel], self.khi[sel], self.ctx)


# -- random(r, b, seed): the drawn cells of one node, mapped onto the tiles once per context


class _RandomTable:
    """The drawn ``(query b-block, key b-block)`` cells of one ``random`` node,
    mapped onto the layout's tiles: ``tile_keys`` (sorted ``i * nb + j``) and
    ``tile_counts``, the number of drawn cells meeting each tile."""

    def __init__(self, r: int, b: int, seed: int, ctx: _Ctx):
        n, B, nb = ctx.n, ctx.B, ctx.nb
        self.b = b
        self.nbr = nbr = -(-n // b)
        count = min(r, nbr)
        span = min(-(-b // B) + 1, nb)  # tiles a cell can meet along one side (no more than there are)
        # randomblocks.draw compares each new draw with the row's earlier ones.
        if nbr * count * span * span > limits.MAX_CANDIDATES or nbr * count * count > limits.MAX_ELEMENT_EVALS:
            raise LimitError(
                f"random(r={r}, b={b}) at seq_len={n}, block={B}: {nbr * count} drawn cells meeting up to "
                f"{nbr * count * span * span} tiles, over the limit of {limits.MAX_CANDIDATES}",
                hint="use a larger random block b or a smaller r",
            )
        if count == 0:
            table = np.zeros((nbr, 0), dtype=np.int64)
        else:
            table = randomblocks.draw(r, nbr, seed, np.arange(nbr))  # [nbr, count], rows sorted
        qb = np.repeat(np.arange(nbr, dtype=np.int64), count)
        kb = table.ravel().astype(np.int64)
        self.cells = qb * nbr + kb  # sorted: rows ascending, each row sorted
        # tiles met by each cell: rows i0..i1, columns j0..j1
        i0, i1 = qb * b // B, (np.minimum(qb * b + b, n) - 1) // B
        j0, j1 = kb * b // B, (np.minimum(kb * b + b, n) - 1) // B
        width = j1 - j0 + 1
        per = (i1 - i0 + 1) * width
        cell = np.repeat(np.arange(qb.size), per)
        o = run_offsets(per)
        keys = (i0[cell] + o // width[cell]) * nb + j0[cell] + o % width[cell]
        self.tile_keys, self.tile_counts = _unique(keys, counts=True)

    def allowed(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Element mask at positions ``q``, ``k`` (broadcast)."""
        key = (q // self.b) * self.nbr + k // self.b
        if self.cells.size == 0:
            return np.zeros(key.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self.cells, key), self.cells.size - 1)
        return self.cells[pos] == key


def _unique(keys: np.ndarray, counts: bool = False):
    """Sorted unique keys (and how often each occurs). A stable sort merges
    the sorted runs that candidates come in; numpy's hash-based np.unique is
    several times slower on these arrays."""
    keys = np.sort(keys, kind="stable")
    first = np.ones(keys.size, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    if not counts:
        return keys[first]
    starts = np.flatnonzero(first)
    return keys[starts], np.diff(np.append(starts, keys.size))
