"""Property-test a sparse attention pattern: hypothesis strategies, assertions
and a ready-made suite.

    import patterncc as pcc
    from patterncc.testing import check_pattern

    def test_my_pattern():
        report = check_pattern(pcc.load("my_pattern.pat"))
        assert report.ok, report

``check_pattern`` runs, for one pattern, (1) its block layout against the
classes brute-forced from the element mask, over random lengths, block sizes
and head counts, and (2) every attention backend available on this machine
against the float64 reference, forward (``o``, ``lse``) and backward (``dq``,
``dk``, ``dv``, and the gradients of the score terms' tensors), over random
shapes, dtypes and scales, and (3) every backend's packed batches
(``cu_seqlens``) against each sequence computed alone. The reference itself is
checked against an independent dense float64 computation in this module
(torch autograd). A failure comes back shrunk by hypothesis to a minimal
counterexample, with a shell command that reproduces it.

The pieces, for writing your own properties:

- strategies: ``patterns(...)`` (well-formed IR patterns over every primitive
  and combinator; ``terms=True`` adds score terms, ``with softcap(c), alibi``),
  ``where_conditions(...)``, ``attention_inputs(...)`` (an ``AttentionCase``;
  ``terms=True`` draws the call's term tensors too), ``packed_inputs(...)``
  and ``packed_lengths(...)`` (packed batches: sequence lengths with
  boundaries inside blocks and on their edges), ``make_tensors(case)``,
  ``make_terms(case)`` and ``make_cu_seqlens(case)``;
- assertions: ``assert_layout_sound(pat, seq_len, block, heads)``,
  ``assert_matches_reference(attn, pat, q, k, v, sinks=..., rel_bias=...,
  alibi_slopes=...)`` and ``assert_packed_matches_reference(attn, pat, q, k,
  v, cu_seqlens, ...)`` (a packed call against each sequence alone);
- brute force: ``block_classes(...)`` and ``dense_attention(...)``;
- ``run_files(files)``, behind ``patterncc test FILE...``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random as _random
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
from hypothesis import HealthCheck, Verbosity, given, settings, strategies as st
from hypothesis import seed as _hypothesis_seed

from . import ir
from .errors import PatternError
from .blocklayout import EMPTY, FULL, PARTIAL

__all__ = [
    "AttentionCase",
    "Counterexample",
    "Report",
    "TOLERANCES",
    "Tolerance",
    "assert_layout_sound",
    "assert_matches_reference",
    "assert_packed_matches_reference",
    "available_backends",
    "block_classes",
    "check_pattern",
    "dense_attention",
    "make_cu_seqlens",
    "make_tensors",
    "make_terms",
    "attention_inputs",
    "packed_inputs",
    "packed_lengths",
    "patterns",
    "reproduce",
    "run_files",
    "where_conditions",
]


# ============================================================================
# Strategies
# ============================================================================

def _primitives(allow_random: bool) -> list[st.SearchStrategy]:
    """Each primitive's own strategy (``patterncc.primitives``), in the order
    of ``ir.PRIMITIVES``; ``random`` (a table) only with ``allow_random``."""
    return [cls.strategy() for cls in ir.PRIMITIVES.values() if allow_random or not cls.TABLE]


def _int_exprs(variables: Sequence[str], depth: int) -> st.SearchStrategy:
    """Integer expressions with Python semantics. ``*`` always has a constant
    factor and ``//``, ``%`` a positive constant divisor (what the language
    allows), so values stay linear in the positions: no int32 overflow in
    kernels for any realistic ``n``."""
    leaf = st.one_of(st.sampled_from([ir.Var(v) for v in variables]), st.integers(-4, 16).map(ir.Const))
    if depth <= 0:
        return leaf
    sub = _int_exprs(variables, depth - 1)
    const = st.integers(-3, 4).map(ir.Const)
    divisor = st.integers(1, 8).map(ir.Const)
    return st.one_of(
        leaf,
        st.builds(ir.BinOp, st.sampled_from(["+", "-"]), sub, sub),
        st.builds(ir.BinOp, st.just("*"), sub, const),
        st.builds(ir.BinOp, st.sampled_from(["//", "%"]), sub, divisor),
        st.builds(lambda a: ir.Call("abs", (a,)), sub),
        st.builds(lambda fn, a, b: ir.Call(fn, (a, b)), st.sampled_from(["min", "max"]), sub, sub),
    )


def where_conditions(variables: Sequence[str] = ir.VARS, max_depth: int = 2) -> st.SearchStrategy:
    """Boolean ``where`` conditions over ``variables`` (default ``q, k, h, n``):
    comparisons of integer expressions built with ``+ - * // % abs min max``,
    combined with ``and``, ``or``, ``not``. Divisors are positive constants."""
    ints = _int_exprs(tuple(variables), max_depth)
    compare = st.builds(ir.Compare, st.sampled_from(ir.CMP_OPS), ints, ints)
    if max_depth <= 1:
        return compare

    def extend(sub):
        return st.one_of(
            st.builds(lambda op, parts: ir.BoolOp(op, tuple(parts)), st.sampled_from(["and", "or"]),
                      st.lists(sub, min_size=2, max_size=3)),
            st.builds(ir.Not, sub),
        )

    return st.recursive(compare, extend, max_leaves=max(2, 2 * max_depth))


def patterns(
    max_depth: int = 3,
    max_leaves: int = 6,
    heads: int | None = None,
    allow_where: bool = True,
    allow_random: bool = True,
    causal_only: bool = False,
    terms: bool = False,
) -> st.SearchStrategy:
    """Well-formed IR patterns over every primitive and combinator.

    Leaves are the primitives (``all none causal local stride block summary
    global sink dilated band``, ``random`` unless ``allow_random=False``, ``where``
    with a random condition unless ``allow_where=False``) with small integer
    arguments; inner nodes are ``| & - ~`` and, when ``heads`` is given,
    ``heads { .. }`` (ranges covering exactly ``0..heads``) and ``cycle(..)``.
    At most ``max_depth`` combinator levels and ``max_leaves`` leaves. With
    ``causal_only`` every pattern is ``causal & (...)``. With ``terms`` the
    pattern may carry score terms: ``softcap(c)`` for ``c`` in ``SOFTCAPS``
    and ``alibi`` (shrinking towards none).

    The leaf branch is drawn first at every level, so a failing pattern
    shrinks to a single primitive whenever that still fails.
    """
    leaves = _primitives(allow_random)
    if allow_where:
        leaves.append(st.builds(ir.Where, where_conditions()))
    leaf = st.one_of(leaves)
    tree = _trees(leaf, max_depth, max_leaves, heads)
    if causal_only:
        tree = tree.map(lambda p: ir.Causal() & p)
    if not terms:
        return tree
    softcaps = st.none() | st.sampled_from(SOFTCAPS)
    return st.tuples(tree, softcaps, st.booleans()).map(lambda t: t[0].scored(softcap=t[1], alibi=t[2]))


# Softcaps the strategies draw: around the size of the scaled scores of
# standard normal inputs (so the cap bends them), and a large, Gemma-like one.
SOFTCAPS = (1.0, 0.5, 2.5, 30.0)


def _trees(leaf, max_depth: int, max_leaves: int, heads: int | None) -> st.SearchStrategy:
    @st.composite
    def node(draw, depth: int, budget: int):
        """``(pattern, leaves used)`` with at most ``budget`` leaves."""
        kinds = ["leaf"]
        if depth > 0:
            kinds.append("~")
            if budget >= 2:
                kinds += ["|", "&", "-"]
                if heads is not None:
                    kinds += ["heads", "cycle"]
        kind = draw(st.sampled_from(kinds))
        if kind == "leaf":
            return draw(leaf), 1
        if kind == "~":
            arg, used = draw(node(depth - 1, budget))
            return ~arg, used
        if kind in ("|", "&", "-"):
            left, used = draw(node(depth - 1, budget - 1))
            right, more = draw(node(depth - 1, budget - used))
            return {"|": left | right, "&": left & right, "-": left - right}[kind], used + more
        count = draw(st.integers(2, min(3, budget)))
        parts, used = [], 0
        for i in range(count):
            part, more = draw(node(depth - 1, budget - used - (count - 1 - i)))
            parts.append(part)
            used += more
        if kind == "cycle":
            return ir.Cycle(tuple(parts)), used
        return _heads_node(draw, parts, heads), used

    return node(max_depth, max_leaves).map(lambda pair: pair[0])


def _heads_node(draw, parts: list, heads: int) -> ir.Heads:
    """``heads { .. }`` over ``0..heads``: as many ranges as parts fit."""
    count = min(len(parts), heads)
    cuts = sorted(draw(st.sets(st.integers(1, heads - 1), min_size=count - 1, max_size=count - 1))) if count > 1 else []
    bounds = [0, *cuts, heads]
    return ir.Heads(tuple(ir.HeadRange(a, b, p) for a, b, p in zip(bounds, bounds[1:], parts)))


@dataclass(frozen=True)
class AttentionCase:
    """One attention call's shapes and data: q ``[B, H, n, D]``, k and v
    ``[B, Hkv, n, D]`` of ``dtype``, drawn from ``seed``; ``block`` is a block
    size to check the layout at; ``scale`` None means ``1/sqrt(D)``."""

    B: int
    H: int
    Hkv: int
    n: int
    D: int
    dtype: str
    scale: float | None
    seed: int
    block: int = 16
    # The call's score terms (``make_terms``): own ALiBi slopes, sinks, and
    # a relative bias of this max distance.
    alibi_slopes: bool = False
    sinks: bool = False
    rel_bias_distance: int | None = None
    # A packed batch (``packed_inputs``): the sequences' lengths, ``B = 1``
    # and ``n`` their sum; ``make_cu_seqlens`` gives the call's ``cu_seqlens``.
    lengths: tuple[int, ...] | None = None

    def describe(self) -> str:
        scale = "None" if self.scale is None else repr(self.scale)
        terms = "".join([" alibi_slopes" if self.alibi_slopes else "", " sinks" if self.sinks else "",
                         "" if self.rel_bias_distance is None else f" rel_bias_distance={self.rel_bias_distance}"])
        packed = "" if self.lengths is None else f" lengths={list(self.lengths)} block={self.block}"
        return (f"B={self.B} H={self.H} Hkv={self.Hkv} n={self.n} D={self.D} "
                f"dtype={self.dtype} scale={scale} seed={self.seed}{terms}{packed}")


def attention_inputs(
    pattern: ir.Pattern | None = None,
    dtypes: Sequence[str] = ("float32",),
    max_seq_len: int = 48,
    blocks: Sequence[int] = (8, 16),
    head_dims: Sequence[int] = (16, 32),
    gqa: bool = True,
    max_batch: int = 2,
    max_heads: int = 4,
    terms: bool = False,
) -> st.SearchStrategy:
    """``AttentionCase``s for ``pattern``: ``n`` from 1 to ``max_seq_len``
    (lengths that are not multiples of the block included), ``H`` fixed by a
    ``heads { .. }`` in the pattern or drawn up to ``max_heads``, ``Hkv`` a
    divisor of ``H`` (``Hkv = 1`` is multi-query; ``gqa=False`` keeps
    ``Hkv = H``), ``scale`` None or ``m / sqrt(D)`` with ``0.25 <= m <= 2``.
    With ``terms`` the call's score terms too (each may be absent): own ALiBi
    slopes, sinks, and a relative bias of max distance 0 to 8 (or ``n``, so
    every distance has its own bucket)."""
    fixed_heads = _heads_required(pattern) if pattern is not None else None

    @st.composite
    def draw_case(draw):
        H = fixed_heads if fixed_heads is not None else draw(st.integers(1, max_heads))
        divisors = [d for d in range(1, H + 1) if H % d == 0]
        Hkv = draw(st.sampled_from(divisors[::-1])) if gqa else H  # Hkv = H first: the simplest
        D = draw(st.sampled_from(list(head_dims)))
        multiplier = draw(st.none() | st.floats(0.25, 2.0))
        return AttentionCase(
            B=draw(st.integers(1, max_batch)),
            H=H,
            Hkv=Hkv,
            n=draw(st.integers(1, max_seq_len)),
            D=D,
            dtype=draw(st.sampled_from(list(dtypes))),
            scale=None if multiplier is None else round(multiplier / math.sqrt(D), 6),
            seed=draw(st.integers(0, 2**31 - 1)),
            block=draw(st.sampled_from(list(blocks))),
            alibi_slopes=terms and draw(st.booleans()),
            sinks=terms and draw(st.booleans()),
            rel_bias_distance=draw(st.none() | st.integers(0, 8) | st.just(max_seq_len)) if terms else None,
        )

    return draw_case()


def packed_lengths(block: int = 16, max_len: int = 300, max_count: int = 20, max_total: int | None = None,
                   empty: bool = True) -> st.SearchStrategy:
    """The lengths of a packed batch's sequences (a tuple, total >= 1): from
    1 to ``max_count`` of them, each 0 (with ``empty``) to ``max_len``, and
    among them ``max_len`` itself, multiples of ``block`` (a run of them puts
    the boundaries on block edges) and lengths shorter than a block (several
    sequences start inside one block). With ``max_total`` the list stops
    before the total would pass it (keeping at least one sequence)."""
    if block < 1 or max_len < 1 or max_count < 1:
        raise ValueError(f"packed_lengths needs block, max_len and max_count >= 1, got {block=} {max_len=} "
                         f"{max_count=}")
    # Each length is a kind and a number, drawn independently, so that
    # hypothesis shrinks both: the kind towards "any", the number towards 1.
    kinds = ["any", "edge", "short", "longest"] + (["empty"] if empty else [])

    def length(kind_and_value) -> int:
        kind, value = kind_and_value
        if kind == "edge":  # a multiple of the block (if max_len holds one)
            return min(max_len // block, -(-value // block)) * block or value
        if kind == "short":  # shorter than a block
            return 1 + (value - 1) % max(1, min(block - 1, max_len))
        return {"any": value, "longest": max_len, "empty": 0}[kind]

    one = st.tuples(st.sampled_from(kinds), st.integers(1, max_len)).map(length)

    def fit(lengths: list[int]) -> tuple[int, ...]:
        kept, total = [], 0
        for n in lengths:
            if kept and max_total is not None and total + n > max_total:
                break
            kept.append(n)
            total += n
        return tuple(kept)

    # The count too is drawn as a kind: the extremes (1 and max_count) as often
    # as any count between, which a plain list size reaches only by luck.
    count = st.one_of(st.sampled_from(sorted({1, max_count})), st.integers(1, max_count))
    lists = count.flatmap(lambda c: st.lists(one, min_size=c, max_size=c)).map(fit)
    return lists.filter(lambda lengths: sum(lengths) >= 1)


def packed_inputs(
    pattern: ir.Pattern | None = None,
    dtypes: Sequence[str] = ("float32",),
    max_len: int = 300,
    max_count: int = 20,
    max_total: int | None = None,
    blocks: Sequence[int] = (16, 32),
    head_dims: Sequence[int] = (16, 32),
    gqa: bool = True,
    max_heads: int = 4,
    terms: bool = False,
) -> st.SearchStrategy:
    """``AttentionCase``s of packed batches: ``lengths`` from
    ``packed_lengths`` at the case's ``block`` (the Triton backend runs at
    that block, so boundaries fall inside its blocks and on their edges),
    ``B = 1``, ``n`` the total; heads, head dim, dtype, scale and terms as
    ``attention_inputs`` draws them."""
    fixed_heads = _heads_required(pattern) if pattern is not None else None

    @st.composite
    def draw_case(draw):
        block = draw(st.sampled_from(list(blocks)))
        lengths = draw(packed_lengths(block, max_len, max_count, max_total))
        H = fixed_heads if fixed_heads is not None else draw(st.integers(1, max_heads))
        divisors = [d for d in range(1, H + 1) if H % d == 0]
        Hkv = draw(st.sampled_from(divisors[::-1])) if gqa else H
        D = draw(st.sampled_from(list(head_dims)))
        multiplier = draw(st.none() | st.floats(0.25, 2.0))
        return AttentionCase(
            B=1,
            H=H,
            Hkv=Hkv,
            n=sum(lengths),
            D=D,
            dtype=draw(st.sampled_from(list(dtypes))),
            scale=None if multiplier is None else round(multiplier / math.sqrt(D), 6),
            seed=draw(st.integers(0, 2**31 - 1)),
            block=block,
            alibi_slopes=terms and draw(st.booleans()),
            sinks=terms and draw(st.booleans()),
            rel_bias_distance=draw(st.none() | st.integers(0, 8)) if terms else None,
            lengths=lengths,
        )

    return draw_case()


def make_cu_seqlens(case: AttentionCase, device="cpu"):
    """The int32 ``cu_seqlens`` ``[len(case.lengths) + 1]`` of a packed case."""
    import torch

    if case.lengths is None:
        raise ValueError("make_cu_seqlens needs a packed case (from packed_inputs), got one without lengths")
    return torch.tensor([0, *np.cumsum(case.lengths)], dtype=torch.int32, device=device)


def _heads_required(p: ir.Pattern) -> int | None:
    """The head count a ``heads { .. }`` in ``p`` fixes (its last range's stop)."""
    for node in ir.walk(p):
        if isinstance(node, ir.Heads) and node.ranges:
            return max(r.stop for r in node.ranges)
    return None


def make_tensors(case: AttentionCase, device="cpu", requires_grad: bool = False):
    """Random ``(q, k, v, do)`` torch tensors for ``case``: standard normal
    values from ``case.seed`` (never all zeros), rounded to ``case.dtype``."""
    import torch

    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    shapes = [(case.B, case.H, case.n, case.D), (case.B, case.Hkv, case.n, case.D),
              (case.B, case.Hkv, case.n, case.D), (case.B, case.H, case.n, case.D)]
    out = []
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        out.append(x.requires_grad_(requires_grad and i < 3))
    return tuple(out)


def make_terms(case: AttentionCase, device="cpu") -> dict:
    """The call's term tensors for ``case`` (``{}`` when it has none), as
    keyword arguments of the call: ``alibi_slopes`` uniform in [0, 1),
    ``sinks`` and ``rel_bias`` standard normal, from ``case.seed``; float32
    (float64 for a float64 case), what a model holds whatever its inputs."""
    import torch

    gen = torch.Generator().manual_seed(case.seed + 1)
    dtype = torch.float64 if case.dtype == "float64" else torch.float32
    out = {}
    if case.alibi_slopes:
        out["alibi_slopes"] = torch.rand(case.H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if case.sinks:
        out["sinks"] = torch.randn(case.H, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if case.rel_bias_distance is not None:
        shape = (case.H, 2 * case.rel_bias_distance + 1)
        out["rel_bias"] = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return out


# ============================================================================
# Brute force: the classes and the attention, straight from the element mask
# ============================================================================


def block_classes(pat: ir.Pattern | str, seq_len: int, block: int, heads: int = 1) -> np.ndarray:
    """int8 ``[heads, nq, nk]`` (0 empty, 1 partial, 2 full) from ``pcc.mask``:
    the ground truth a layout is checked against. Small ``n`` only."""
    from . import pipeline

    m = pipeline.mask(pat, seq_len=seq_len, heads=heads)  # (heads, n, n)
    nb = -(-seq_len // block)
    padded = np.zeros((heads, nb * block, nb * block), dtype=bool)
    padded[:, :seq_len, :seq_len] = m
    inside = np.zeros((nb * block, nb * block), dtype=bool)
    inside[:seq_len, :seq_len] = True
    tiles = padded.reshape(heads, nb, block, nb, block)
    inside_tiles = inside.reshape(nb, block, nb, block)
    any_allowed = tiles.any(axis=(2, 4))
    all_allowed = (tiles | ~inside_tiles[None]).all(axis=(2, 4))
    return np.where(any_allowed, np.where(all_allowed, FULL, PARTIAL), EMPTY).astype(np.int8)


def dense_attention(mask, q, k, v, scale=None, terms=None):
    """``(o, lse)`` in float64 torch with autograd: the kit's own definition,
    independent of the reference backend's explicit backward.

    ``mask`` bool ``[H or 1, n, n]``; q ``[B, H, n, D]``, k and v
    ``[B, Hkv, n, D]``, query head ``h`` reading kv head ``h // (H // Hkv)``.
    ``terms``: a ``patterncc.scores.ScoreTerms`` of torch tensors (or None),
    with the formulas of ``patterncc.scores``. A row with no allowed key
    gives ``o = 0``, ``lse = -inf`` (the sink's logit with sinks) and no
    gradient to q, k, v.
    """
    import torch

    B, H, n, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)[None]  # (1, H or 1, n, n)
    k = k.repeat_interleave(group, dim=1)  # (B, H, n, D)
    v = v.repeat_interleave(group, dim=1)
    has_key = mask.any(dim=-1)  # (1, H, n)
    s = torch.where(mask, _term_scores(scale * q @ k.transpose(-1, -2), terms), -math.inf)
    sinks = None if terms is None else terms.sinks
    if sinks is not None:
        sink = sinks.to(s.dtype)[None, :, None, None].expand(B, H, n, 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)  # (B, H, n), finite
        return torch.exp(s - lse[..., None]) @ v, lse
    # Rows without a key get scores 0 instead of all -inf (whose softmax and
    # gradient would be NaN); the mask below zeroes their probabilities.
    s = torch.where(has_key[..., None], s, 0.0)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, n)
    p = torch.exp(s - lse[..., None]) * mask
    return p @ v, torch.where(has_key, lse, -math.inf)


def _term_scores(raw, terms):
    """``raw`` (``scale * q.k``, ``[B, H, n, n]``) with softcap, ALiBi and the
    relative bias of ``terms`` (None: none)."""
    import torch

    if terms is None:
        return raw
    n = raw.shape[-1]
    diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # q - k
    s = raw if terms.softcap is None else terms.softcap * torch.tanh(raw / terms.softcap)
    if terms.alibi_slopes is not None:
        s = s - terms.alibi_slopes.to(raw.dtype)[:, None, None] * diff.abs()
    if terms.rel_bias is not None:
        M = (terms.rel_bias.shape[1] - 1) // 2
        s = s + terms.rel_bias.to(raw.dtype)[:, diff.clamp(-M, M) + M]
    return s


# ============================================================================
# Assertions
# ============================================================================

_CLASS_NAMES = {EMPTY: "EMPTY", PARTIAL: "PARTIAL", FULL: "FULL"}


def assert_layout_sound(pat: ir.Pattern | str, seq_len: int, block: int, heads: int = 1, exact: bool = True):
    """Check ``layout.build(pat, seq_len, block, heads)`` against the classes
    brute-forced from the element mask, and its CSR arrays for consistency.

    Sound: a pair with an allowed element is never EMPTY, a pair with a
    disallowed element is never FULL. ``exact``: every class equals the brute
    force one. The failure message shows the first bad block and its element
    mask. Returns the layout.
    """
    from . import blocklayout as layout_module
    from .pipeline import as_pattern

    pat = as_pattern(pat)
    lay = layout_module.build(pat, seq_len, block, heads)
    where = f"layout of `{pat}` at seq_len={seq_len}, block={block}, heads={heads}"
    problems = _csr_problems(lay, seq_len, block, heads, ir.depends_on_head(pat))
    if problems:
        raise AssertionError(f"{where}: malformed record:\n  " + "\n  ".join(problems))
    truth = block_classes(pat, seq_len, block, heads)
    got = np.broadcast_to(lay.to_dense(), truth.shape)
    unsound = ((truth != EMPTY) & (got == EMPTY)) | ((truth != FULL) & (got == FULL))
    bad = unsound | ((truth != got) if exact else False)
    if not bad.any():
        return lay
    first = tuple(int(i) for i in np.argwhere(unsound if unsound.any() else bad)[0])
    kind = "unsound" if unsound.any() else "sound but not exact"
    h, i, j = first
    lines = [
        f"{where} is {kind}: {int(unsound.sum())} unsound and {int((bad & ~unsound).sum())} inexact block pairs.",
        f"first: head {h}, query block {i} (q {i * block}..{min(seq_len, (i + 1) * block) - 1}), "
        f"key block {j} (k {j * block}..{min(seq_len, (j + 1) * block) - 1}): "
        f"layout says {_CLASS_NAMES[int(got[first])]}, the mask says {_CLASS_NAMES[int(truth[first])]}",
        _block_picture(pat, seq_len, block, heads, h, i, j),
    ]
    raise AssertionError("\n".join(lines))


def _csr_problems(lay, seq_len: int, block: int, heads: int, head_dependent: bool) -> list[str]:
    """What is wrong with a BlockLayout's arrays (empty list: nothing)."""
    out = []
    nb = -(-seq_len // block)
    H = heads if head_dependent else 1
    if (lay.seq_len, lay.block) != (seq_len, block):
        out.append(f"record says seq_len={lay.seq_len}, block={lay.block}")
    expect = {"kv_ptr": (H, nb + 1), "q_ptr": (H, nb + 1)}
    for name, shape in expect.items():
        arr = getattr(lay, name)
        if arr.shape != shape and arr.shape != (1, nb + 1):
            out.append(f"{name} has shape {arr.shape}, expected {shape}")
    if out:
        return out
    for side, ptr, idx, full in (("kv", lay.kv_ptr, lay.kv_idx, lay.kv_full), ("q", lay.q_ptr, lay.q_idx, lay.q_full)):
        flat = np.concatenate([ptr[:, :-1].ravel(), ptr[-1:, -1]])
        if flat[0] != 0 or np.any(np.diff(flat) < 0) or flat[-1] != idx.size or full.size != idx.size:
            out.append(f"{side}_ptr is not a running offset into {side}_idx ({idx.size} entries)")
            continue
        if np.any(ptr[1:, 0] != ptr[:-1, -1]):
            out.append(f"{side}_ptr: a head does not start where the previous one ends")
        if idx.size and (idx.min() < 0 or idx.max() >= nb):
            out.append(f"{side}_idx has block indices outside 0..{nb - 1}")
        for h in range(ptr.shape[0]):
            for r in range(nb):
                row = idx[ptr[h, r] : ptr[h, r + 1]]
                if np.any(np.diff(row) <= 0):
                    out.append(f"{side}_idx of head {h}, block {r} is not strictly ascending: {row.tolist()}")
                    break
    if out:
        return out
    by_q = lay.to_dense()
    by_k = np.zeros_like(by_q)
    for h in range(lay.q_ptr.shape[0]):
        for j in range(nb):
            lo, hi = lay.q_ptr[h, j], lay.q_ptr[h, j + 1]
            by_k[h, lay.q_idx[lo:hi], j] = np.where(lay.q_full[lo:hi], FULL, PARTIAL)
    if not np.array_equal(by_q, by_k):
        h, i, j = np.argwhere(by_q != by_k)[0]
        out.append(f"the by-key-block CSR disagrees with the by-query-block one at head {h}, "
                   f"pair ({i}, {j}): {_CLASS_NAMES[int(by_k[h, i, j])]} vs {_CLASS_NAMES[int(by_q[h, i, j])]}")
    return out


def _block_picture(pat, seq_len: int, block: int, heads: int, h: int, i: int, j: int) -> str:
    from . import pipeline

    m = pipeline.mask(pat, seq_len=seq_len, heads=heads)[h]
    lines = [f"element mask of that block (# allowed, . not allowed, blank beyond seq_len={seq_len}):"]
    shown = min(block, 32)
    for qi in range(i * block, i * block + shown):
        row = "".join(
            " " if qi >= seq_len or kj >= seq_len else ("#" if m[qi, kj] else ".")
            for kj in range(j * block, j * block + shown)
        )
        lines.append(f"  q {qi:>5} {row}")
    if shown < block:
        lines.append(f"  (first {shown} of {block} rows and columns)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Tolerance:
    """Allowed error, componentwise: ``|x - ref| <= rtol * M + atol * max(M)``.

    ``M`` is the magnitude of the terms each value is computed from (its
    error bound's natural scale, from the kit's dense float64 computation):
    ``p @ |v|`` for ``o``, ``scale * sum_j p |q||k|`` plus ``|lse|`` for
    ``lse``, ``scale * |ds| @ |k|`` and ``scale * |ds|^T @ |q|`` for ``dq``,
    ``dk`` (with ``|ds| = p * (|dO| @ |V|^T + rowsum(|dO| |O|))``), and
    ``p^T @ |dO|`` for ``dv``; for the terms' tensors, ``sum |ds| |q - k|``
    (alibi slopes), the sum of ``|ds|`` over each bucket (relative bias),
    ``sum_q exp(t - lse) rowsum(|dO| |O|)`` (sinks), and the terms' own
    sizes join ``lse``'s. ``max(M)`` is over the whole tensor: a floor
    for underflow (fp16 subnormals, probabilities that round to 0).
    """

    rtol: float
    atol: float


# Unit roundoffs u: fp32 2**-24 = 6.0e-8; tf32 and fp16 2**-11 = 4.9e-4;
# bf16 2**-8 = 3.9e-3. A flash-attention kernel rounds each value a few times
# (P to the input dtype before P @ V, dS before dS @ K, the output itself),
# so with the componentwise M above its error is a small multiple of u. A
# simulated flash kernel (fp32 accumulation, P and dS rounded, online softmax)
# on 400 random cases (n <= 300, D <= 128, scale <= 2/sqrt(D), full, causal,
# random 30% and band masks) needed rtol <= 2u with atol = 1u for tf32, fp16
# and bf16, and rtol <= 50u for fp32 (sums of up to n terms). The table
# leaves a safety factor of 2 to 4 for real kernels (exp2, rescaling per
# block):
#   fp64  1e-9 / 1e-9    two float64 algorithms (reference vs the kit's dense)
#   fp32  1e-5 / 1e-6    ~170u / 17u: "ieee" dots, n-term accumulation
#   tf32  4e-3 / 1e-3    ~8u / 2u: fp32 inputs rounded to 10 mantissa bits
#                        inside tl.dot, so scores err in proportion to |s|
#   fp16  2e-3 / 1e-3    4u / 2u
#   bf16  1.6e-2 / 8e-3  4u / 2u
TOLERANCES = {
    "float64": Tolerance(1e-9, 1e-9),
    "float32": Tolerance(1e-5, 1e-6),
    "tf32": Tolerance(4e-3, 1e-3),
    "float16": Tolerance(2e-3, 1e-3),
    "bfloat16": Tolerance(1.6e-2, 8e-3),
}

# Above this many score elements the magnitudes M are not computed densely;
# the comparison then uses the tensor's largest reference magnitude instead.
_DENSE_CHECK_ELEMENTS = 2**26


def assert_matches_reference(
    attn,
    pat: ir.Pattern | str,
    q,
    k,
    v,
    scale: float | None = None,
    do=None,
    *,
    tol: Tolerance | None = None,
    precision: str | None = None,
    against: str = "reference",
    grads: bool = True,
    alibi_slopes=None,
    sinks=None,
    rel_bias=None,
):
    """Check ``attn(q, k, v, scale, return_lse=True)`` and its gradients
    ``dq, dk, dv`` (for ``do``, random when None) against the float64
    reference backend, run on the same input values.

    Score terms: the pattern's own (``A with softcap(c), alibi``: pass the
    pattern ``attn`` runs, ``attn.pattern`` for a compiled one) and the
    call's tensors ``alibi_slopes``, ``sinks``, ``rel_bias``, which are passed
    to ``attn`` and whose gradients (``d_alibi_slopes``, ``d_sinks``,
    ``d_rel_bias``) are checked too.

    Beyond the tolerance (``TOLERANCES[dtype]`` by default, see its comment
    for the numbers and why; ``precision="tf32"`` or ``"ieee"`` says how the
    kernel multiplies float32; by default ``attn.options["input_precision"]``
    or else "ieee", as patterncc's Triton kernels do): no NaN anywhere; ``lse`` is
    ``-inf`` exactly on the rows with no allowed key and finite elsewhere;
    ``o`` and ``dq`` are exactly 0 on those rows, and ``dk``, ``dv`` exactly 0
    for keys no query attends. ``against="dense"`` compares with the kit's own
    dense computation instead (how the reference itself is checked).

    Returns ``{name: (max abs error, max error / bound)}``; raises
    AssertionError naming the tensor, the max abs and relative errors and the
    worst index.
    """
    import torch

    from .pipeline import as_pattern

    pat = as_pattern(pat)
    if tol is None:
        tol = TOLERANCES[_precision_name(attn, q, precision)]
    if do is None:
        gen = torch.Generator().manual_seed(0)
        do = torch.randn(tuple(q.shape), generator=gen).to(device=q.device, dtype=q.dtype)
    given = {name: t for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("rel_bias", rel_bias))
             if t is not None}
    got = _outputs(attn, q, k, v, scale, do, grads, given)
    expected, magnitude = _expected(pat, q, k, v, scale, do, against, grads, given)
    problems, errors = _disagreements(got, expected, magnitude, tol, given, grads)
    if problems:
        shape = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, {q.dtype}, scale={scale}"
        raise AssertionError(
            f"{_name(attn)} disagrees with the {against} for `{pat}` ({shape}; "
            f"tolerance rtol={tol.rtol:g}, atol={tol.atol:g}):\n  " + "\n  ".join(problems)
        )
    return errors


def _outputs(attn, q, k, v, scale, do, grads: bool, given: dict, **call) -> dict:
    """``attn``'s o and lse on fresh leaf copies of the inputs and the term
    tensors ``given``, and with ``grads`` their gradients under ``do``
    (``dq``, ``dk``, ``dv``, ``d_<term>``; None where none arrived)."""
    inputs = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    term_inputs = {name: t.detach().clone().requires_grad_(grads) for name, t in given.items()}
    o, lse = attn(*inputs, scale=scale, return_lse=True, **call, **term_inputs)
    got = {"o": o, "lse": lse}
    if grads:
        o.backward(do)
        got.update(dq=inputs[0].grad, dk=inputs[1].grad, dv=inputs[2].grad)
        got.update({f"d_{name}": t.grad for name, t in term_inputs.items()})
    return got


def _disagreements(got: dict, expected: dict, magnitude: dict, tol, given, grads: bool) -> tuple[list, dict]:
    """What a backend's outputs and gradients (``got``, any array type) get
    wrong against ``expected``: the problems, one line each (a gradient that
    never arrived, or ``_compare``'s message), and each compared name's error."""
    got = {name: _as_float64(x) for name, x in got.items() if x is not None}
    wanted = ["dq", "dk", "dv"] + [f"d_{name}" for name in given]
    problems = [f"{name} is None: no gradient reached {name[2:] if name.startswith('d_') else name[1:]}"
                for name in wanted if grads and name not in got]
    errors = {}
    for name, ref in expected.items():
        if name not in got:
            continue
        msg, err = _compare(name, got[name], ref, magnitude.get(name), tol)
        errors[name] = err
        if msg:
            problems.append(msg)
    return problems, errors


def assert_packed_matches_reference(
    attn,
    pat: ir.Pattern | str,
    q,
    k,
    v,
    cu_seqlens,
    scale: float | None = None,
    do=None,
    *,
    tol: Tolerance | None = None,
    precision: str | None = None,
    against: str = "reference",
    grads: bool = True,
    alibi_slopes=None,
    sinks=None,
    rel_bias=None,
):
    """Check the packed call ``attn(q, k, v, scale, return_lse=True,
    cu_seqlens=cu_seqlens)`` (q ``[1, H, total, D]``) and its gradients
    against each sequence computed alone in float64 (the reference, or with
    ``against="dense"`` the kit's dense computation), concatenated: ``o``,
    ``lse``, ``dq``, ``dk``, ``dv`` sequence by sequence, and the score
    terms' gradients summed over the sequences. Tolerances, the exact rules
    for rows with no key, and what it returns and raises: as
    ``assert_matches_reference``."""
    import torch

    from .pipeline import as_pattern

    pat = as_pattern(pat)
    if do is None:
        gen = torch.Generator().manual_seed(0)
        do = torch.randn(tuple(q.shape), generator=gen).to(device=q.device, dtype=q.dtype)
    given = {name: t for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("rel_bias", rel_bias))
             if t is not None}
    expected = _packed_expected(pat, q, k, v, cu_seqlens, scale, do, against, grads, given)
    return _check_packed_call(attn, pat, q, k, v, cu_seqlens, scale, do, tol, precision, against, grads, given,
                              expected)


def _packed_expected(pat, q, k, v, cu_seqlens, scale, do, against: str, grads: bool, given: dict):
    """``_expected`` of each non-empty sequence alone, joined: token-wise
    tensors concatenated, the terms' gradients (and their magnitudes) added up."""
    from .backends.reference.checks import check_cu_seqlens

    offsets = check_cu_seqlens(cu_seqlens, q.shape[2])
    parts = [_expected(pat, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale, do[:, :, a:b], against, grads, given)
             for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()) if b > a]
    expected, magnitude = {}, {}
    for name in parts[0][0]:
        join = (lambda xs: sum(xs[1:], xs[0])) if name.startswith("d_") else (lambda xs: np.concatenate(xs, axis=2))
        expected[name] = join([e[name] for e, _ in parts])
        if all(name in m for _, m in parts):  # else (a sequence too long for them) the tensor's largest value
            magnitude[name] = join([m[name] for _, m in parts])
    return expected, magnitude, np.diff(offsets).tolist()


def _check_packed_call(attn, pat, q, k, v, cu_seqlens, scale, do, tol, precision, against, grads, given,
                       expected_and_magnitude):
    """The body of ``assert_packed_matches_reference`` once the expected values are known."""
    expected, magnitude, lengths = expected_and_magnitude
    if tol is None:
        tol = TOLERANCES[_precision_name(attn, q, precision)]
    got = _outputs(attn, q, k, v, scale, do, grads, given, cu_seqlens=cu_seqlens)
    problems, errors = _disagreements(got, expected, magnitude, tol, given, grads)
    if problems:
        shape = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, lengths {lengths}, {q.dtype}, scale={scale}"
        raise AssertionError(
            f"{_name(attn)} on a packed batch disagrees with each sequence alone ({against}) for `{pat}` "
            f"({shape}; tolerance rtol={tol.rtol:g}, atol={tol.atol:g}):\n  " + "\n  ".join(problems)
        )
    return errors


def _name(attn) -> str:
    return getattr(attn, "backend", None) and f"backend {attn.backend!r}" or type(attn).__name__


def _precision_name(attn, q, precision: str | None) -> str:
    name = str(q.dtype).replace("torch.", "")
    if name != "float32":
        return name
    if precision is None:
        options = getattr(attn, "options", None) or {}
        precision = options.get("input_precision")
    if precision is None:
        precision = "ieee"  # patterncc's Triton kernels multiply float32 exactly
    return "tf32" if precision in ("tf32", "tf32x3") else "float32"


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _expected(pat, q, k, v, scale, do, against: str, grads: bool, given: dict):
    """float64 ``({name: expected}, {name: magnitude M})``; see ``Tolerance``.
    ``given``: the call's term tensors, by keyword."""
    import torch

    from . import pipeline
    from .attention import Attention
    from .scores import ScoreTerms

    B, H, n, D = q.shape
    q64, k64, v64, do64 = (x.detach().to("cpu", torch.float64) for x in (q, k, v, do))
    small = B * H * n * n <= _DENSE_CHECK_ELEMENTS
    mask = pipeline.mask(pat, seq_len=n, heads=H) if small else None
    reference = Attention(pat, backend="reference")
    # The terms in effect: the pattern's and the call's, with the standard
    # ALiBi slopes exactly as the public API makes them.
    given64 = {name: t.detach().to("cpu", torch.float64) for name, t in given.items()}
    call = reference.call_terms(q64, ScoreTerms(reference.terms.softcap, **given64))
    tensors = {name: t for name, t in zip(("alibi_slopes", "sinks", "rel_bias"), call.tensors()) if t is not None}
    leaves64 = {name: t.detach().to(torch.float64).requires_grad_(grads and name in given)
                for name, t in tensors.items()}

    if against == "reference":
        attn = reference
    elif against == "dense":
        if mask is None:
            raise ValueError(f"against='dense' needs a small problem, got {B=} {H=} {n=}")

        def attn(q_, k_, v_, scale=None, return_lse=True, **terms):
            return dense_attention(mask, q_, k_, v_, scale, ScoreTerms(call.softcap, **terms))
    else:
        raise ValueError(f"against must be 'reference' or 'dense', got {against!r}")
    leaves = [x.clone().requires_grad_(grads) for x in (q64, k64, v64)]
    o, lse = attn(*leaves, scale=scale, return_lse=True, **leaves64)
    expected = {"o": o, "lse": lse}
    if grads:
        o.backward(do64)
        expected.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        expected.update({f"d_{name}": leaves64[name].grad for name in given})
    expected = {name: _as_float64(x) for name, x in expected.items()}
    if mask is None:
        return expected, {}
    with torch.no_grad():
        terms64 = ScoreTerms(call.softcap, **{name: t.detach() for name, t in leaves64.items()})
        magnitude = _magnitudes(mask, q64, k64, v64, do64, torch.from_numpy(expected["o"]),
                                torch.from_numpy(expected["lse"]), scale, terms64)
    return expected, {name: m.numpy() for name, m in magnitude.items()}


def _magnitudes(mask, q, k, v, do, o, lse, scale, terms):
    """The componentwise magnitudes ``M`` of ``Tolerance``, float64 torch."""
    import torch

    B, H, n, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = torch.as_tensor(np.asarray(mask))[None]  # (1, H, n, n)
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    raw = scale * q @ kr.transpose(-1, -2)  # (B, H, n, n)
    p = torch.where(mask, torch.exp(_term_scores(raw, terms) - finite[..., None]), 0.0)  # (B, H, n, n)
    qa, ka, va, doa, oa = q.abs(), kr.abs(), vr.abs(), do.abs(), o.abs()
    row = (doa * oa).sum(-1)  # (B, H, n)
    ds = p * (doa @ va.transpose(-1, -2) + row[..., None])
    dk = scale * ds.transpose(-1, -2) @ qa
    dv = p.transpose(-1, -2) @ doa
    # Every added score term's size: its rounding errs in proportion to it.
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()  # (n, n)
    term_sizes = torch.zeros(H, n, n, dtype=q.dtype)
    if terms.alibi_slopes is not None:
        term_sizes += terms.alibi_slopes.abs()[:, None, None] * distance
    if terms.rel_bias is not None:
        M = (terms.rel_bias.shape[1] - 1) // 2
        diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        bucket = diff.clamp(-M, M) + M  # (n, n)
        term_sizes += terms.rel_bias.abs()[:, bucket]
    lse_size = scale * (p * (qa @ ka.transpose(-1, -2))).sum(-1) + (p * term_sizes).sum(-1) + finite.abs()

    def per_kv_head(x):  # (B, H, n, D) -> (B, Hkv, n, D): sum over the group
        return x.reshape(B, H // group, group, n, D).sum(2)

    out = {
        "o": p @ va,
        "lse": lse_size,
        "dq": scale * ds @ ka,
        "dk": per_kv_head(dk),
        "dv": per_kv_head(dv),
    }
    if terms.alibi_slopes is not None:
        out["d_alibi_slopes"] = (ds * distance).sum((0, 2, 3))
    if terms.rel_bias is not None:
        per_head = ds.sum(0).reshape(H, n * n)  # (H, n * n)
        out["d_rel_bias"] = torch.zeros_like(terms.rel_bias).index_add_(1, bucket.reshape(-1), per_head)
    if terms.sinks is not None:
        out["d_sinks"] = (torch.exp(terms.sinks[None, :, None] - finite) * row).sum((0, 2))
    return out


def _compare(name: str, got: np.ndarray, ref: np.ndarray, magnitude, tol: Tolerance):
    """``(problem or None, (max abs error, max error / bound))`` for one tensor."""
    if got.shape != ref.shape:
        return f"{name} has shape {got.shape}, expected {ref.shape}", (math.inf, math.inf)
    if np.isnan(got).any():
        idx = tuple(int(i) for i in np.argwhere(np.isnan(got))[0])
        return f"{name} has {int(np.isnan(got).sum())} NaN values, the first at {idx}", (math.nan, math.inf)
    ref_inf = np.isinf(ref)
    if not np.array_equal(np.isinf(got), ref_inf) or not np.array_equal(got[ref_inf], ref[ref_inf]):
        idx = tuple(int(i) for i in np.argwhere((np.isinf(got) != ref_inf) | (ref_inf & (got != ref)))[0])
        return (f"{name}[{idx}] = {got[idx]!r} but the reference has {ref[idx]!r} "
                f"(-inf exactly on the rows with no allowed key, finite elsewhere)"), (math.inf, math.inf)
    got, ref = np.where(ref_inf, 0.0, got), np.where(ref_inf, 0.0, ref)
    if magnitude is None:
        magnitude = np.full(ref.shape, np.abs(ref).max(initial=0.0))
    # Where no allowed pair contributes (M = 0) the value must be exactly 0.
    bound = np.where(magnitude > 0, tol.rtol * magnitude + tol.atol * magnitude.max(initial=0.0), 0.0)
    error = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / bound)  # inf where the bound is 0: exact zero expected
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), ratio.shape)) if ratio.size else ()
    max_abs = float(error.max(initial=0.0))
    max_ratio = float(ratio.max(initial=0.0))
    if max_ratio <= 1.0:
        return None, (max_abs, max_ratio)
    nonzero = ref != 0
    max_rel = float((error[nonzero] / np.abs(ref[nonzero])).max(initial=0.0))
    count = int((ratio > 1).sum())
    if bound[worst] == 0:
        why = "expected exactly 0 (no allowed pair contributes there)"
    else:
        why = f"{max_ratio:.3g}x the bound {bound[worst]:.3g}"
    return (f"{name}: {count} of {ratio.size} values off; max abs error {max_abs:.3g}, "
            f"max rel error {max_rel:.3g}; worst at {name}{list(worst)}: "
            f"got {got[worst]:.9g}, expected {ref[worst]:.9g} ({why})"), (max_abs, max_ratio)


