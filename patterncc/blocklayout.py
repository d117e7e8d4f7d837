"""Block layouts: which (query block, key block) pairs a pattern touches.

``build`` is analytic: its cost grows with the number of non-empty block
pairs, never with ``n * n``. For one head-free pattern it works a band of
query-block rows at a time, in two steps:

1. **Candidates** (``_candidates``). Every node names a superset of its
   non-empty pairs, as sorted int64 keys ``i * nb + j``. Band-like primitives
   generate only what they touch (``local`` a diagonal band, ``global`` its
   rows and columns, ``stride(l)`` its diagonals when ``l`` is large,
   ``random`` its drawn blocks); a union is the union of its parts; an
   intersection expands only its sparsest part (by ``_estimate``, an upper
   bound on candidates), inside the window per row that its other parts
   allow (``_hull``: ``causal`` keeps key blocks ``0 .. i``); ``A - B`` is
   ``A``'s; ``where`` refines a quadtree of block rectangles, dropping those
   where interval arithmetic proves the condition false; a complement is
   every pair.
2. **Classes** (``_classify``). Every node classifies arbitrary pairs in
   closed form: the tile of pair ``(i, j)`` holds rows ``q in [qlo, qhi]``
   and keys ``k in [klo, khi]`` clipped to ``seq_len``, so ``d = q - k``
   takes every integer in ``[qlo - khi, qhi - klo]``, and each primitive's
   rule gives EMPTY / PARTIAL / FULL from those bounds. Combinators combine
   their parts' classes; where that cannot decide (two PARTIAL parts of a
   union, say) the node is evaluated exactly over just those tiles
   (``_scan_tiles``): over the ``2 * block - 1`` values of ``d`` when it
   depends only on ``q - k``, over ``block`` keys when only on ``k``, else
   over the ``block**2`` elements; tiles that a translation along the
   diagonal maps onto each other are evaluated once. ``where`` goes through
   interval arithmetic first and is evaluated only where that cannot decide.

So every class is exact (never PARTIAL when the tile is really EMPTY or
FULL), not just sound. Size guards refuse clearly, with ``LimitError``,
before the work they bound, instead of running out of time or memory. They
bound one call's work over all its heads together (a pattern of ``h`` has
one layout per distinct head): ``MAX_CANDIDATES`` candidate block pairs
(estimated before any is generated), ``MAX_ELEMENT_EVALS`` element
evaluations, ``MAX_SPARSE_ELEMENTS`` elements of a ``sparse_mask`` and
``MAX_BLOCKS`` blocks a side; ``ir.MAX_HEADS`` heads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import ir, randomblocks
from .errors import LimitError, PatternValueError
from .masks import evaluate
from .primitives import PRIMITIVES
from .primitives.base import EMPTY, FULL, PARTIAL, _abs_range, _classes, run_offsets, run_ranges  # noqa: F401

if TYPE_CHECKING:
    import scipy.sparse as sp  # imported where used: it costs ~0.1 s

# One call may examine at most this many candidate block pairs, all heads
# together (an upper bound computed before any work): about 20 s and 2 GB.
MAX_CANDIDATES = 2**26
# At most this many single (q, k) evaluations when classes need evaluating,
# all heads together (25-100 ns each: seconds, not minutes).
MAX_ELEMENT_EVALS = 2**28
# sparse_mask() builds at most this many allowed elements, all heads together
# (about 5 bytes each).
MAX_SPARSE_ELEMENTS = 2**27
# At most this many blocks a side (per-row tables are this long).
MAX_BLOCKS = 2**24
# Query-block rows are processed in bands of about this many candidates.
_BAND_PAIRS = 2**21
# Elements evaluated per numpy call when resolving tiles (bounds memory).
_EVAL_CHUNK = 2**22


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The non-empty block pairs of a pattern at one length, in natural token order.

    ``H`` is ``heads`` when the pattern depends on the head and 1 otherwise;
    ``nq = n_qblocks = ceil(seq_len / block)``, ``nk = n_kblocks`` (the same).
    Stored as CSR twice over; pointers are global offsets into the index
    arrays, which hold every head's entries one head after another:

    - ``kv_ptr``  int32 ``[H, nq + 1]``: query block ``i`` of head ``h`` owns
      entries ``kv_ptr[h, i] : kv_ptr[h, i + 1]`` of
    - ``kv_idx``  int32 ``[nnz]``: key block indices, ascending within a row,
    - ``kv_full`` bool ``[nnz]``: True when the pair is FULL (every element
      allowed, within ``seq_len``), False when PARTIAL.
    - ``q_ptr``   int32 ``[H, nk + 1]``, ``q_idx`` int32 ``[nnz]``,
      ``q_full`` bool ``[nnz]``: the same pairs by key block (for dK/dV),
      query block indices ascending within a column.

    ``pattern`` is the bound pattern the layout was built from.
    """

    pattern: ir.Pattern
    seq_len: int
    block: int
    heads: int
    kv_ptr: np.ndarray
    kv_idx: np.ndarray
    kv_full: np.ndarray
    q_ptr: np.ndarray
    q_idx: np.ndarray
    q_full: np.ndarray

    @property
    def n_qblocks(self) -> int:
        return self.kv_ptr.shape[1] - 1

    @property
    def n_kblocks(self) -> int:
        return self.q_ptr.shape[1] - 1

    @property
    def nnz(self) -> int:
        return int(self.kv_idx.size)

    @property
    def n_full(self) -> int:
        return int(np.count_nonzero(self.kv_full))

    @property
    def n_partial(self) -> int:
        return self.nnz - self.n_full

    @property
    def density(self) -> float:
        """Non-empty block pairs over all block pairs."""
        return self.nnz / max(1, self.heads * self.n_qblocks * self.n_kblocks)

    @property
    def mean_walk(self) -> float:
        """Keys in the blocks of a query block row, on average over the rows
        that have any: how long a forward program's loop is."""
        rows = int(np.count_nonzero(np.diff(self.kv_ptr, axis=1)))
        return self.nnz * self.block / max(1, rows)

    def kv_rows(self) -> np.ndarray:
        """int64 ``[nnz]``: the flat row ``h * nq + i`` of every kv entry."""
        counts = np.diff(self.kv_ptr, axis=1).ravel()
        return np.repeat(np.arange(counts.size, dtype=np.int64), counts)

    def to_dense(self) -> np.ndarray:
        """int8 ``[H, nq, nk]``: 0 empty, 1 partial, 2 full."""
        out = np.zeros((self.heads * self.n_qblocks, self.n_kblocks), dtype=np.int8)
        out[self.kv_rows(), self.kv_idx] = np.where(self.kv_full, FULL, PARTIAL)
        return out.reshape(self.heads, self.n_qblocks, self.n_kblocks)

    def describe(self, max_width: int | None = 64) -> str:
        """A text picture: a header line, then per head (``head h:`` when
        ``H > 1``) one line per query-block row, ``.`` empty, ``+`` partial,
        ``#`` full.

        When there are more than ``max_width`` blocks a side, each character
        stands for a ``g x g`` square of blocks (said in the header): ``#``
        when all of them are full, ``.`` when all are empty, ``+`` otherwise.
        ``max_width=None`` draws every block. Cost is proportional to ``nnz``
        plus the picture's size.
        """
        nq, nk, H = self.n_qblocks, self.n_kblocks, self.heads
        g = 1 if max_width is None else max(1, -(-max(nq, nk) // max_width))
        header = (
            f"seq_len={self.seq_len} block={self.block} heads={H} blocks={nq}x{nk} "
            f"nnz={self.nnz} full={self.n_full} partial={self.n_partial} density={self.density:.4f}"
        )
        if g > 1:
            header += f" (1 char = {g}x{g} blocks)"
        R, C = -(-nq // g), -(-nk // g)
        rows = self.kv_rows()
        head, i = rows // nq, rows % nq
        cell = (head * R + i // g) * C + self.kv_idx // g
        nonempty = np.bincount(cell, minlength=H * R * C).reshape(H, R, C)
        full = np.bincount(cell, weights=self.kv_full, minlength=H * R * C).reshape(H, R, C)
        size = np.outer(np.minimum(g, nq - np.arange(R) * g), np.minimum(g, nk - np.arange(C) * g))
        code = np.where(nonempty == 0, 0, np.where(full == size, 2, 1))
        chars = np.array([".", "+", "#"])[code]
        lines = [header]
        for h in range(H):
            if H > 1:
                lines.append(f"head {h}:")
            lines.extend("".join(row) for row in chars[h])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def element_density(self) -> float:
        """Allowed ``(q, k)`` elements over ``H * n * n``: FULL blocks counted,
        PARTIAL ones counted by exact evaluation (over ``q - k`` or ``k`` alone
        where the pattern allows, so most patterns cost far less than their
        partial elements)."""
        n, B = self.seq_len, self.block
        total = 0
        rows = self.kv_rows()
        budget = _Budget(n, B)
        for h in range(self.heads):
            lo, hi = self.kv_ptr[h, 0], self.kv_ptr[h, -1]
            ctx = _Ctx(n, B, budget)
            t = _Tiles(rows[lo:hi] - h * self.n_qblocks, self.kv_idx[lo:hi].astype(np.int64), ctx)
            full = self.kv_full[lo:hi]
            total += int(np.sum(t.rows[full] * t.cols[full]))
            partial = t.take(~full)
            if partial.size:
                total += int(_count_tiles(ir.for_head(self.pattern, h), partial).sum())
        return total / (self.heads * n * n)


def from_dense_classes(pattern: ir.Pattern, seq_len: int, block: int, classes: np.ndarray) -> BlockLayout:
    """Build the CSR record from int8 ``[H, nq, nk]`` classes (tests, small n)."""
    H, nq, nk = classes.shape
    h, i, j = np.nonzero(classes)
    full = classes[h, i, j] == FULL
    return _from_pairs(pattern, seq_len, block, [(i[h == x], j[h == x], full[h == x]) for x in range(H)], nq)


class HeadCSR(NamedTuple):
    """One head's block pairs both ways, as in ``BlockLayout`` but with int64
    pointers ``[nb + 1]`` that start at 0 (``from_heads`` offsets them)."""

    kv_ptr: np.ndarray
    kv_idx: np.ndarray
    kv_full: np.ndarray
    q_ptr: np.ndarray
    q_idx: np.ndarray
    q_full: np.ndarray


def _from_pairs(pattern: ir.Pattern, seq_len: int, block: int, heads: list, nb: int) -> BlockLayout:
    """The CSR record from per-head ``(i, j, full)`` arrays sorted by ``(i, j)``."""
    check_entries(sum(len(i) for i, _, _ in heads))
    by_key: dict[int, HeadCSR] = {}  # heads sharing arrays share their transpose
    for i, j, full in heads:
        if id(i) not in by_key:
            by_key[id(i)] = head_csr(i, j, full, nb)
    return from_heads(pattern, seq_len, block, [by_key[id(i)] for i, _, _ in heads])


def check_entries(total: int) -> None:
    """Refuse layouts whose offsets would not fit the int32 pointers."""
    if total > ir.MAX_VALUE:
        raise LimitError(f"the layout has {total} non-empty blocks, more than int32 offsets can address; use a larger block")


def head_csr(i: np.ndarray, j: np.ndarray, full: np.ndarray, nb: int) -> HeadCSR:
    """One head's CSR both ways from its pairs ``(i, j, full)`` sorted by ``(i, j)``."""
    kv_ptr = np.zeros(nb + 1, dtype=np.int64)
    kv_ptr[1:] = np.cumsum(np.bincount(i, minlength=nb))
    q_ptr, q_idx, order = _transpose(i, j, kv_ptr, nb)
    return HeadCSR(kv_ptr, j, full, q_ptr, q_idx, full[order])


def from_heads(pattern: ir.Pattern, seq_len: int, block: int, heads: list[HeadCSR]) -> BlockLayout:
    """The BlockLayout of per-head CSRs: every head's entries one after
    another, pointers offset to match, int32 indices and pointers."""
    total = sum(len(h.kv_idx) for h in heads)
    check_entries(total)
    starts = np.cumsum([0] + [len(h.kv_idx) for h in heads[:-1]])

    def ptrs(field):  # int32 [H, nb + 1]
        return np.stack([getattr(h, field) + start for h, start in zip(heads, starts)]).astype(np.int32)

    def cat(field, dtype):
        arrays = [getattr(h, field) for h in heads]
        if len(arrays) == 1:  # one head (or heads sharing one layout): no copy
            return np.asarray(arrays[0]).astype(dtype, copy=False)
        return np.concatenate(arrays).astype(dtype, copy=False)

    return BlockLayout(
        pattern=pattern, seq_len=seq_len, block=block, heads=len(heads),
        kv_ptr=ptrs("kv_ptr"), kv_idx=cat("kv_idx", np.int32), kv_full=cat("kv_full", bool),
        q_ptr=ptrs("q_ptr"), q_idx=cat("q_idx", np.int32), q_full=cat("q_full", bool),
    )


def _transpose(i: np.ndarray, j: np.ndarray, kv_ptr: np.ndarray, nb: int):
    """The same pairs by key block: ``(q_ptr, q_idx, order)`` with query
    blocks ascending within each key block; ``order`` maps entries back."""
    if len(i) < 2**20:
        order = np.argsort(j, kind="stable")  # i ascends already
        q_ptr = np.zeros(nb + 1, dtype=np.int64)
        q_ptr[1:] = np.cumsum(np.bincount(j, minlength=nb))
        return q_ptr, i[order], order
    # Large: scipy's CSR -> CSC conversion is a linear-time counting sort.
    import scipy.sparse as sp

    entry = np.arange(len(i), dtype=np.int64 if len(i) > ir.MAX_VALUE else np.int32)
    csc = sp.csr_matrix((entry, j, kv_ptr), shape=(nb, nb)).tocsc()
    return csc.indptr, csc.indices, csc.data


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------


def build(p: ir.Pattern, seq_len: int, block: int, heads: int = 1) -> BlockLayout:
    """The BlockLayout of pattern ``p`` (symbolic arguments allowed) at
    ``seq_len`` tokens, in blocks of ``block``, for ``heads`` heads."""
    bound, H = _prepare(p, seq_len, block, heads)
    seq_len, block = int(seq_len), int(block)
    nb = -(-seq_len // block)
    heads_of, ctxs = _head_contexts(bound, H, seq_len, block)
    built = {ph: _head_pairs(ph, ctx) for ph, ctx in ctxs.items()}
    return _from_pairs(bound, seq_len, block, [built[ph] for ph in heads_of], nb)


def estimate_blocks(p: ir.Pattern, seq_len: int, block: int, heads: int = 1) -> int:
    """An upper bound on ``build(...).nnz`` without building: cheap (no block
    pairs are generated), used by the planner to skip dense natural layouts."""
    bound, H = _prepare(p, seq_len, block, heads)
    seen: dict[ir.Pattern, int] = {}
    total = 0
    for h in range(H):
        ph = ir.for_head(bound, h)
        if ph not in seen:
            seen[ph] = _estimate(ph, _Ctx(int(seq_len), int(block)))
        total += seen[ph]
    return total


def sparse_mask(p: ir.Pattern, seq_len: int, heads: int = 1, *, block: int = 64) -> list[sp.csr_matrix]:
    """One bool CSR ``[n, n]`` per layout head (``H`` as in ``BlockLayout``),
    sorted indices, built from the layout at ``block``: FULL blocks expand to
    all their elements, PARTIAL blocks are evaluated (along their allowed
    diagonals for patterns of ``q - k`` alone). Time and memory follow the
    non-empty blocks and the allowed elements, never ``n * n``; the result
    itself holds about 5 bytes per allowed element."""
    bound, H = _prepare(p, seq_len, block, heads)
    n, block = int(seq_len), int(block)
    heads_of, ctxs = _head_contexts(bound, H, n, block)
    pairs = {ph: _head_pairs(ph, ctx) for ph, ctx in ctxs.items()}
    # FULL blocks alone are a lower bound on the elements: refuse before expanding any.
    side = min(block, n)
    at_least = sum(int(np.count_nonzero(full)) for _, _, full in pairs.values()) * side * side
    _check_elements(at_least, n, "at least ")
    budget = next(iter(ctxs.values())).budget
    built = {ph: _elements_csr(ph, *pairs[ph], n, block, budget) for ph in pairs}
    return [built[ph] for ph in heads_of]


def _check_elements(count: int, n: int, qualifier: str = "") -> None:
    if count > MAX_SPARSE_ELEMENTS:
        raise LimitError(
            f"sparse_mask at seq_len={n} holds {qualifier}{count} allowed elements, over the limit of "
            f"{MAX_SPARSE_ELEMENTS}",
            hint="use layout() (blocks, not elements) or a shorter sequence",
        )


def _head_contexts(bound: ir.Pattern, H: int, n: int, B: int):
    """``(pattern of each head, {distinct head pattern: its _Ctx})``, all
    contexts sharing one ``_Budget``: every distinct head's candidates are
    estimated and charged before any is generated, so a call over many heads
    is refused before it starts, not after hours."""
    budget = _Budget(n, B)
    heads_of = [ir.for_head(bound, h) for h in range(H)]
    ctxs: dict[ir.Pattern, _Ctx] = {}
    for ph in heads_of:
        if ph not in ctxs:
            ctx = ctxs[ph] = _Ctx(n, B, budget)
            budget.reserve(_estimate(ph, ctx), len(ctxs))
    return heads_of, ctxs


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatternValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise PatternValueError(f"{name}={value} must be >= 1")
    if value > ir.MAX_VALUE:
        raise LimitError(f"{name}={value} is larger than the limit {ir.MAX_VALUE}")


def _prepare(p: ir.Pattern, seq_len: int, block: int, heads: int) -> tuple[ir.Pattern, int]:
    """Check the sizes, the heads and the arguments; bind ``n``."""
    p = ir.split_terms(p)[0]  # score terms never change which pairs attend
    _check_int("seq_len", seq_len)
    _check_int("block", block)
    _check_int("heads", heads)
    nb = -(-int(seq_len) // int(block))
    if nb > MAX_BLOCKS:
        raise LimitError(
            f"seq_len={seq_len} in blocks of block={block} gives {nb} blocks a side, over the limit of {MAX_BLOCKS}",
            hint="use a larger block",
        )
    ir.check_heads(p, heads)
    bound = ir.bind(p, int(seq_len))
    return bound, (int(heads) if ir.depends_on_head(p) else 1)


def _head_pairs(p: ir.Pattern, ctx: "_Ctx") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty pairs of one head-free pattern (its candidates already
    charged to ``ctx.budget``): int32 ``i``, ``j`` sorted by ``(i, j)`` and
    bool ``full``."""
    nb = ctx.nb
    est = _estimate(p, ctx)
    band = max(1, int(nb * _BAND_PAIRS // max(est, 1)))
    out_i, out_j, out_full = [], [], []
    for r0 in range(0, nb, band):
        rows = np.arange(r0, min(nb, r0 + band), dtype=np.int64)
        cand = _candidates(p, rows, (np.zeros_like(rows), np.full_like(rows, nb - 1)), ctx, top=True)
        t = _Tiles(cand // nb, cand % nb, ctx)
        cls = _classify(p, t, ctx)
        keep = cls != EMPTY
        out_i.append(t.i[keep].astype(np.int32))
        out_j.append(t.j[keep].astype(np.int32))
        out_full.append(cls[keep] == FULL)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_full)


# ----------------------------------------------------------------------------
# Context and tiles
# ----------------------------------------------------------------------------


class _Budget:
    """The work one call may do, all its heads together."""

    def __init__(self, n: int, B: int):
        self.n, self.B = n, B
        self.candidates = 0
        self.evals = 0
        self.elements = 0  # of sparse_mask, all heads together

    def reserve(self, candidates: int, heads: int) -> None:
        """Count a head's estimated candidates against ``MAX_CANDIDATES``."""
        self.candidates += candidates
        if self.candidates > MAX_CANDIDATES:
            over = f"{heads} distinct heads" if heads > 1 else "one head"
            raise LimitError(
                f"the layout at seq_len={self.n}, block={self.B} would examine at least {self.candidates} "
                f"candidate block pairs ({over}), over the limit of {MAX_CANDIDATES}",
                hint="use a larger block, a shorter sequence or fewer heads",
            )

    def charge(self, count: int) -> None:
        """Count element evaluations against ``MAX_ELEMENT_EVALS``."""
        self.evals += count
        if self.evals > MAX_ELEMENT_EVALS:
            raise LimitError(
                f"classifying this layout at seq_len={self.n}, block={self.B} needs more than "
                f"{MAX_ELEMENT_EVALS} element evaluations",
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


def classify_rectangles(p: ir.Pattern, n: int, qlo, qhi, klo, khi) -> np.ndarray:
    """int8 classes of a bound, head-free pattern over token rectangles
    ``[qlo, qhi] x [klo, khi]`` (int64 arrays, inside ``[0, n)``): sound, not
    always exact — whatever closed forms cannot decide is PARTIAL. The
    planner uses it for gathered columns, whose slot blocks map to rectangles."""
    if any(isinstance(node, ir.Primitive) and node.TABLE for node in ir.walk(p)):
        raise ValueError("classify_rectangles cannot look up random() tables over rectangles")
    rects = _Rects(*(np.asarray(a, dtype=np.int64) for a in (qlo, qhi, klo, khi)), _Ctx(n, 1))
    return _classify(p, rects, rects.ctx)


# ----------------------------------------------------------------------------
# Rules per node: each primitive's own (``patterncc.primitives``: candidate key
# blocks per query-block row, classes of tiles), and ``where``'s below.
# ----------------------------------------------------------------------------


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
        if nbr * count * span * span > MAX_CANDIDATES or nbr * count * count > MAX_ELEMENT_EVALS:
            raise LimitError(
                f"random(r={r}, b={b}) at seq_len={n}, block={B}: {nbr * count} drawn cells meeting up to "
                f"{nbr * count * span * span} tiles, over the limit of {MAX_CANDIDATES}",
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


# -- where COND: interval arithmetic, then evaluation where it cannot decide.
#    Candidates come from refining a quadtree of block rectangles, dropping
#    every rectangle where the condition is proven false.


def _where_cells(node, ctx, r0, r1, c0, c1, min_size=1):
    """Rectangles of blocks ``[ra, ra + size) x [ca, ca + size)`` (clipped to
    rows ``r0 .. r1 - 1`` and key blocks ``c0 .. c1 - 1``) that together hold
    every block where the condition may hold: ``(ra, ca, size)``, each cell of
    the final level ``size`` or ``min_size`` blocks a side."""
    B, n = ctx.B, ctx.n
    size = 1 << max(0, (max(r1 - r0, c1 - c0) - 1).bit_length())
    ra = np.array([r0], dtype=np.int64)
    ca = np.array([c0], dtype=np.int64)
    done = []  # (ra, ca, size) of cells kept whole: true everywhere, or small enough
    while ra.size:
        rb, cb = np.minimum(ra + size, r1), np.minimum(ca + size, c1)
        env = {"q": (ra * B, np.minimum(rb * B, n) - 1), "k": (ca * B, np.minimum(cb * B, n) - 1), "n": (n, n)}
        true, false, _ = (np.broadcast_to(x, ra.shape) for x in _truth(node.cond, env))
        whole = true | (size <= min_size)
        done.append((ra[whole & ~false], ca[whole & ~false], size))
        split = ~false & ~whole
        ra, ca, size = ra[split], ca[split], size // 2
        ra = np.concatenate([ra, ra, ra + size, ra + size])
        ca = np.concatenate([ca, ca + size, ca, ca + size])
        inside = (ra < r1) & (ca < c1)
        ra, ca = ra[inside], ca[inside]
    return done


def _rows_where(node, ctx, rows, win):
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(win[0].min()), int(win[1].max()) + 1
    if c0 >= c1:
        return rows[:0], rows[:0], rows[:0]
    parts = []
    for ra, ca, size in _where_cells(node, ctx, r0, r1, c0, c1):
        height = np.minimum(ra + size, r1) - ra  # one interval per row of each cell
        r = np.repeat(ra, height) + run_offsets(height)
        lo = np.repeat(ca, height)
        parts.append((r, lo, np.minimum(lo + size, c1) - 1))
    return tuple(np.concatenate([p[x] for p in parts]) for x in range(3))


def _estimate_where(node, ctx) -> int:
    """Blocks in the cells a coarse refinement keeps (at most 64 a side: cheap
    enough to run for each of thousands of heads before any is built)."""
    nb = ctx.nb
    cells = _where_cells(node, ctx, 0, nb, 0, nb, min_size=max(1, nb // 64))
    return int(sum(np.sum((np.minimum(ra + size, nb) - ra) * (np.minimum(ca + size, nb) - ca)) for ra, ca, size in cells))


def _class_where(node, t):
    env = {"q": (t.qlo, t.qhi), "k": (t.klo, t.khi), "n": (t.ctx.n, t.ctx.n)}
    true, false, partial = (np.broadcast_to(x, (t.size,)) for x in _truth(node.cond, env))
    out = np.where(true, FULL, np.where(false, EMPTY, PARTIAL)).astype(np.int8)
    unknown = ~true & ~false & ~partial
    if unknown.any():
        out[unknown] = _resolve(node, t.take(unknown))
    return out


_ROWS = {cls: cls.rows for cls in PRIMITIVES.values()} | {ir.Where: _rows_where}
_CLASS = {cls: cls.classify for cls in PRIMITIVES.values()} | {ir.Where: _class_where}


# ----------------------------------------------------------------------------
# Estimates: an upper bound on the number of candidate pairs a node generates
# ----------------------------------------------------------------------------


def _estimate(node: ir.Pattern, ctx: _Ctx) -> int:
    cached = ctx._estimates.get(id(node))
    if cached is None:
        cached = ctx._estimates[id(node)] = min(_estimate_node(node, ctx), ctx.nb * ctx.nb)
    return cached


def _estimate_node(node: ir.Pattern, ctx: _Ctx) -> int:
    nb = ctx.nb
    match node:
        case ir.Primitive():
            return node.estimate(ctx)
        case ir.Where():
            return _estimate_where(node, ctx)
        case ir.Union(parts=parts):
            return sum(_estimate(c, ctx) for c in parts)
        case ir.Intersect(parts=parts):
            return min(_estimate(c, ctx) for c in parts)
        case ir.Difference(left=a):
            return _estimate(a, ctx)
    return nb * nb  # complement


# ----------------------------------------------------------------------------
# Candidates: a superset of the non-empty pairs of rows [r0, r1)
# ----------------------------------------------------------------------------


def _candidates(node: ir.Pattern, rows: np.ndarray, win, ctx: _Ctx, top: bool = False) -> np.ndarray:
    """Sorted unique int64 keys ``i * nb + j``: a superset of the node's
    non-empty pairs in query-block rows ``rows`` (consecutive) whose key block
    lies in the window ``win = (lo, hi)`` (int64 per row).

    ``top`` says the caller classifies every candidate exactly afterwards, so
    an intersection need not filter its sparsest part by the others.
    """
    match node:
        case ir.Union(parts=parts):
            return _unique(np.concatenate([_candidates(c, rows, win, ctx) for c in parts]))
        case ir.Intersect(parts=parts):
            best = min(parts, key=lambda c: _estimate(c, ctx))
            lo, hi = win
            for c in parts:  # the other parts narrow the window where they can
                h = _hull(c, ctx, rows) if c is not best else None
                if h is not None:
                    lo, hi = np.maximum(lo, h[0]), np.minimum(hi, h[1])
            keys = _candidates(best, rows, (lo, hi), ctx, top)
            if not top:
                t = _Tiles(keys // ctx.nb, keys % ctx.nb, ctx)
                keep = np.ones(keys.size, dtype=bool)
                for c in parts:
                    if c is not best:
                        keep &= _classify(c, t, ctx) != EMPTY
                keys = keys[keep]
            return keys
        case ir.Difference(left=a):
            return _candidates(a, rows, win, ctx, top)
    rule = _ROWS.get(type(node))
    intervals = rule(node, ctx, rows, win) if rule else None
    if intervals is None:  # every key block
        intervals = rows, win[0], win[1]
    r, jlo, jhi = intervals
    at = r - rows[0]
    keys = _expand(r, np.maximum(jlo, win[0][at]), np.minimum(jhi, win[1][at]), ctx.nb)
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
        keys = _unique(keys)
    return keys


def _hull(node: ir.Pattern, ctx: _Ctx, rows: np.ndarray):
    """``(lo, hi)`` key blocks per row outside which the node is empty, or
    None when it has no such cheap bound."""
    match node:
        case ir.Intersect(parts=parts) | ir.Union(parts=parts):
            hulls = [_hull(c, ctx, rows) for c in parts]
            known = [h for h in hulls if h is not None]
            if isinstance(node, ir.Intersect) and known:
                return functools.reduce(np.maximum, [h[0] for h in known]), functools.reduce(np.minimum, [h[1] for h in known])
            if isinstance(node, ir.Union) and len(known) == len(hulls):
                return functools.reduce(np.minimum, [h[0] for h in known]), functools.reduce(np.maximum, [h[1] for h in known])
            return None
        case ir.Primitive() if node.HULL:
            full = (np.zeros_like(rows), np.full_like(rows, ctx.nb - 1))
            r, lo, hi = node.rows(ctx, rows, full)  # one interval per row
            return np.broadcast_to(lo, rows.shape), np.broadcast_to(hi, rows.shape)
    return None


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


def _expand(rows: np.ndarray, jlo: np.ndarray, jhi: np.ndarray, nb: int) -> np.ndarray:
    """Keys ``i * nb + j`` for every ``j`` in ``[jlo, jhi]`` (clipped) of each row."""
    jlo = np.maximum(jlo, 0)
    jhi = np.minimum(jhi, nb - 1)
    keep = jlo <= jhi
    if not keep.all():
        rows, jlo, jhi = rows[keep], jlo[keep], jhi[keep]
    length = jhi - jlo + 1
    shift = np.cumsum(length) - length - (rows * nb + jlo)  # output offset minus first key
    return np.arange(int(length.sum()), dtype=np.int64) - np.repeat(shift, length)


# ----------------------------------------------------------------------------
# Classes of arbitrary tiles, exact
# ----------------------------------------------------------------------------


def _classify(node: ir.Pattern, t: _Tiles, ctx: _Ctx) -> np.ndarray:
    """int8 ``[t.size]``: the exact class of every tile."""
    match node:
        case ir.Union(parts=parts):
            full = np.zeros(t.size, dtype=bool)
            partials = np.zeros(t.size, dtype=np.int32)
            for c in parts:
                cls = _classify(c, t, ctx)
                full |= cls == FULL
                partials += cls == PARTIAL
            out = np.where(full, FULL, np.minimum(partials, 1)).astype(np.int8)
            unsure = ~full & (partials >= 2)  # PARTIAL or FULL
        case ir.Intersect(parts=parts):
            empty = np.zeros(t.size, dtype=bool)
            partials = np.zeros(t.size, dtype=np.int32)
            for c in parts:
                cls = _classify(c, t, ctx)
                empty |= cls == EMPTY
                partials += cls == PARTIAL
            out = np.where(empty, EMPTY, FULL - np.minimum(partials, 1)).astype(np.int8)
            unsure = ~empty & (partials >= 2)  # EMPTY or PARTIAL
        case ir.Difference(left=a, right=b):
            ca, cb = _classify(a, t, ctx), _classify(b, t, ctx)
            out = np.where((ca == EMPTY) | (cb == FULL), EMPTY,
                           np.where((ca == FULL) & (cb == EMPTY), FULL, PARTIAL)).astype(np.int8)
            unsure = (ca == PARTIAL) & (cb == PARTIAL)  # EMPTY or PARTIAL
        case ir.Complement(arg=a):
            return (FULL - _classify(a, t, ctx)).astype(np.int8)
        case _:
            rule = _CLASS.get(type(node))
            if rule is None:
                raise TypeError(f"layout needs a bound, head-free pattern; got {type(node).__name__}")
            return rule(node, t)
    if unsure.any():
        out[unsure] = _resolve(node, t.take(unsure))
    return out


# ----------------------------------------------------------------------------
# Evaluation over tiles (the exact fallback)
# ----------------------------------------------------------------------------

_D_ONLY = tuple(cls for cls in PRIMITIVES.values() if "d" in cls.DEPENDS_ON)
_K_ONLY = tuple(cls for cls in PRIMITIVES.values() if "k" in cls.DEPENDS_ON)
_COMBINATORS = (ir.Union, ir.Intersect, ir.Difference, ir.Complement)


def _depends_on(node: ir.Pattern) -> str:
    """"d" when the node depends only on ``q - k``, "k" when only on ``k``,
    else "qk"."""
    leaves = [c for c in ir.walk(node) if not isinstance(c, _COMBINATORS)]
    if all(isinstance(c, _D_ONLY) for c in leaves):
        return "d"
    if all(isinstance(c, _K_ONLY) for c in leaves):
        return "k"
    return "qk"


def _resolve(node: ir.Pattern, t: _Tiles) -> np.ndarray:
    """Exact classes of tiles ``t`` by evaluating ``node`` (PARTIAL, which is
    sound, for rectangles: see ``classify_rectangles``)."""
    if isinstance(t, _Rects):
        return np.full(t.size, PARTIAL, dtype=np.int8)
    anything, everything = _scan_tiles(node, t, count=False)
    return _classes(anything, everything)


def _count_tiles(node: ir.Pattern, t: _Tiles) -> np.ndarray:
    """int64 ``[t.size]``: allowed elements in each tile."""
    return _scan_tiles(node, t, count=True)


def _period(node: ir.Pattern, B: int) -> int | None:
    """``P`` such that tiles ``(i, j)`` and ``(i + P, j + P)`` hold the same
    mask (away from the end of the sequence), or None.

    Each primitive says its own period (``period()``): 1 for functions of
    ``q - k``, which are unchanged when ``q`` and ``k`` move together; ``l``
    for ``block(l)`` and ``summary(l, c)``; None when it has none. ``P * B``
    is the least common multiple of those periods and ``B``.
    """
    L = 1
    for c in ir.walk(node):
        if isinstance(c, _COMBINATORS):
            continue
        period = c.period() if isinstance(c, ir.Primitive) else None
        if period is None:
            return None
        L = math.lcm(L, period)
    return L // math.gcd(L, B)


def _scan_tiles(node: ir.Pattern, t: _Tiles, count: bool):
    """Evaluate ``node`` over every element of the tiles, as cheaply as its
    dependence allows. Returns ``(any, all)`` bool arrays, or with ``count``
    the number of allowed elements per tile.

    Tiles that translation maps onto each other (``_period``) are evaluated
    once: strided or fixed patterns then cost a few tiles per diagonal.
    """
    ctx = t.ctx
    P = _period(node, ctx.B)
    if P is None or P >= ctx.nb or t.size < 2:
        return _scan_each(node, t, count)
    whole = (t.rows == ctx.B) & (t.cols == ctx.B)  # not cut by the end of the sequence
    key = np.where(whole, (t.i - t.j + ctx.nb) * P + t.i % P, -1 - np.arange(t.size))
    order = np.argsort(key, kind="stable")
    first = np.ones(t.size, dtype=bool)
    np.not_equal(key[order][1:], key[order][:-1], out=first[1:])
    group = np.cumsum(first) - 1  # the group of each tile in sorted order
    reps = order[first]
    inverse = np.empty(t.size, dtype=np.int64)
    inverse[order] = group
    if reps.size == t.size:
        return _scan_each(node, t, count)
    got = _scan_each(node, t.take(reps), count)
    return got[inverse] if count else (got[0][inverse], got[1][inverse])


def _scan_each(node: ir.Pattern, t: _Tiles, count: bool):
    """``_scan_tiles`` tile by tile.

    Positions past a tile's clipped bounds are clamped onto its last valid
    row or key (duplicates change neither ``any`` nor ``all``); counts use
    explicit weights instead.
    """
    ctx = t.ctx
    B, n = ctx.B, ctx.n
    mode = _depends_on(node)
    side = min(B, n)
    if mode == "d":
        width = 2 * side - 1
    elif mode == "k":
        width = side
    else:
        width = side * side
    ctx.charge(t.size * width)
    results = []
    step = max(1, _EVAL_CHUNK // width)
    if mode == "qk":
        for lo in range(0, t.size, step):
            results.append(_scan_elements(node, t.take(slice(lo, lo + step)), count))
    else:
        offsets = np.arange(width, dtype=np.int64)
        for lo in range(0, t.size, step):
            s = t.take(slice(lo, lo + step))
            if mode == "d":
                x = s.dlo[:, None] + offsets
                valid = x <= s.dhi[:, None]
                m = evaluate(node, np.minimum(x, s.dhi[:, None]), np.int64(0), n)
                # elements of the tile on diagonal x: q in [qlo, qhi] and q - x in [klo, khi]
                weight = np.minimum(s.qhi[:, None], s.khi[:, None] + x) - np.maximum(s.qlo[:, None], s.klo[:, None] + x) + 1
            else:
                x = s.klo[:, None] + offsets
                valid = x <= s.khi[:, None]
                m = evaluate(node, np.int64(0), np.minimum(x, s.khi[:, None]), n)
                weight = s.rows[:, None]
            if count:
                results.append(np.sum(np.where(m & valid, weight, 0), axis=1))
            else:
                results.append((m.any(axis=1), m.all(axis=1)))
    if count:
        return np.concatenate(results) if results else np.zeros(0, dtype=np.int64)
    if not results:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    return np.concatenate([a for a, _ in results]), np.concatenate([b for _, b in results])


def _scan_elements(node: ir.Pattern, t: _Tiles, count: bool):
    """``_scan_tiles`` over the full ``[rows, keys]`` grid of every tile, a slab
    of rows at a time when one tile is larger than ``_EVAL_CHUNK``."""
    ctx = t.ctx
    side = min(ctx.B, ctx.n)
    offsets = np.arange(side, dtype=np.int64)
    k = np.minimum(t.klo[:, None] + offsets, t.khi[:, None])[:, None, :]  # [T, 1, side]
    kvalid = (t.klo[:, None] + offsets <= t.khi[:, None])[:, None, :]
    slab = max(1, _EVAL_CHUNK // (side * max(1, t.size)))
    anything = np.zeros(t.size, dtype=bool)
    everything = np.ones(t.size, dtype=bool)
    total = np.zeros(t.size, dtype=np.int64)
    for r0 in range(0, side, slab):
        rows = offsets[r0 : r0 + slab]
        q = t.qlo[:, None] + rows
        qvalid = (q <= t.qhi[:, None])[:, :, None]
        q = np.minimum(q, t.qhi[:, None])[:, :, None]  # [T, slab, 1]
        m = _evaluate(node, q, k, ctx)
        if count:
            total += np.sum(m & qvalid & kvalid, axis=(1, 2))
        else:
            anything |= m.any(axis=(1, 2))
            everything &= m.all(axis=(1, 2))
    return total if count else (anything, everything)


def _evaluate(node: ir.Pattern, q: np.ndarray, k: np.ndarray, ctx: _Ctx) -> np.ndarray:
    """``masks.evaluate``, but ``random`` looks up its drawn cells sparsely
    (masks.py builds a dense table of them, too big for long sequences)."""
    return evaluate(node, q, k, ctx.n, random=lambda r, qq, kk: ctx.random(r).allowed(qq, kk))


# ----------------------------------------------------------------------------
# Interval arithmetic for `where`
#
# Over a set of tiles an integer expression becomes a ``_Span``: bounds
# ``[lo, hi]`` on its value in each tile; ``wild`` where no bound is known (a
# division by a range holding 0, a value beyond +-2**60); ``tight`` where both
# bounds are attained by some element of the tile; ``dense`` when every
# integer in between is attained; ``vars``, the positions (q, k) it reads.
# Parts that read disjoint positions vary independently over a tile (a tile
# is a product of a row range and a key range), which is what makes bounds
# attained. A condition becomes ``(true, false, partial)``: holds in every
# element, in none, in some but not all (none of the three: unknown, so the
# tile is evaluated). Python semantics, as in ``mask.eval_expr``.
# ----------------------------------------------------------------------------

_BIG = 2**60


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
    hi = np.where(one_period, a.hi % blo, np.where(blo > 0, bhi - 1, 0))
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


# ----------------------------------------------------------------------------
# Element CSR from a layout
# ----------------------------------------------------------------------------

# Element slots materialized at once while expanding blocks into a CSR.
_CSR_CHUNK = 2**20


def _elements_csr(p: ir.Pattern, i, j, full, n: int, B: int, budget: _Budget | None = None) -> sp.csr_matrix:
    """bool CSR ``[n, n]`` of the elements of the non-empty tiles ``(i, j)``
    (sorted by ``(i, j)``): FULL tiles expand whole; PARTIAL tiles are
    evaluated, along their allowed diagonals when the pattern depends only on
    ``q - k`` (so a strided pattern costs its allowed elements, not
    ``block**2`` per tile), element by element otherwise.

    Works a band of query-block rows at a time (a slab of rows of one block
    row when that row alone is too wide). Per block row the tiles' columns are
    laid side by side in key order, so ``np.nonzero`` of ``[rows, columns]``
    yields the elements already row-major with sorted keys.
    """
    import scipy.sparse as sp

    ctx = _Ctx(n, B, budget)
    nb, side = ctx.nb, min(B, n)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    diagonal = _depends_on(p) == "d"
    ctx.charge(int(np.count_nonzero(~full)) * (2 * side - 1 if diagonal else side * side))
    row_start = np.searchsorted(i, np.arange(nb + 1))  # tiles of block row x: row_start[x] : row_start[x + 1]
    counts = np.zeros(n, dtype=np.int64)
    parts = []
    x = 0
    while x < nb:
        # block rows x .. y - 1, about _CSR_CHUNK element slots (at least one row)
        y = int(np.searchsorted(row_start, row_start[x] + max(1, _CSR_CHUNK // (side * side)), "right")) - 1
        y = min(max(y, x + 1), nb)
        lo, hi = row_start[x], row_start[y]
        if lo == hi:
            x = y
            continue
        t = _Tiles(i[lo:hi], j[lo:hi], ctx)
        boxed = full[lo:hi] | (not diagonal)  # tiles expanded as [rows, keys] boxes
        diag_tile, diag_d = _allowed_diagonals(p, t, ~boxed)
        slab = side if y > x + 1 else max(1, _CSR_CHUNK // (side * (hi - lo)))
        for a0 in range(0, side, slab):
            a1 = min(side, a0 + slab)
            boxes = _tile_elements(p, t, full[lo:hi], boxed, a0, a1, ctx)  # [boxed tiles, rows, side]
            box_of = np.cumsum(boxed) - 1  # position of each boxed tile in `boxes`
            for r in range(x, y):
                s0, s1 = row_start[r] - lo, row_start[r + 1] - lo
                if s0 == s1:
                    continue
                q0 = r * B + a0
                rows = min(n, r * B + a1) - q0
                if rows <= 0:
                    continue
                k, per_row = _row_elements(t, boxes, box_of, boxed, diag_tile, diag_d, s0, s1, q0, rows, side)
                counts[q0 : q0 + rows] = per_row
                ctx.budget.elements += k.size
                _check_elements(ctx.budget.elements, n)
                parts.append(k)
        x = y
    nnz = int(counts.sum())
    index = np.int32 if nnz <= ir.MAX_VALUE else np.int64
    indptr = np.zeros(n + 1, dtype=index)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(parts).astype(index, copy=False) if parts else np.zeros(0, dtype=index)
    del parts
    out = sp.csr_matrix((np.ones(nnz, dtype=bool), indices, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


def _allowed_diagonals(p: ir.Pattern, t: _Tiles, which: np.ndarray):
    """For the tiles ``which`` of ``t`` (of a pattern of ``q - k`` only): the
    allowed ``d = q - k`` of each, as ``(tile index in t, d)`` sorted by tile,
    then ``d`` descending (keys ascending)."""
    idx = np.flatnonzero(which)
    if idx.size == 0:
        return idx, idx
    s = t.take(idx)
    offsets = np.arange(2 * min(t.ctx.B, t.ctx.n) - 1, dtype=np.int64)
    d = s.dhi[:, None] - offsets  # descending
    valid = d >= s.dlo[:, None]
    allowed = evaluate(p, np.maximum(d, s.dlo[:, None]), np.int64(0), t.ctx.n) & valid
    tile, col = np.nonzero(allowed)
    return idx[tile], d[tile, col]


def _tile_elements(p, t: _Tiles, full, boxed, a0: int, a1: int, ctx: _Ctx) -> np.ndarray:
    """bool ``[boxed tiles, a1 - a0, side]``: allowed elements of rows
    ``a0 .. a1 - 1`` of the boxed tiles (False outside ``seq_len``)."""
    s = t.take(boxed)
    side = min(ctx.B, ctx.n)
    q = s.qlo[:, None, None] + np.arange(a0, a1)[None, :, None]  # [T, rows, 1]
    k = s.klo[:, None, None] + np.arange(side)[None, None, :]  # [T, 1, side]
    m = (q <= s.qhi[:, None, None]) & (k <= s.khi[:, None, None])
    partial = ~full[boxed]
    if partial.any():
        qp = np.minimum(q[partial], s.qhi[partial, None, None])
        kp = np.minimum(k[partial], s.khi[partial, None, None])
        m[partial] &= _evaluate(p, qp, kp, ctx)
    return m


def _row_elements(t, boxes, box_of, boxed, diag_tile, diag_d, s0, s1, q0, rows, side):
    """Sorted keys of rows ``q0 .. q0 + rows - 1`` in tiles ``s0 .. s1 - 1``
    (one block row), and how many per row."""
    q = q0 + np.arange(rows)
    # columns of boxed tiles: key klo + c, the same in every row
    box_tiles = np.flatnonzero(boxed[s0:s1]) + s0
    box_cols = boxes[box_of[box_tiles], :rows].transpose(1, 0, 2).reshape(rows, -1)
    box_tile = np.repeat(box_tiles, side)
    box_key = (t.klo[box_tiles][:, None] + np.arange(side)).ravel()
    # columns of diagonals: key q - d, allowed while it stays inside the tile
    lo, hi = np.searchsorted(diag_tile, [s0, s1])
    dt, d = diag_tile[lo:hi], diag_d[lo:hi]
    first = np.maximum(t.qlo[dt], t.klo[dt] + d)
    last = np.minimum(t.qhi[dt], t.khi[dt] + d)
    diag_cols = (q[:, None] >= first) & (q[:, None] <= last)
    # tiles in key order; inside a tile keys ascend already
    order = np.argsort(np.concatenate([box_tile, dt]), kind="stable")
    grid = np.concatenate([box_cols, diag_cols], axis=1)[:, order]
    base = np.concatenate([box_key, -d])[order]
    slope = np.concatenate([np.zeros(box_key.size, dtype=np.int64), np.ones(d.size, dtype=np.int64)])[order]
    a, col = np.nonzero(grid)
    keys = base[col] + slope[col] * q[a]
    return keys.astype(np.int32), np.bincount(a, minlength=rows)


def row_pairs(p: ir.Pattern, seq_len: int, block: int, heads: int, first: int, last: int) -> list:
    """The non-empty pairs of query-block rows ``first .. last`` only, per
    layout head (``H`` as in ``BlockLayout``): ``(i, j, full)`` sorted by
    ``(i, j)``, as ``build`` would give them for those rows. Decoding reads
    the last rows of a long sequence: their cost is that of the rows, not of
    the layout."""
    bound, H = _prepare(p, seq_len, block, heads)
    ctx_n, block = int(seq_len), int(block)
    built: dict[ir.Pattern, tuple] = {}
    out = []
    for h in range(H):
        ph = ir.for_head(bound, h)
        if ph not in built:
            ctx = _Ctx(ctx_n, block)
            rows = np.arange(max(0, first), min(ctx.nb - 1, last) + 1, dtype=np.int64)
            cand = _candidates(ph, rows, (np.zeros_like(rows), np.full_like(rows, ctx.nb - 1)), ctx, top=True)
            t = _Tiles(cand // ctx.nb, cand % ctx.nb, ctx)
            keep = _classify(ph, t, ctx) if t.size else np.zeros(0, dtype=np.int8)
            built[ph] = (t.i[keep != EMPTY], t.j[keep != EMPTY], keep[keep != EMPTY] == FULL)
        out.append(built[ph])
    return out
