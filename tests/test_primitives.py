"""Every primitive is one class with an entry for every stage, and the newest,
``band(lo, hi)``, through the front end, the mask, the layout and the planner.

The completeness test enumerates ``ir.PRIMITIVES`` and names the primitive and
the stage that lacks its entry; the functional checks then run each class's
rules against its own mask on an example drawn from its own strategy. The
kernels' side of ``band`` (Triton in the interpreter, the torch mask_mod, the
planned components) runs with the other patterns in test_triton.py and
test_plan.py.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, find, given, settings, strategies as st

import patterncc as pcc
from patterncc import blocklayout, ir, masks, planner
from patterncc.errors import ArityError, LimitError, PatternValueError
from patterncc.primitives import Primitive
from patterncc.resolve import stdlib
from patterncc.simplify import simplify
from patterncc.testing import block_classes, patterns

README = Path(__file__).resolve().parent.parent / "README.md"

# What each stage needs from a primitive's class, stated by the class itself.
STAGES = {
    "language (argument minimums)": "MINIMUM",
    "language (rules between arguments)": "check_values",
    "simplify": "simplified",
    "mask": "mask",
    "layout rows": "rows",
    "layout classify": "classify",
    "layout estimate": "estimate",
    "layout evaluation (depends on q - k / k)": "DEPENDS_ON",
    "layout evaluation (period)": "period",
    "layout intersection window": "HULL",
    "layout and planner (drawn table)": "TABLE",
    "Triton and torch emitter": "emit",
    "planner hint (or an explicit None)": "order_hint",
    "planner residue rewrite (or an explicit None)": "over_residues",
    "planner condition (or an explicit None)": "condition",
    "testing-kit strategy": "strategy",
}
NAMES = sorted(ir.PRIMITIVES)


def example(cls) -> Primitive:
    """The simplest instance the class's own strategy draws with int arguments."""
    return find(cls.strategy(), lambda p: all(isinstance(a, int) for a in ir.args_of(p)))


def readme_primitive_rows() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("| primitive | exact rule | arguments |")
    return text[start:text.index("\n\n", start)]


# -- completeness ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_has_an_entry(name):
    from patterncc.backends.triton import codegen

    cls = ir.PRIMITIVES[name]
    missing = [stage for stage, attr in STAGES.items() if attr not in vars(cls)]
    assert not missing, f"primitive `{name}` ({cls.__name__}) has no entry for: {', '.join(missing)}"
    assert issubclass(cls, Primitive) and cls.NAME == name, f"`{name}`: NAME is {cls.NAME!r}"
    assert getattr(ir, cls.__name__) is cls, f"`{name}`: ir.{cls.__name__} is not the primitive's class"
    args = [f.name for f in fields(cls) if f.name != "loc"]
    assert list(cls.MINIMUM) == args, f"`{name}`: MINIMUM names {list(cls.MINIMUM)}, the fields are {args}"
    assert cls.DEPENDS_ON <= {"d", "k"}, f"`{name}`: DEPENDS_ON is {cls.DEPENDS_ON}"
    for stage, table in (("layout rows", blocklayout._ROWS), ("layout classify", blocklayout._CLASS),
                         ("Triton and torch emitter", codegen._PATTERN_EMITTERS)):
        assert cls in table, f"primitive `{name}` is missing from the {stage} table"
    assert name in stdlib_reserved(), f"`{name}` is not a reserved name of the language"
    rows = readme_primitive_rows()
    assert re.search(rf"`{name}(\(|`)", rows), f"`{name}` has no row in README.md's table of primitives"