# ============================================================================
# The property suite for one pattern
# ============================================================================


def available_backends() -> dict[str, str | None]:
    """``{backend: None if it can run here, else why not}``."""
    return {"reference": None, "triton": _triton_unavailable()}


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("patterncc.backends.triton.runtime") is None:
        return "backends/triton/runtime.py does not exist yet"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch

    if torch.cuda.is_available() or _interpreted():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU)"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Counterexample:
    """The minimal failing input hypothesis found, and how to rerun it."""

    check: str  # "layout", "kernel" or "packed"
    backend: str | None
    pattern: str  # source text of the pattern
    seq_len: int
    block: int | None
    heads: int
    case: AttentionCase | None
    error: str
    command: str

    def describe(self) -> str:
        what = f"seq_len={self.seq_len}, block={self.block}, heads={self.heads}"
        if self.case is not None:
            what = self.case.describe()
        return (f"minimal counterexample ({self.check}{', ' + self.backend if self.backend else ''}): "
                f"`{self.pattern}` with {what}\n{self.error}\nreproduce with:\n  {self.command}")


@dataclass
class CheckResult:
    check: str  # "layout", "kernel" or "packed"
    backend: str | None
    status: str  # "passed", "failed" or "skipped"
    examples: int = 0
    seconds: float = 0.0
    counterexample: Counterexample | None = None
    reason: str = ""


