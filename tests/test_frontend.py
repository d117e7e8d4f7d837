"""The front end: grammar, parse, resolve, simplify.

Every construct parses to the IR it names; printing and parsing back is the
identity (hypothesis over random IR); the language's precedence is Python's
(the same text evaluated by Python on IR objects); the standard library means
its documented formulas; simplify preserves meaning and is idempotent.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from patterncc import ast, ir, randomblocks
from patterncc.errors import PatternError
from patterncc.masks import dense_mask, eval_expr
from patterncc.parser import parse_source
from patterncc.resolve import parse_pattern, resolve, stdlib
from patterncc.simplify import simplify

Q, K, H, N = ir.Var("q"), ir.Var("k"), ir.Var("h"), ir.Var("n")


def unsimplified(text: str, **kw) -> ir.Pattern:
    return resolve(parse_source(text), **kw)


# ----------------------------------------------------------------------------
# Every construct
# ----------------------------------------------------------------------------

CONSTRUCTS = [
    ("all", ir.All()),
    ("none", ir.Empty()),
    ("causal", ir.Causal()),
    ("local(128)", ir.Local(128)),
    ("stride(64)", ir.Stride(64)),
    ("block(32)", ir.Block(32)),
    ("summary(128, 32)", ir.Summary(128, 32)),
    ("global(4)", ir.Global(4)),
    ("sink(0)", ir.Sink(0)),
    ("dilated(4, 3)", ir.Dilated(4, 3)),
    ("random(3, 64, 7)", ir.Random(3, 64, 7)),
    ("random(seed=7, r=3, b=64)", ir.Random(3, 64, 7)),
    ("summary(c=2, l=8)", ir.Summary(8, 2)),
    ("local(2 * 3 + 1)", ir.Local(7)),
    ("local(-3 * -2 // 2)", ir.Local(3)),
    ("local(max(1, 5, 2) - min(4, 9) + abs(-3))", ir.Local(4)),
    ("local(isqrt(17))", ir.Local(4)),
    ("local(isqrt(n))", ir.Local(ir.Call("isqrt", (N,)))),
    ("local(n // 4 + 1)", ir.Local(ir.BinOp("+", ir.BinOp("//", N, ir.Const(4)), ir.Const(1)))),
    ("causal | local(3)", ir.Causal() | ir.Local(3)),
    ("causal & local(3)", ir.Causal() & ir.Local(3)),
    ("causal - local(3)", ir.Causal() - ir.Local(3)),
    ("~causal", ~ir.Causal()),
    ("~~causal", ~~ir.Causal()),
    ("causal | all | none", ir.Causal() | ir.All() | ir.Empty()),
    ("causal | (all | none)", ir.Causal() | ir.All() | ir.Empty()),
    ("causal - all - none", ir.Causal() - ir.All() - ir.Empty()),
    ("causal - (all - none)", ir.Causal() - (ir.All() - ir.Empty())),
    ("where q - k < 3", ir.Where(ir.Compare("<", ir.BinOp("-", Q, K), ir.Const(3)))),
    ("where q >= k and k % 2 == 0", ir.Where(ir.BoolOp("and", (
        ir.Compare(">=", Q, K), ir.Compare("==", ir.BinOp("%", K, ir.Const(2)), ir.Const(0)))))),
    ("where 0 <= q - k < 4", ir.Where(ir.BoolOp("and", (
        ir.Compare("<=", ir.Const(0), ir.BinOp("-", Q, K)), ir.Compare("<", ir.BinOp("-", Q, K), ir.Const(4)))))),
    ("where q < 1 or k < 1 or h == 2", ir.Where(ir.BoolOp("or", (
        ir.Compare("<", Q, ir.Const(1)), ir.Compare("<", K, ir.Const(1)), ir.Compare("==", H, ir.Const(2)))))),
    ("where not q != k", ir.Where(ir.Not(ir.Compare("!=", Q, K)))),
    ("where -q < -3", ir.Where(ir.Compare("<", ir.BinOp("-", ir.Const(0), Q), ir.Const(-3)))),
    ("where abs(q - k) <= min(n // 2, max(3, h))", ir.Where(ir.Compare(
        "<=", ir.Call("abs", (ir.BinOp("-", Q, K),)),
        ir.Call("min", (ir.BinOp("//", N, ir.Const(2)), ir.Call("max", (ir.Const(3), H))))))),
    ("causal & (where k % 2 == 0)", ir.Causal() & ir.Where(ir.Compare("==", ir.BinOp("%", K, ir.Const(2)), ir.Const(0)))),
    ("heads { 0..8 => causal, 8..16 => local(3), }", ir.Heads((
        ir.HeadRange(0, 8, ir.Causal()), ir.HeadRange(8, 16, ir.Local(3))))),
    ("heads { 0..2 * 4 => where h < 3 }", ir.Heads((ir.HeadRange(0, 8, ir.Where(ir.Compare("<", H, ir.Const(3)))),))),
    ("cycle(causal, local(3),)", ir.Cycle((ir.Causal(), ir.Local(3)))),
    ("cycle(where q < k)", ir.Cycle((ir.Where(ir.Compare("<", Q, K)),))),
    ("strided(64)", ir.Causal() & (ir.Local(64) | ir.Stride(64))),
    ("strided(l = 64)", ir.Causal() & (ir.Local(64) | ir.Stride(64))),
    ("strided", ir.Causal() & (ir.Local(128) | ir.Stride(128))),
    ("strided()", ir.Causal() & (ir.Local(128) | ir.Stride(128))),
    ("fixed", ir.Causal() & (ir.Block(128) | ir.Summary(128, 32))),
    ("fixed(16)", ir.Causal() & (ir.Block(16) | ir.Summary(16, 4))),
    ("axial", ir.Causal() & (ir.Block(ir.Call("isqrt", (N,))) | ir.Stride(ir.Call("isqrt", (N,))))),
]


@pytest.mark.parametrize("text, expected", CONSTRUCTS, ids=[c[0] for c in CONSTRUCTS])
def test_construct(text, expected):
    assert unsimplified(text) == expected


def test_definitions_defaults_keywords_and_order():
    source = """
    # b is defined after a, and a uses it
    pattern a(w = 8, c = w // 2) = b(c) | local(w)
    pattern b(x) = stride(x)
    pattern main(k2 = 3) = a(c = k2) & causal
    """
    assert unsimplified(source) == (ir.Stride(3) | ir.Local(8)) & ir.Causal()
    assert unsimplified(source, overrides={"k2": 5}) == (ir.Stride(5) | ir.Local(8)) & ir.Causal()
    assert unsimplified(source, entry="a") == ir.Stride(4) | ir.Local(8)
    assert unsimplified(source, entry="a", overrides={"w": 6}) == ir.Stride(3) | ir.Local(6)
    assert unsimplified(source, entry="strided") == ir.Causal() & (ir.Local(128) | ir.Stride(128))


def test_final_expression_wins_over_last_definition():
    assert unsimplified("pattern p(w = 4) = local(w)\np(2) | causal") == ir.Local(2) | ir.Causal()
    assert unsimplified("pattern p(w = 4) = local(w)\np(2) | causal", entry="p") == ir.Local(4)


def test_defaults_may_use_n_and_earlier_parameters():
    p = unsimplified("pattern p(a = isqrt(n), b = a * 2) = dilated(a, b)")
    assert p == ir.Dilated(ir.Call("isqrt", (N,)), ir.BinOp("*", ir.Call("isqrt", (N,)), ir.Const(2)))
    assert ir.bind(p, 100) == ir.Dilated(10, 20)


def test_symbolic_arguments_flow_through_definitions():
    p = parse_pattern("pattern s() = strided(isqrt(n))")
    assert p == ir.Causal() & (ir.Local(ir.Call("isqrt", (N,))) | ir.Stride(ir.Call("isqrt", (N,))))
    assert ir.uses_n(p)
    assert ir.bind(p, 64) == ir.Causal() & (ir.Local(8) | ir.Stride(8))


def test_parameters_reach_where_conditions_as_written():
    p = unsimplified("pattern p(w = 8, m = n - 1) = where q - k < w and k < m")
    assert p == ir.Where(ir.BoolOp("and", (
        ir.Compare("<", ir.BinOp("-", Q, K), ir.Const(8)),
        ir.Compare("<", K, ir.BinOp("-", N, ir.Const(1))),
    )))


def test_a_source_may_redefine_a_standard_library_name():
    p = unsimplified("pattern strided(l = 4) = stride(l)\npattern main = strided(2) | sliding_window(3)")
    assert p == ir.Stride(2) | (ir.Causal() & ir.Local(3))


def test_the_standard_library_does_not_see_user_definitions():
    # bigbird's body says local(w): user code cannot change what that means.
    p = unsimplified("pattern longformer(w = 1, g = 1) = none\nbigbird(5, 2, 1, 8, 0)")
    assert p == ir.Local(5) | ir.Global(2) | ir.Random(1, 8, 0)


STATEMENT_LAYOUTS = [
    "pattern a = causal; pattern b = local(3); a & b",
    "pattern a = causal\npattern b = local(3)\na & b\n",
    "\n\n# leading comment\npattern a = causal   # trailing comment\r\npattern b = local(3);;\r\na &\n  b",
    "pattern a =\n    causal\npattern b = local(\n  3\n)\na\n  & b",
    "pattern a = (\n  causal\n)\npattern b = local(3); a & b;",
]


@pytest.mark.parametrize("text", STATEMENT_LAYOUTS)
def test_statement_separators_and_line_continuation(text):
    assert unsimplified(text) == ir.Causal() & ir.Local(3)


def test_a_line_starting_with_a_binary_operator_continues():
    text = "pattern p(w = 4) =\n    local(w)\n    | stride(w)\n    - block(2)"
    assert unsimplified(text) == ir.Local(4) | (ir.Stride(4) - ir.Block(2))


def test_a_line_starting_with_a_paren_starts_a_new_statement():
    # `p\n(…)` is not a call of p: the newline ends the statement, and a bare
    # expression may only come last.
    with pytest.raises(PatternError, match="only the last statement"):
        parse_source("causal\n(local(3))")


def test_where_reaches_to_the_end_inside_heads_and_cycle():
    p = unsimplified("heads { 0..1 => where q < k, 1..2 => causal }")
    assert p.ranges[0].pattern == ir.Where(ir.Compare("<", Q, K))
    p = unsimplified("cycle(where q < k, where k < q)")
    assert p == ir.Cycle((ir.Where(ir.Compare("<", Q, K)), ir.Where(ir.Compare("<", K, Q))))


def test_where_swallows_a_following_operator():
    # `where q < k | causal` means `where q < (k | causal)`: a type error, not a union.
    with pytest.raises(PatternError, match="expected an integer, found a pattern"):
        unsimplified("where q < k | causal")


def test_every_ir_node_has_a_location():
    text = "pattern p(w = 3) = causal & (local(w) | (where q - k < w))\np"
    for node in ir.walk(unsimplified(text)):
        assert node.loc is not None and node.loc.line >= 1 and node.loc.column >= 1, node
    where = [n for n in ir.walk(unsimplified(text)) if isinstance(n, ir.Where)][0]
    assert (where.loc.line, where.loc.column) == (1, 42)
    assert where.loc.text.startswith("pattern p(w = 3)")


def test_standard_library_nodes_are_located_at_the_call():
    p = unsimplified("\n  strided(8)")
    for node in ir.walk(p):
        assert (node.loc.line, node.loc.column, node.loc.filename) == (2, 3, "<pattern>")


def test_ast_keeps_operator_locations():
    module = parse_source("causal &\n  local(3)")
    chain = module.expr
    assert isinstance(chain, ast.Chain) and (chain.loc.line, chain.loc.column) == (1, 8)
    assert (chain.operands[1].loc.line, chain.operands[1].loc.column) == (2, 3)


def test_numbers_with_leading_zeros_and_the_largest_value():
    assert unsimplified("local(007)") == ir.Local(7)
    assert unsimplified(f"local({ir.MAX_VALUE})") == ir.Local(ir.MAX_VALUE)


def test_stdlib_is_documented_and_has_defaults():
    lib = stdlib()
    assert set(lib) == {"strided", "fixed", "sliding_window", "chunked", "local_global", "longformer", "bigbird",
                        "axial"}
    for definition in lib.values():
        assert all(p.default is not None for p in definition.params), definition.name
        parse_pattern(definition.name)  # every default is valid


# ----------------------------------------------------------------------------
# The standard library means its formulas
# ----------------------------------------------------------------------------

_n = 64
_q = np.arange(_n)[:, None]
_k = np.arange(_n)[None, :]


def _random_blocks(r, b, seed, n=_n):
    nb = -(-n // b)
    table = randomblocks.draw(r, nb, seed, np.arange(nb))
    member = np.zeros((nb, nb), dtype=bool)
    for qb in range(nb):
        member[qb, table[qb]] = True
    return member[_q // b, _k // b]


STDLIB_FORMULAS = [
    ("strided(8)", (_k <= _q) & ((abs(_q - _k) < 8) | ((_q - _k) % 8 == 0))),
    ("strided(5)", (_k <= _q) & ((abs(_q - _k) < 5) | ((_q - _k) % 5 == 0))),
    ("strided", (_k <= _q) & ((abs(_q - _k) < 128) | ((_q - _k) % 128 == 0))),
    ("fixed(8, 2)", (_k <= _q) & ((_q // 8 == _k // 8) | (_k % 8 >= 6))),
    ("fixed(l=10, c=10)", (_k <= _q) & ((_q // 10 == _k // 10) | (_k % 10 >= 0))),
    ("sliding_window(5)", (_k <= _q) & (abs(_q - _k) < 5)),
    ("chunked(8)", (_k <= _q) & (_q // 8 == _k // 8)),
    ("chunked(5)", (_k <= _q) & (_q // 5 == _k // 5)),
    ("local_global(5, 3)", (_k <= _q) & ((abs(_q - _k) < 5) | (_q < 3) | (_k < 3))),
    ("longformer(5, 3)", (abs(_q - _k) < 5) | (_q < 3) | (_k < 3)),
    ("bigbird(5, 3, 2, 8, 7)", (abs(_q - _k) < 5) | (_q < 3) | (_k < 3) | _random_blocks(2, 8, 7)),
    ("axial(8)", (_k <= _q) & ((_q // 8 == _k // 8) | ((_q - _k) % 8 == 0))),
    ("axial", (_k <= _q) & ((_q // 8 == _k // 8) | ((_q - _k) % 8 == 0))),  # width = isqrt(64)
    ("axial(6)", (_k <= _q) & ((_q // 6 == _k // 6) | ((_q - _k) % 6 == 0))),
]


@pytest.mark.parametrize("text, expected", STDLIB_FORMULAS, ids=[c[0] for c in STDLIB_FORMULAS])
def test_stdlib_semantics(text, expected):
    assert np.array_equal(dense_mask(parse_pattern(text), _n)[0], expected)


def test_strided_band_holds_l_keys():
    # The OpenAI-code convention: causal & local(l) gives each query l keys, itself included.
    m = dense_mask(parse_pattern("sliding_window(4)"), 16)[0]
    assert list(m.sum(axis=1)) == [1, 2, 3] + [4] * 13


# ----------------------------------------------------------------------------
# Precedence is Python's
# ----------------------------------------------------------------------------

ATOMS = {"A": ir.Causal(), "B": ir.Local(3), "C": ir.Stride(2), "D": ir.Block(4)}
ATOM_DEFINITIONS = "pattern A = causal\npattern B = local(3)\npattern C = stride(2)\npattern D = block(4)\n"


@st.composite
def set_expression(draw, depth=0):
    """Text over A..D with | & - ~ and parentheses, as Python would read it."""
    count = draw(st.integers(1, 4))
    out = []
    for i in range(count):
        if i:
            out.append(draw(st.sampled_from([" | ", " & ", " - "])))
        operand = (
            "(" + draw(set_expression(depth + 1)) + ")"
            if depth < 3 and draw(st.integers(0, 3)) == 0
            else draw(st.sampled_from(sorted(ATOMS)))
        )
        out.append("~" * draw(st.integers(0, 2)) + operand)
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(set_expression())
def test_pattern_precedence_is_pythons(text):
    python = eval(text, {}, dict(ATOMS))  # the test's own text, never user input
    assert unsimplified(ATOM_DEFINITIONS + text) == python


@st.composite
def int_expression(draw, depth=0):
    count = draw(st.integers(1, 3))
    out = []
    for i in range(count):
        if i:
            op = draw(st.sampled_from([" + ", " - ", " * ", " // ", " % "]))
            if op.strip() in ("//", "%"):
                out.append(op + str(draw(st.integers(1, 7))))
                continue
            out.append(op)
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            operand = "(" + draw(int_expression(depth + 1)) + ")"
        else:
            operand = draw(st.sampled_from(["q", "k", "h", "3", "0", "12"]))
        out.append("-" * draw(st.integers(0, 1)) + operand)
    return "".join(out)


@st.composite
def condition(draw, depth=0):
    count = draw(st.integers(1, 3))
    out = []
    for i in range(count):
        if i:
            out.append(draw(st.sampled_from([" and ", " or "])))
        if depth < 2 and draw(st.integers(0, 3)) == 0:
            operand = "(" + draw(condition(depth + 1)) + ")"
        else:
            terms = [draw(int_expression(2)) for _ in range(draw(st.integers(2, 3)))]
            ops = [draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="])) for _ in terms[1:]]
            operand = terms[0] + "".join(f" {op} {t}" for op, t in zip(ops, terms[1:]))
        out.append("not " * draw(st.integers(0, 1)) + operand)
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(condition(), st.integers(-20, 20), st.integers(-20, 20), st.integers(0, 7))
def test_condition_precedence_is_pythons(text, q, k, h):
    cond = unsimplified("where " + text).cond
    env = {"q": np.int64(q), "k": np.int64(k), "h": np.int64(h), "n": np.int64(64)}
    assert bool(eval_expr(cond, env)) == bool(eval(text, {}, {"q": q, "k": k, "h": h}))


# ----------------------------------------------------------------------------
# Round trip: parse(str(p)) == p for random IR
# ----------------------------------------------------------------------------


def n_expressions(isqrt: bool = True):
    """Integer expressions that use n (symbolic primitive arguments)."""
    def extend(inner):
        options = [
            st.builds(lambda a, c: ir.BinOp("+", a, ir.Const(c)), inner, st.integers(-5, 5)),
            st.builds(lambda a, c: ir.BinOp("*", ir.Const(c), a), inner, st.integers(-3, 3)),
            st.builds(lambda a, c: ir.BinOp("//", a, ir.Const(c)), inner, st.integers(1, 8)),
            st.builds(lambda a, b: ir.Call("max", (a, b)), inner, inner),
            st.builds(lambda a: ir.BinOp("-", ir.Const(0), a), inner),
        ]
        if isqrt:
            options.append(st.builds(lambda a: ir.Call("isqrt", (a,)), inner))
        return st.one_of(options)

    return st.recursive(st.just(N), extend, max_leaves=4)


def int_expressions():
    leaf = st.one_of(st.sampled_from([Q, K, H, N]), st.integers(-100, 100).map(ir.Const))
    divisor = st.one_of(st.integers(1, 16).map(ir.Const), n_expressions(isqrt=False))

    def extend(inner):
        return st.one_of(
            st.builds(ir.BinOp, st.sampled_from(["+", "-", "*"]), inner, inner),
            st.builds(ir.BinOp, st.sampled_from(["//", "%"]), inner, divisor),
            st.builds(lambda a: ir.Call("abs", (a,)), inner),
            st.builds(lambda fn, xs: ir.Call(fn, tuple(xs)), st.sampled_from(["min", "max"]), st.lists(inner, min_size=2, max_size=3)),
            st.builds(lambda a: ir.BinOp("-", ir.Const(0), a), inner),
        )

    return st.recursive(leaf, extend, max_leaves=5)


def conditions():
    compare = st.builds(ir.Compare, st.sampled_from(ir.CMP_OPS), int_expressions(), int_expressions())

    def extend(inner):
        return st.one_of(
            st.builds(lambda op, xs: ir.BoolOp(op, tuple(xs)), st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3)),
            st.builds(ir.Not, inner),
        )

    return st.recursive(compare, extend, max_leaves=4)


def arg(low: int, high: int = 64):
    return st.one_of(st.integers(low, high), n_expressions())


@st.composite
def summaries(draw):
    l = draw(st.integers(1, 16))
    return ir.Summary(l, draw(st.integers(1, l)))


def primitives(symbolic: bool = True):
    a = arg if symbolic else (lambda low, high=64: st.integers(low, high))
    return st.one_of(
        st.sampled_from([ir.All(), ir.Empty(), ir.Causal()]),
        st.builds(ir.Local, a(1)),
        st.builds(ir.Stride, a(1)),
        st.builds(ir.Block, a(1)),
        summaries(),
        st.builds(ir.Global, a(0)),
        st.builds(ir.Sink, a(0)),
        st.builds(ir.Dilated, a(1, 8), a(1, 8)),
        st.builds(ir.Random, st.integers(0, 4), st.integers(1, 8), st.integers(0, 99)),
        st.builds(ir.Where, conditions()),
    )


@st.composite
def heads(draw, inner, count=None):
    if count is None:
        cuts = sorted(set(draw(st.lists(st.integers(0, 20), min_size=2, max_size=4))))
        assume(len(cuts) >= 2)
    else:
        inside = draw(st.lists(st.integers(1, count - 1), max_size=3)) if count > 1 else []
        cuts = sorted({0, count, *inside})
    return ir.Heads(tuple(ir.HeadRange(a, b, draw(inner)) for a, b in zip(cuts, cuts[1:])))


def patterns(symbolic: bool = True, head_count=None):
    def extend(inner):
        return st.one_of(
            st.builds(operator.or_, inner, inner),
            st.builds(operator.and_, inner, inner),
            st.builds(operator.sub, inner, inner),
            st.builds(operator.invert, inner),
            st.builds(lambda xs: ir.Cycle(tuple(xs)), st.lists(inner, min_size=1, max_size=3)),
            heads(inner, head_count),
        )

    return st.recursive(primitives(symbolic), extend, max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns())
def test_print_then_parse_is_the_identity(p):
    text = str(p)
    assert unsimplified(text) == p, text
    assert parse_pattern(text) == simplify(p)


@settings(max_examples=100, deadline=None)
@given(conditions())
def test_conditions_round_trip(cond):
    assert unsimplified(str(ir.Where(cond))) == ir.Where(cond)


# ----------------------------------------------------------------------------
# simplify
# ----------------------------------------------------------------------------

SIMPLIFICATIONS = [
    ("causal | none", "causal"),
    ("none | causal | none", "causal"),
    ("causal | all", "all"),
    ("causal & all", "causal"),
    ("causal & none", "none"),
    ("local(3) | causal | local(3)", "local(3) | causal"),
    ("causal & (causal & local(3))", "causal & local(3)"),
    ("(causal | local(3)) | (stride(2) | causal)", "causal | local(3) | stride(2)"),
    ("~~causal", "causal"),
    ("~~~causal", "~causal"),
    ("~all", "none"),
    ("~none", "all"),
    ("causal - none", "causal"),
    ("none - causal", "none"),
    ("causal - all", "none"),
    ("causal - causal", "none"),
    ("all - causal", "~causal"),
    ("all - ~causal", "causal"),
    ("cycle(causal, causal)", "causal"),
    ("cycle(causal | none, causal)", "causal"),
    ("cycle(causal, local(3))", "cycle(causal, local(3))"),
    ("summary(8, 8)", "all"),
    ("summary(8, 7)", "summary(8, 7)"),
    ("stride(1)", "all"),
    ("global(0) | sink(0) | random(0, 4, 1)", "none"),
    ("summary(isqrt(n), isqrt(n))", "summary(isqrt(n), isqrt(n))"),
    ("heads { 0..4 => causal | none, 4..8 => causal }", "heads { 0..4 => causal, 4..8 => causal }"),
    ("local(3) | (where q < k) | local(3)", "local(3) | (where q < k)"),
]


@pytest.mark.parametrize("before, after", SIMPLIFICATIONS)
def test_simplify_rule(before, after):
    assert simplify(unsimplified(before)) == unsimplified(after)


def test_simplify_keeps_locations():
    p = simplify(unsimplified("causal &\n  (local(3) | none)"))
    assert p == ir.Causal() & ir.Local(3)
    assert (p.loc.line, p.loc.column) == (1, 8)
    assert (p.parts[1].loc.line, p.parts[1].loc.column) == (2, 4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(head_count=3))
def test_simplify_preserves_meaning_and_is_idempotent(p):
    once = simplify(p)
    assert simplify(once) == once
    try:
        before = dense_mask(p, 12, heads=3)
    except PatternError:
        assume(False)  # e.g. a symbolic argument out of range at n = 12
    assert np.array_equal(dense_mask(once, 12, heads=3), before), (str(p), str(once))


def test_simplify_output_is_valid_ir():
    from patterncc.pipeline import validate

    validate(simplify(unsimplified("(causal | none) & (all & (local(3) | local(3) | stride(2)))")))