def stdlib_reserved() -> set[str]:
    from patterncc.resolve.definitions import _RESERVED

    return _RESERVED


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_works_on_an_example(name):
    """One example per primitive, from its own strategy, through every stage:
    source round trip, pickle, mask against its ``where`` condition, layout
    exact against the mask, both emitters, and the planner hint's shape."""
    from patterncc.backends.triton import codegen, flex

    cls = ir.PRIMITIVES[name]
    p = example(cls)
    assert pcc.parse(str(p)) == simplify(p), f"`{name}`: {p} does not parse back"
    assert pickle.loads(pickle.dumps(p)) == p and hash(pickle.loads(pickle.dumps(p))) == hash(p)
    n, heads = 29, 1
    want = masks.dense_mask(p, n, heads)
    assert np.array_equal(masks.dense_mask(simplify(p), n, heads), want), f"`{name}`: simplified() changes the mask"
    cond = p.condition()
    if cls.TABLE:
        assert cond is None, f"`{name}` is a table: it has no condition"
    else:
        assert np.array_equal(masks.dense_mask(ir.Where(cond), n, heads), want), f"`{name}`: condition() != mask"
    for block in (1, 4, 7):
        got = pcc.layout(p, seq_len=n, block=block).to_dense()
        assert np.array_equal(got, block_classes(p, n, block, heads)), f"`{name}`: layout at block={block}"
    for dialect in (codegen._TRITON, codegen._TORCH):
        pred = codegen._Predicate(dialect)
        assert pred.emit(p) and pred.lines, f"`{name}`: no {dialect.name} predicate"
    assert "def pattern_mask" in codegen.generate_source(p)
    pos = torch.arange(n, dtype=torch.int32)
    mod = flex.mask_mod(p, n)
    got = np.broadcast_to(mod(0, torch.tensor(0), pos[:, None], pos[None, :]).numpy(), (n, n))
    assert np.array_equal(got, want[0]), f"`{name}`: the torch mask_mod differs from the mask"
    hint = p.order_hint()
    assert hint is None or (len(hint) == 2 and all(isinstance(o, tuple) for o in hint)), f"`{name}`: hint {hint}"


def test_a_stage_left_out_is_named():
    """The completeness check can fail: a class without a rule of its own is
    caught, and the base class refuses loudly instead of guessing."""

    class Half(Primitive):
        NAME = "half"

    missing = [stage for stage, attr in STAGES.items() if attr not in vars(Half)]
    assert missing == list(STAGES)
    with pytest.raises(NotImplementedError, match="Half has no rows"):
        Half().rows(None, None, None)


# -- band(lo, hi) in the language -----------------------------------------------------


@pytest.mark.parametrize("src,lo,hi", [("band(1, 65)", 1, 65), ("band(-64, 1)", -64, 1),
                                       ("band(lo=-3, hi=2)", -3, 2), ("band(-2147483647, 2147483647)", -2**31 + 1, 2**31 - 1)])
def test_band_parses(src, lo, hi):
    p = pcc.parse(src)
    assert p == ir.Band(lo, hi) and str(p) == f"band({lo}, {hi})" and pcc.parse(str(p)) == p


def test_band_arguments_are_checked_where_they_are_written():
    with pytest.raises(PatternValueError, match=r"band\(lo, hi\) needs lo < hi.*lo=5, hi=5") as info:
        pcc.parse("causal & band(5, 5)")
    assert (info.value.line, info.value.column) == (1, 10)
    with pytest.raises(PatternValueError, match="lo < hi"):
        pcc.parse("band(3, -3)")
    with pytest.raises(ArityError, match=r"band\(lo, hi\)"):
        pcc.parse("band(3)")
    with pytest.raises(ArityError):
        pcc.parse("band")
    with pytest.raises(LimitError, match="larger than the limit"):
        pcc.parse("band(0, 2147483648)")
    with pytest.raises(LimitError, match="beyond the limit"):
        pcc.parse("causal | band(-2147483647 - 1, 0)")
    with pytest.raises(PatternValueError, match="`lo` must be >= -2147483647, got lo=-2147483648"):
        ir.check_args(ir.Band(-2**31, 0), {"lo": -2**31, "hi": 0})