@dataclass
class Report:
    """What ``check_pattern`` found: one ``CheckResult`` per check and backend."""

    pattern: str
    seed: int
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed and something was checked: a run of only skips is not a pass."""
        return bool(self.checked) and all(r.status != "failed" for r in self.results)

    @property
    def checked(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "passed" and r.examples > 0]

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    def __str__(self) -> str:
        lines = [f"pattern `{self.pattern}` (hypothesis seed {self.seed}): {'ok' if self.ok else 'FAILED'}"
                 + ("" if self.checked else ", nothing was checked")]
        for r in self.results:
            label = r.check + (f" [{r.backend}]" if r.backend else "")
            extra = f" ({r.reason})" if r.reason else ""
            lines.append(f"  {label:<20} {r.status:<7} {r.examples:>4} examples {r.seconds:6.1f} s{extra}")
        for r in self.failures:
            if r.counterexample is not None:
                lines.append(_indent(r.counterexample.describe(), "  "))
        return "\n".join(lines)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# Shapes per backend: the Triton interpreter runs every program on the CPU in
# numpy, so it gets short sequences and one head dim; CUDA gets the real range.
def _kernel_shapes(backend: str, pat: ir.Pattern) -> dict:
    if backend == "reference":
        # Long enough to see every part of the pattern (a few times its
        # largest constant), short enough for dense float64 checks.
        longest = min(320, max(96, 2 * _largest_constant(pat) + 8))
        return dict(dtypes=("float64",), max_seq_len=longest, head_dims=(8, 16), max_batch=2, max_heads=4)
    if _interpreted():
        return dict(dtypes=("float32", "float16", "bfloat16"), max_seq_len=40, head_dims=(16,), max_batch=1, max_heads=2,
                    blocks=(16, 32))
    return dict(dtypes=("float16", "bfloat16", "float32"), max_seq_len=300, head_dims=(16, 32, 64, 128),
                max_batch=2, max_heads=4, blocks=(16, 32, 64, 128))


def _packed_shapes(backend: str) -> dict:
    """Packed batches per backend: the full range (lengths to 300, up to
    20 sequences) where it runs fast enough, fewer and shorter ones in the
    Triton interpreter."""
    if backend == "reference":
        return dict(dtypes=("float64",), max_len=300, max_count=20, max_total=640, blocks=(8, 16, 64),
                    head_dims=(8, 16), max_heads=4)
    if _interpreted():
        return dict(dtypes=("float32", "float16", "bfloat16"), max_len=40, max_count=5, max_total=96,
                    blocks=(16, 32), head_dims=(16,), max_heads=2)
    return dict(dtypes=("float16", "bfloat16", "float32"), max_len=300, max_count=20, blocks=(16, 32, 64, 128),
                head_dims=(16, 32, 64, 128), max_heads=4)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the user's working directory
        derandomize=False,
        report_multiple_bugs=False,  # one minimal counterexample, not a group
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def check_pattern(
    pat: ir.Pattern | str,
    *,
    backends: Iterable[str] | None = None,
    examples: int = 30,
    seed: int | None = None,
    exact: bool = True,
    source: tuple[str, str | None] | None = None,
    progress: Callable[[str, str | None, int, int], None] | None = None,
    terms: bool = False,
    packed: bool = True,
) -> Report:
    """Run the property suite for one pattern; return a ``Report``.

    - layout: ``assert_layout_sound`` (``exact`` by default) over random
      lengths, block sizes and head counts;
    - kernel, per backend (default: every one available here, see
      ``available_backends``): ``assert_matches_reference`` over
      ``attention_inputs``. The reference backend is compared with the kit's
      own dense float64 computation, on its dense and its sparse path.
      The pattern's score terms (``with softcap(c), alibi``) always apply;
      ``terms=True`` also draws the call's (ALiBi slopes, sinks, relative
      bias) and checks their gradients;
    - packed, per backend (``packed=False`` leaves it out):
      ``assert_packed_matches_reference`` over ``packed_inputs``, a packed
      batch (``cu_seqlens``) against each of its sequences alone.

    ``examples`` hypothesis examples per check; ``seed`` makes the search
    repeatable (a random one is drawn and recorded when None). ``source`` =
    ``(file, entry)`` makes reproduce commands load the pattern from its file.
    ``progress(check, backend, done, total)`` is called after every example.
    """
    from .pipeline import as_pattern

    pat = as_pattern(pat)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an integer >= 1, got {examples=!r}")
    status = available_backends()
    wanted = checked_backends(backends, status)
    seed = _random.randrange(2**32) if seed is None else seed
    report = Report(pattern=str(pat), seed=seed)

    report.results.append(_run_check("layout", None, pat, examples, seed, exact, source, progress, terms))
    for backend in wanted:
        if status[backend] is not None:
            # Asked for by name (or the only one there is) and unable to run: a
            # check that did not happen is a failure, never a quiet skip.
            named = backends is not None
            report.results.append(CheckResult("kernel", backend, "failed" if named else "skipped",
                                              reason=status[backend]))
        else:
            report.results.append(_run_check("kernel", backend, pat, examples, seed, exact, source, progress, terms))
            if packed:
                report.results.append(_run_check("packed", backend, pat, examples, seed, exact, source, progress,
                                                 terms))
    return report


def checked_backends(backends, status: dict | None = None) -> list[str]:
    """The backends a run checks: every known one for None, else the names
    given (one name or several; none checks the layout alone). An unknown
    name is an error, not a skip."""
    status = available_backends() if status is None else status
    if backends is None:
        return list(status)
    names = [backends] if isinstance(backends, str) else list(backends)
    for name in names:
        if not isinstance(name, str) or name not in status:
            raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(map(repr, status))}")
    return list(dict.fromkeys(names))


def _run_check(check, backend, pat, examples, seed, exact, source, progress, terms=False) -> CheckResult:
    from . import pipeline

    state = {"done": 0, "last": None, "failed": None}
    attns: dict = {}
    if check == "layout":
        strategy = _layout_inputs(pat)
    elif check == "packed":
        strategy = packed_inputs(pat, gqa=True, terms=terms, **_packed_shapes(backend))
    else:
        strategy = attention_inputs(pat, gqa=True, terms=terms, **_kernel_shapes(backend, pat))

    def body(example):
        state["last"] = example
        try:
            if check == "layout":
                seq_len, block, heads = example
                assert_layout_sound(pat, seq_len, block, heads, exact=exact)
            elif check == "packed":
                _check_packed(backend, pat, example, attns)
            else:
                _check_kernel(backend, pat, example, attns)
        except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for hypothesis
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            state["failed"] = (example, err)
            raise
        finally:
            state["done"] += 1
            if progress is not None:
                progress(check, backend, min(state["done"], examples), examples)

    test = _hypothesis_seed(seed)(_settings(examples)(given(strategy)(body)))
    start = time.perf_counter()
    try:
        test()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001
        example, error = state["failed"] or (state["last"], err)
        result = CheckResult(check, backend, "failed", state["done"], time.perf_counter() - start)
        result.counterexample = _counterexample(check, backend, pat, example, error, source)
        return result
    return CheckResult(check, backend, "passed", min(state["done"], examples), time.perf_counter() - start)


def _layout_inputs(pat: ir.Pattern) -> st.SearchStrategy:
    """``(seq_len, block, heads)``: lengths up to a few times the pattern's
    largest constant (at least 64), blocks of 1 to 64 (powers of two and not)."""
    fixed = _heads_required(pat)
    if fixed is not None:
        heads = st.just(fixed)
    elif ir.depends_on_head(pat):
        heads = st.integers(1, 6)
    else:
        heads = st.integers(1, 2)
    top = min(512, max(64, 3 * _largest_constant(pat) + 8))
    blocks = st.sampled_from([8, 16, 4, 32, 1, 3, 64, 5])
    return st.tuples(st.integers(1, top), blocks, heads)


def _largest_constant(pat: ir.Pattern) -> int:
    """The largest integer in ``pat``'s arguments and conditions (at n = 64)."""
    largest = 0
    for node in ir.walk(pat):
        if type(node) in ir.PRIMITIVE_NAMES and not isinstance(node, ir.Random):
            for a in ir.args_of(node):
                try:
                    largest = max(largest, abs(ir.eval_int(a, {"n": 64})))
                except PatternError:
                    pass
        elif isinstance(node, ir.Random):
            b = node.b if isinstance(node.b, int) else 16
            largest = max(largest, 2 * b)
        elif isinstance(node, ir.Where):
            stack = [node.cond]
            while stack:
                e = stack.pop()
                if isinstance(e, ir.Const):
                    largest = max(largest, abs(e.value))
                stack.extend(ir.expr_children(e))
    return largest


