"""The analytic block layout against brute force from the element mask.

Differential and property-based: random compositions of every construct at
small lengths must give exactly the classes computed from ``dense_mask``;
golden text pictures pin a few layouts; long-sequence smoke tests check that
nothing of size ``n * n`` is ever allocated.
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patterncc import ir
from patterncc.errors import HeadsError, LimitError, PatternValueError
from patterncc.blocklayout import EMPTY, FULL, PARTIAL, build, from_dense_classes, sparse_mask
from patterncc.masks import dense_mask, evaluate
from stdlib_ir import axial, bigbird, fixed, local_global, longformer, sliding_window, strided

# The module (the package's `layout` attribute is the public function).
layout = importlib.import_module("patterncc.blocklayout")

GOLDEN = Path(__file__).parent / "golden" / "layouts"
C = ir.Causal()

def brute_classes(p: ir.Pattern, n: int, block: int, heads: int) -> np.ndarray:
    """int8 [H, nq, nk] straight from the dense element mask."""
    H = heads if ir.depends_on_head(p) else 1
    m = dense_mask(p, n, heads)[:H]
    nb = -(-n // block)
    padded = np.zeros((H, nb * block, nb * block), dtype=bool)
    padded[:, :n, :n] = m
    valid = np.zeros((nb * block, nb * block), dtype=bool)
    valid[:n, :n] = True
    tiles = padded.reshape(H, nb, block, nb, block)
    inside = valid.reshape(nb, block, nb, block)[None]
    anything = tiles.any(axis=(2, 4))
    everything = (tiles | ~inside).all(axis=(2, 4))
    return np.where(anything, np.where(everything, FULL, PARTIAL), EMPTY).astype(np.int8)


# ----------------------------------------------------------------------------
# Strategies: one per construct, combined with one_of
# ----------------------------------------------------------------------------


def int_exprs(names):
    leaf = st.one_of(st.sampled_from(names).map(ir.Var), st.integers(-10, 40).map(ir.Const))

    def extend(e):
        return st.one_of(
            st.builds(ir.BinOp, st.sampled_from(["+", "-", "*"]), e, e),
            st.builds(ir.BinOp, st.sampled_from(["//", "%"]), e, st.sampled_from([-3, -2, 1, 2, 3, 5, 7]).map(ir.Const)),
            e.map(lambda a: ir.Call("abs", (a,))),
            st.builds(lambda fn, a, b: ir.Call(fn, (a, b)), st.sampled_from(["min", "max"]), e, e),
        )

    return st.recursive(leaf, extend, max_leaves=4)


def conditions(names):
    e = int_exprs(names)
    compare = st.builds(ir.Compare, st.sampled_from(ir.CMP_OPS), e, e)

    def extend(c):
        return st.one_of(
            st.builds(lambda op, a, b: ir.BoolOp(op, (a, b)), st.sampled_from(["and", "or"]), c, c),
            c.map(ir.Not),
        )

    return st.one_of(st.recursive(compare, extend, max_leaves=3), e)  # an integer is true when nonzero


def primitives(names):
    small = st.integers(1, 20)
    summary = small.flatmap(lambda l: st.builds(ir.Summary, st.just(l), st.integers(1, l)))
    return st.one_of(
        st.sampled_from([ir.All(), ir.Empty(), C]),
        st.builds(ir.Local, small),
        st.builds(ir.Stride, small),
        st.builds(ir.Block, small),
        summary,
        st.builds(ir.Global, st.integers(0, 20)),
        st.builds(ir.Sink, st.integers(0, 20)),
        st.builds(ir.Dilated, st.integers(1, 6), st.integers(1, 9)),
        st.integers(-20, 20).flatmap(lambda lo: st.builds(ir.Band, st.just(lo), st.integers(lo + 1, lo + 30))),
        st.builds(ir.Random, st.integers(0, 4), st.integers(1, 12), st.integers(0, 3)),
        conditions(names).map(ir.Where),
    )


def head_ranges(children, heads: int):
    """``heads { .. }`` covering exactly 0..heads."""
    cuts = st.sets(st.integers(1, heads - 1), max_size=heads - 1) if heads > 1 else st.just(set())

    def make(bounds):
        edges = [0, *sorted(bounds), heads]
        return st.tuples(*[children for _ in edges[1:]]).map(
            lambda parts: ir.Heads(tuple(ir.HeadRange(a, b, p) for a, b, p in zip(edges, edges[1:], parts)))
        )

    return cuts.flatmap(make)


def patterns(heads: int):
    def extend(children):
        lists = st.lists(children, min_size=2, max_size=3)
        return st.one_of(
            lists.map(lambda ps: functools.reduce(operator.or_, ps)),
            lists.map(lambda ps: functools.reduce(operator.and_, ps)),
            st.builds(operator.sub, children, children),
            children.map(operator.invert),
            st.lists(children, min_size=1, max_size=3).map(lambda ps: ir.Cycle(tuple(ps))),
            head_ranges(children, heads),
        )

    return st.recursive(primitives(["q", "k", "n", "h"]), extend, max_leaves=6)


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 3))
    p = draw(patterns(heads))
    n = draw(st.one_of(st.integers(1, 80), st.sampled_from([1, 2, 15, 16, 17, 64, 79])))
    block = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    return p, n, block, heads


PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(cases())
def test_layout_is_exact(case):
    p, n, block, heads = case
    lay = build(p, n, block, heads)
    assert np.array_equal(lay.to_dense(), brute_classes(p, n, block, heads))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sparse_mask_and_element_density(case):
    p, n, block, heads = case
    want = dense_mask(p, n, heads)
    got = sparse_mask(p, n, heads, block=block)
    assert len(got) == (heads if ir.depends_on_head(p) else 1)
    for h, m in enumerate(got):
        assert m.shape == (n, n) and m.dtype == bool and m.has_sorted_indices
        assert np.array_equal(m.toarray(), want[h])
    lay = build(p, n, block, heads)
    assert lay.element_density() == pytest.approx(want[: lay.heads].mean(), abs=1e-12)


# Named standard-library layouts at awkward lengths: every class exact.
STDLIB = [
    strided(8), strided(5), fixed(8, 2), fixed(6, 4), sliding_window(7), local_global(9, 3),
    longformer(6, 5), bigbird(5, 3, 2, 6, 1), bigbird(4, 2, 3, 3, 7), axial(6), axial(8),
    C & ir.Dilated(3, 5), C & (ir.Local(6) | ir.Sink(2)), ~C | ir.Stride(7),
    ir.Band(1, 9), ir.Band(-12, 1) | ir.Global(2), ir.Band(-9, 20) & ir.Stride(3), ir.Band(5, 17) - ir.Block(8),
    ir.Cycle((strided(6), fixed(6, 2))),
]


@pytest.mark.parametrize("p", STDLIB, ids=str)
@pytest.mark.parametrize("n,block", [(97, 4), (64, 8), (50, 16), (33, 3), (7, 16)])
def test_stdlib_layouts_exact(p, n, block):
    heads = 2
    assert np.array_equal(build(p, n, block, heads).to_dense(), brute_classes(p, n, block, heads))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases())
def test_small_work_chunks_change_nothing(monkeypatch, case):
    # bands of a few rows, evaluation and CSR chunks of a few elements: the
    # code paths that long sequences take
    p, n, block, heads = case
    monkeypatch.setattr(layout, "_BAND_PAIRS", 16)
    monkeypatch.setattr(layout, "_EVAL_CHUNK", 7)
    monkeypatch.setattr(layout, "_CSR_CHUNK", 5)
    assert np.array_equal(build(p, n, block, heads).to_dense(), brute_classes(p, n, block, heads))
    want = dense_mask(p, n, heads)
    for h, m in enumerate(sparse_mask(p, n, heads, block=block)):
        assert np.array_equal(m.toarray(), want[h])


def test_large_strides_use_diagonals_and_stay_exact():
    # stride / dilated far apart: generated per diagonal, not per row.
    for p in (ir.Stride(37), C & ir.Stride(50), ir.Dilated(3, 29), ir.Stride(19) - ir.Local(40)):
        assert np.array_equal(build(p, 600, 4).to_dense(), brute_classes(p, 600, 4, 1))


def test_where_decided_by_interval_arithmetic():
    q, k = ir.Var("q"), ir.Var("k")
    as_causal = ir.Where(ir.Compare(">=", ir.BinOp("-", q, k), ir.Const(0)))
    assert np.array_equal(build(as_causal, 1000, 16).to_dense(), build(C, 1000, 16).to_dense())
    # each tile decided by intervals alone: no element is evaluated
    ctx = layout._Ctx(1000, 16)
    keys = np.arange(ctx.nb * ctx.nb, dtype=np.int64)
    t = layout._Tiles(keys // ctx.nb, keys % ctx.nb, ctx)
    layout._classify(as_causal, t, ctx)
    assert ctx.evals == 0


def test_symbolic_arguments_are_bound():
    n = ir.Var("n")
    p = C & ir.Local(ir.BinOp("//", n, ir.Const(8)))
    assert np.array_equal(build(p, 200, 8).to_dense(), build(C & ir.Local(25), 200, 8).to_dense())
    assert build(p, 200, 8).pattern == C & ir.Local(25)
    with pytest.raises(PatternValueError):
        build(ir.Local(ir.BinOp("-", n, ir.Const(300))), 200, 8)  # w = -100


# ----------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("p,heads", [
    (strided(8), 1), (bigbird(5, 3, 2, 6, 1), 3), (ir.Cycle((C, ~C, ir.Empty())), 3), (ir.Empty(), 2),
    (ir.Heads((ir.HeadRange(0, 1, fixed(8, 3)), ir.HeadRange(1, 4, longformer(9, 4)))), 4),
])
def test_csr_by_query_and_by_key_hold_the_same_pairs(p, heads):
    n, block = 150, 8
    lay = build(p, n, block, heads)
    H, nq, nk = lay.heads, lay.n_qblocks, lay.n_kblocks
    assert (nq, nk) == (19, 19) and H == (heads if ir.depends_on_head(p) else 1)
    for name, dtype, shape in [("kv_ptr", np.int32, (H, nq + 1)), ("q_ptr", np.int32, (H, nk + 1)),
                               ("kv_idx", np.int32, (lay.nnz,)), ("q_idx", np.int32, (lay.nnz,)),
                               ("kv_full", bool, (lay.nnz,)), ("q_full", bool, (lay.nnz,))]:
        a = getattr(lay, name)
        assert a.dtype == dtype and a.shape == shape, name
    by_q, by_k = set(), set()
    for h in range(H):
        # global offsets: head h's rows follow head h - 1's
        assert lay.kv_ptr[h, 0] == (lay.kv_ptr[h - 1, -1] if h else 0)
        assert lay.q_ptr[h, 0] == lay.kv_ptr[h, 0] and lay.q_ptr[h, -1] == lay.kv_ptr[h, -1]
        for i in range(nq):
            idx = lay.kv_idx[lay.kv_ptr[h, i] : lay.kv_ptr[h, i + 1]]
            assert np.all(np.diff(idx) > 0)
            by_q |= {(h, i, int(j), bool(f)) for j, f in zip(idx, lay.kv_full[lay.kv_ptr[h, i] : lay.kv_ptr[h, i + 1]])}
        for j in range(nk):
            idx = lay.q_idx[lay.q_ptr[h, j] : lay.q_ptr[h, j + 1]]
            assert np.all(np.diff(idx) > 0)
            by_k |= {(h, int(i), j, bool(f)) for i, f in zip(idx, lay.q_full[lay.q_ptr[h, j] : lay.q_ptr[h, j + 1]])}
    assert by_q == by_k and len(by_q) == lay.nnz
    assert lay.kv_ptr[-1, -1] == lay.nnz
    dense = lay.to_dense()
    assert np.array_equal(from_dense_classes(lay.pattern, n, block, dense).to_dense(), dense)
    assert np.array_equal(dense, brute_classes(p, n, block, heads))


def test_bad_sizes_name_the_argument():
    for kwargs, name in [(dict(seq_len=0, block=4), "seq_len"), (dict(seq_len=8, block=0), "block"),
                         (dict(seq_len=8, block=4, heads=0), "heads")]:
        with pytest.raises(PatternValueError, match=name):
            build(C, **kwargs)
    with pytest.raises(PatternValueError, match="block"):
        build(C, 8, 2.5)
    with pytest.raises(HeadsError):
        build(ir.Heads((ir.HeadRange(0, 1, C),)), 8, 4, heads=2)


def test_too_large_layouts_are_refused_clearly():
    with pytest.raises(LimitError, match="block pairs"):
        build(ir.All(), 2**23, 128)  # 2**32 pairs: refused before any work
    with pytest.raises(LimitError, match="blocks a side"):
        build(fixed(8, 2), 2**30, 1)
    with pytest.raises(LimitError, match="random"):
        build(ir.Random(4000, 1, 0), 2**20, 128)
    assert build(ir.Random(0, 1, 0) | sliding_window(4), 2**22, 128).nnz == 2**15 * 2 - 1


def test_names_of_blocklayout_are_read_and_set_in_their_home_modules(monkeypatch):
    # patterncc.blocklayout re-exports a package: a limit set there must reach
    # the module whose code reads it, or tuning it would silently do nothing.
    from patterncc.blocklayout import builder, limits

    assert layout.build is builder.build and layout.MAX_BLOCKS == limits.MAX_BLOCKS == 2**24
    monkeypatch.setattr(layout, "MAX_BLOCKS", 12)
    assert limits.MAX_BLOCKS == 12
    build(C, 96, 8)
    with pytest.raises(LimitError, match="blocks a side"):
        build(C, 97, 8)
    assert set(layout.__all__) <= set(dir(layout))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        layout.nothing


def test_element_evaluation_budget(monkeypatch):
    q, k = ir.Var("q"), ir.Var("k")
    # q * k % 7 takes no bounds that intervals can attain: every tile is evaluated
    product = ir.Where(ir.Compare("==", ir.BinOp("%", ir.BinOp("*", q, k), ir.Const(7)), ir.Const(1)))
    assert np.array_equal(build(product, 50, 4).to_dense(), brute_classes(product, 50, 4, 1))
    monkeypatch.setattr(layout, "MAX_ELEMENT_EVALS", 10_000)
    with pytest.raises(LimitError, match="element evaluations"):
        build(product, 4096, 64)


# ----------------------------------------------------------------------------
# Text pictures (golden files; regenerate with PATTERNCC_UPDATE_GOLDEN=1)
# ----------------------------------------------------------------------------

GOLDEN_CASES = {
    "strided_8_n100_b4": (strided(8), 100, 4, 1),
    "fixed_8_2_n70_b4": (fixed(8, 2), 70, 4, 1),
    "local_global_8_4_n64_b4": (local_global(8, 4), 64, 4, 1),
    "bigbird_6_4_2_8_0_n96_b4": (bigbird(6, 4, 2, 8, 0), 96, 4, 1),
    "axial_8_n64_b4": (axial(8), 64, 4, 1),
    "cycle_window_stride_n48_b4_h2": (ir.Cycle((sliding_window(8), C & ir.Stride(8))), 48, 4, 2),
    "sliding_window_1024_n1M_b128": (sliding_window(1024), 2**20, 128, 1),
    "bigbird_192_64_3_128_0_n1M_b128": (bigbird(192, 64, 3, 128, 0), 2**20, 128, 1),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_pictures(name):
    p, n, block, heads = GOLDEN_CASES[name]
    text = f"pattern: {p}\n{build(p, n, block, heads).describe()}\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("PATTERNCC_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text


def test_picture_downsamples_large_layouts():
    lay = build(longformer(512, 64), 2**18, 128)  # 2048 x 2048 blocks
    lines = lay.describe(max_width=64).splitlines()
    assert "1 char = 32x32 blocks" in lines[0] and "nnz=" in lines[0]
    assert len(lines) == 1 + 64 and all(len(x) == 64 for x in lines[1:])
    assert set(lines[1]) == {"+"}  # the global row meets every group
    assert lines[10][:1] == "+" and lines[10][10] == "+" and lines[10][20] == "."
    assert len(lay.describe(max_width=None).splitlines()) == 1 + 2048


# ----------------------------------------------------------------------------
# Long sequences: no n*n work or memory
# ----------------------------------------------------------------------------


def _check_sampled_tiles(p, lay, samples=40, seed=0):
    """Exact classes of random tiles (non-empty ones and arbitrary ones) by
    evaluating their elements."""
    rng = np.random.default_rng(seed)
    n, B = lay.seq_len, lay.block
    dense_row = {}
    rows = lay.kv_rows()
    pick = rng.integers(0, lay.nnz, samples)
    pairs = [(int(rows[e]), int(lay.kv_idx[e])) for e in pick]
    pairs += [tuple(int(x) for x in rng.integers(0, lay.n_qblocks, 2)) for _ in range(samples)]
    for i, j in pairs:
        if i not in dense_row:
            lo, hi = lay.kv_ptr[0, i], lay.kv_ptr[0, i + 1]
            dense_row[i] = dict(zip(lay.kv_idx[lo:hi].tolist(), np.where(lay.kv_full[lo:hi], FULL, PARTIAL).tolist()))
        q = np.arange(i * B, min(n, i * B + B))[:, None]
        k = np.arange(j * B, min(n, j * B + B))[None, :]
        # random blocks: the sparse lookup that the property tests check against mask.evaluate
        m = layout._evaluate(ir.bind(p, n), q, k, layout._Ctx(n, B))
        want = FULL if m.all() else PARTIAL if m.any() else EMPTY
        assert dense_row[i].get(j, EMPTY) == want, (i, j)


def test_one_million_tokens_local_global_without_n_squared_memory():
    n = 2**20
    tracemalloc.start()
    try:
        lay = build(local_global(512, 64), n, 128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20
    # per query block: key block 0 (global) and the band i-4 .. i
    nb = n // 128
    assert lay.nnz == sum(i + 1 for i in range(5)) + (nb - 5) * 6
    _check_sampled_tiles(local_global(512, 64), lay)


Q, K = ir.Var("q"), ir.Var("k")
WHERE_BAND = ir.Where(ir.BoolOp("and", (ir.Compare("<=", K, Q), ir.Compare("<", ir.BinOp("-", Q, K), ir.Const(700)))))


@pytest.mark.parametrize("p,n", [
    (sliding_window(1024), 2**20), (longformer(512, 64), 2**20), (bigbird(192, 64, 3, 128, 0), 2**20),
    (C & ir.Dilated(8, 300), 2**20), (WHERE_BAND, 2**20), (strided(1024), 2**18), (fixed(100, 10), 2**16),
], ids=str)
def test_long_sequence_smoke(p, n):
    tracemalloc.start()
    try:
        lay = build(p, n, 128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20
    _check_sampled_tiles(p, lay)


def test_element_density_without_n_squared_work():
    # fixed(128, 32): query q sees its own block up to itself and 32 keys of
    # every earlier block. Every tile below the diagonal is partial, but
    # translation along the diagonal makes them a handful to evaluate.
    n = 2**16
    q = np.arange(n)
    want = np.sum(q % 128 + 1 + 32 * (q // 128)) / (n * n)
    assert build(fixed(128, 32), n, 128).element_density() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("p", [bigbird(64, 16, 1, 64, 0), strided(128)], ids=str)
def test_sparse_mask_long_sequence(p):
    n = 2**16
    tracemalloc.start()
    try:
        (m,) = sparse_mask(p, n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # memory follows the result (int32 indices, held twice while joined), not n * n bools (4 GiB)
    assert peak < 10 * m.nnz + 32 * 2**20 < n * n // 8
    assert m.nnz == pytest.approx(build(p, n, 128).element_density() * n * n)
    rows = np.array([0, 1, 15, 16, 5000, n - 1])
    got = m[rows].toarray()
    if isinstance(p, ir.Union):  # bigbird: random blocks add to local | global, never remove
        want = evaluate(ir.Local(64) | ir.Global(16), rows[:, None], np.arange(n)[None, :], n)
        assert np.all(got >= want)
    else:
        assert np.array_equal(got, evaluate(p, rows[:, None], np.arange(n)[None, :], n))