def test_band_arguments_over_n_are_checked_when_bound():
    p = pcc.parse("band(0, n // 4)")
    assert masks.dense_mask(p, 8, 1)[0].sum() == 8 + 7  # q - k in {0, 1}
    with pytest.raises(PatternValueError, match="lo < hi"):
        masks.dense_mask(p, 3, 1)  # n // 4 == 0: an empty band


def test_band_simplifies_to_local_when_symmetric():
    assert simplify(pcc.parse("band(-3, 4)")) == ir.Local(4)
    assert simplify(pcc.parse("band(0, 1)")) == ir.Local(1)
    assert simplify(pcc.parse("band(-3, 3)")) == ir.Band(-3, 3)  # not symmetric: q - k = 3 is out


def test_band_rule():
    n = 12
    m = masks.dense_mask(pcc.parse("band(-2, 3)"), n, 1)[0]
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert np.array_equal(m, (q - k >= -2) & (q - k < 3))
    previous = masks.dense_mask(pcc.parse("band(1, 5)"), n, 1)[0]
    assert not previous[0].any() and previous[7].nonzero()[0].tolist() == [3, 4, 5, 6]


def test_chunked_is_llama4_chunked_attention():
    assert pcc.parse("chunked(8)") == ir.Causal() & ir.Block(8)
    assert "chunked" in stdlib()
    rows = README.read_text(encoding="utf-8")
    assert "| `chunked(l)` | `causal & block(l)` (Llama 4's chunked attention) |" in rows


# -- band's layout: exact, FULL inside -------------------------------------------------


@pytest.mark.parametrize("lo,hi", [(1, 65), (-64, 1), (-3, 2), (0, 1), (5, 6), (-40, -20), (30, 200), (-200, 200)])
@pytest.mark.parametrize("n,block", [(97, 8), (64, 16), (33, 3), (1, 4), (50, 64)])
def test_band_layout_exact(lo, hi, n, block):
    p = ir.Band(lo, hi)
    lay = pcc.layout(p, seq_len=n, block=block)
    assert np.array_equal(lay.to_dense(), block_classes(p, n, block, 1))
    assert blocklayout.estimate_blocks(p, n, block) >= lay.nnz


def test_wide_band_has_full_blocks_inside():
    lay = pcc.layout("band(1, 65)", seq_len=256, block=16)
    row = lay.to_dense()[0, 10]  # queries 160..175: keys 96..174 allowed, in part
    assert row.tolist() == [0] * 6 + [1, 2, 2, 2, 1] + [0] * 5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lo=st.integers(-30, 30), width=st.integers(1, 40), other=patterns(max_depth=2, max_leaves=3),
       op=st.sampled_from(["|", "&", "-", "r-"]), n=st.integers(1, 70), block=st.sampled_from([1, 3, 4, 8, 16]))
def test_band_combinations_layout_exact(lo, width, other, op, n, block):
    band = ir.Band(lo, lo + width)
    p = {"|": band | other, "&": band & other, "-": band - other, "r-": other - band}[op]
    heads = 2 if ir.depends_on_head(p) else 1
    assert np.array_equal(pcc.layout(p, seq_len=n, block=block, heads=heads).to_dense(),
                          block_classes(p, n, block, heads))


# -- band in the planner -------------------------------------------------------------


def test_band_runs_in_natural_order_and_rewrites_over_residues():
    assert planner._order_of(ir.Band(1, 9), 8) == (planner.NATURAL, planner.NATURAL)
    # same residue class mod 4: q - k = 4 m, and -7 <= 4 m < 10 is -1 <= m < 3
    assert ir.Band(-7, 10).over_residues(4, True) == (ir.Band(-1, 3), True)
    assert ir.Band(1, 4).over_residues(4, True) == (ir.Empty(), True)  # no multiple of 4 in [1, 4)
    plan = planner.build_plan(pcc.parse("stride(4) & band(-20, 9)"), 64, 8, 1, mode="planned")
    assert [c.q_order.kind for c in plan.components] == ["residue"]
    assert simplify(plan.components[0].slot_pattern) == ir.Block(16) & ir.Band(-5, 3)