def _check_kernel(backend: str, pat: ir.Pattern, case: AttentionCase, attns: dict) -> None:
    import torch

    from . import pipeline

    if backend == "reference":
        from .backends.reference import ReferenceAttention

        # Both reference paths, against the kit's independent dense computation.
        for dense_limit in (4096, 0):
            if dense_limit not in attns:
                attns[dense_limit] = ReferenceAttention(pat, dense_limit=dense_limit)
            q, k, v, do = make_tensors(case)
            assert_matches_reference(attns[dense_limit], pat, q, k, v, case.scale, do, against="dense",
                                     **make_terms(case))
        return
    # The Triton backend builds its layout with the case's block (a power of two >= 16).
    options = {"block": case.block} if backend == "triton" else {}
    key = (backend, case.block if options else None)
    if key not in attns:
        attns[key] = pipeline.compile(pat, backend=backend, **options)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v, do = make_tensors(case, device=device)
    assert_matches_reference(attns[key], pat, q, k, v, case.scale, do, **make_terms(case, device=device))


def _check_packed(backend: str, pat: ir.Pattern, case: AttentionCase, attns: dict) -> None:
    import torch

    from . import pipeline

    if backend == "reference":
        from .backends.reference import ReferenceAttention

        # The reference's packed call on both its paths, against the kit's dense computation per sequence.
        q, k, v, do = make_tensors(case)
        cu, terms = make_cu_seqlens(case), make_terms(case)
        expected = _packed_expected(pat, q, k, v, cu, case.scale, do, "dense", True, terms)
        for dense_limit in (4096, 0):
            if dense_limit not in attns:
                attns[dense_limit] = ReferenceAttention(pat, dense_limit=dense_limit)
            _check_packed_call(attns[dense_limit], pat, q, k, v, cu, case.scale, do, None, None, "dense", True,
                               terms, expected)
        return
    key = (backend, case.block)
    if key not in attns:
        attns[key] = pipeline.compile(pat, backend=backend, block=case.block)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = make_tensors(case, device=device)
    assert_packed_matches_reference(attns[key], pat, q, k, v, make_cu_seqlens(case, device), case.scale, do,
                                    **make_terms(case, device=device))


