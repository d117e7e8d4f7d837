"""Hypothesis strategies: well-formed patterns, ``where`` conditions, and the
inputs of attention calls (``AttentionCase``: shapes, dtype, scale, seed,
score-term tensors, packed sequence lengths), with the torch tensors a case
stands for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from hypothesis import strategies as st

from .. import ir


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