def _counterexample(check, backend, pat, example, error, source) -> Counterexample:
    message = f"{type(error).__name__}: {error}"
    if not isinstance(error, AssertionError):  # a crash: say where
        frames = traceback.format_exception(type(error), error, error.__traceback__)
        message += "\n" + "".join(frames[-4:-1]).rstrip()
    if check == "layout":
        seq_len, block, heads = example
        kwargs = dict(check="layout", seq_len=seq_len, block=block, heads=heads)
        case = None
    else:
        case = example
        seq_len, block, heads = case.n, case.block, case.H
        kwargs = dict(backend=backend, **asdict(case))
        if check == "packed":
            kwargs = dict(check=check, **kwargs)
        else:
            del kwargs["lengths"]  # None: a plain call
    return Counterexample(check, backend, str(pat), seq_len, block, heads, case, message,
                          _command(pat, source, backend, kwargs))


def _command(pat, source, backend, kwargs: dict) -> str:
    if source is not None:
        path, entry = source
        target = _py(str(path)) + (f", entry={_py(entry)}" if entry else "")
    elif _round_trips(pat):
        target = _py(str(pat))
    else:  # the parser would simplify it into another pattern: spell out the IR
        target = repr(pat)
    imports = "" if source is not None or _round_trips(pat) else "from patterncc.ir import *; "
    args = ", ".join(f"{k}={_py(v)}" for k, v in kwargs.items())
    code = f"{imports}from patterncc.testing import reproduce; reproduce({target}, {args})"
    env = "TRITON_INTERPRET=1 " if backend == "triton" and _interpreted() else ""
    return f"{env}python -c {shlex.quote(code)}"


def _round_trips(pat: ir.Pattern) -> bool:
    """True when ``parse(str(pat))`` gives ``pat`` back (not simplified away)."""
    from . import pipeline

    try:
        return pipeline.parse(str(pat)) == pat
    except Exception:  # noqa: BLE001 - no parser yet, or a printing bug: use the IR
        return False


def _py(value) -> str:
    """Python source for a value; strings in double quotes, so the shell
    command can wrap the code in single quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def reproduce(pattern, *, entry: str | None = None, check: str = "kernel", backend: str = "reference",
              seq_len: int | None = None, block: int | None = None, heads: int = 1, **case) -> None:
    """Rerun one counterexample of ``check_pattern`` (the commands it prints
    call this). ``pattern``: source text, a pattern, or a ``.pat`` file."""
    from . import pipeline

    pat = pipeline.as_pattern(pattern, entry=entry)
    if check == "layout":
        assert_layout_sound(pat, seq_len, block, heads)
    elif check == "packed":
        _check_packed(backend, pat, AttentionCase(**case), {})
    else:
        _check_kernel(backend, pat, AttentionCase(**case), {})
    print(f"passed: {check} of `{pat}`")


# ============================================================================
# Files: ``patterncc test FILE...``
# ============================================================================


def file_entries(path: str) -> list[tuple[str | None, ir.Pattern]]:
    """``[(entry name or None, pattern)]``: every definition of the file whose
    parameters all have defaults, and its final expression if it has one;
    just the file's main pattern if the parser cannot list definitions."""
    from . import pipeline

    try:
        from .parser import parse_source
    except ImportError:
        return [(None, pipeline.load(path))]
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PatternError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    module = parse_source(text, str(path))
    out: list[tuple[str | None, ir.Pattern]] = []
    for d in module.definitions:
        if all(p.default is not None for p in d.params):
            out.append((d.name, pipeline.load(path, entry=d.name)))
    if module.expr is not None or not out:
        out.append((None, pipeline.load(path)))
    return out


class _Progress:
    """``pattern i/N  backend  examples done`` on one line of stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        if self.tty:
            print("\r" + text[:100].ljust(100), end="", file=self.stream, flush=True)
        elif force:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=self.stream, flush=True)


def run_files(files: Sequence[str], examples: int = 30, backends: Sequence[str] | None = None,
              seed: int | None = None) -> int:
    """Property-test every pattern in each file; print progress on stderr and
    a summary table on stdout. Returns 0 if everything passed, 1 otherwise
    (with each minimal counterexample and the command that reproduces it)."""
    try:
        checked_backends(backends)
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"examples must be an integer >= 1, got {examples=!r}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if backends and "triton" in backends and "triton" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # asked for triton on a CPU machine
    jobs, failed = [], 0
    for path in files:
        try:
            jobs += [(path, entry, pat) for entry, pat in file_entries(path)]
        except PatternError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
        except OSError as err:
            print(f"error: {path}: cannot read: {err.strerror}", file=sys.stderr)
            failed += 1

    bar = _Progress()
    reports = []
    for number, (path, entry, pat) in enumerate(jobs, 1):
        name = f"{path}" + (f":{entry}" if entry else "")

        def progress(check, backend, done, total, number=number, name=name):
            bar.show(f"pattern {number}/{len(jobs)} {name}  {check}{' [' + backend + ']' if backend else ''}  "
                     f"{done}/{total} examples")

        bar.show(f"pattern {number}/{len(jobs)} {name}", force=True)
        try:
            report = check_pattern(pat, backends=backends, examples=examples, seed=seed,
                                   source=(path, entry), progress=progress)
        except PatternError as err:
            bar.done()
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        reports.append((name, report))
    bar.done()

    print(_summary(reports))
    for name, report in reports:
        for r in report.failures:
            print(f"\nFAILED {name}: {r.check}" + (f" [{r.backend}]" if r.backend else ""))
            if r.counterexample is not None:
                print(_indent(r.counterexample.describe(), "  "))
    failed += sum(1 for _, report in reports if not report.ok)
    return 1 if failed else 0


def _summary(reports) -> str:
    """One row per pattern and check; skip reasons are numbered below the table."""
    rows = [("pattern", "check", "backend", "result", "examples", "seconds")]
    reasons: list[str] = []
    for name, report in reports:
        for r in report.results:
            result = r.status
            if r.reason:
                if r.reason not in reasons:
                    reasons.append(r.reason)
                result += f" ({reasons.index(r.reason) + 1})"
            rows.append((name, r.check, r.backend or "-", result, str(r.examples), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"({i}) {reason}" for i, reason in enumerate(reasons, 1)]
    passed = sum(1 for _, report in reports if report.ok)
    ran = [r for _, report in reports for r in report.checked]
    what = sorted({r.check + (f" [{r.backend}]" if r.backend else "") for r in ran})
    lines.append(f"{passed} of {len(reports)} patterns passed; checked: "
                 + (", ".join(what) + f" ({sum(r.examples for r in ran)} examples in all)" if ran else "nothing"))
    return "\n".join(lines)
