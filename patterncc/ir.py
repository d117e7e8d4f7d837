"""The IR: an algebra of small frozen nodes.

A pattern is a predicate on ``(h, q, k)``: query ``q`` may attend to key ``k``
in head ``h``. Positions are 0-based and ``0 <= q, k < n``. Nodes are frozen,
hashable dataclasses, so patterns key caches and compare structurally; they
hold no numpy. ``|``, ``&``, ``-`` and ``~`` build nodes, and ``str(p)``
prints source that parses back to an equal pattern.

Primitive arguments are ``int`` or an integer ``Expr`` over ``n`` (for
example ``local(isqrt(n))``); ``bind(p, n)`` turns them into checked ints.
``where`` conditions keep ``q``, ``k``, ``h`` and ``n`` symbolic.

Every node may carry a ``loc`` (where it came from in the user's text); it
takes no part in equality or hashing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Union as TUnion

from .errors import HeadsError, LimitError, Loc, PatternError, PatternValueError

# Every integer a user writes or a parameter evaluates to must fit in int32:
# generated kernels do their index arithmetic in 32 bits.
MAX_VALUE = 2**31 - 1
# Head counts beyond any real model's: layouts, masks and plans are built per head.
MAX_HEADS = 4096

_LOC = dict(default=None, compare=False, hash=False, repr=False)


# ----------------------------------------------------------------------------
# Integer and boolean expressions (``where`` conditions, primitive arguments)
# ----------------------------------------------------------------------------


class Expr:
    """Base of integer and boolean expressions."""

    __slots__ = ()

    def __bool__(self):
        raise TypeError("a patterncc expression has no truth value; compare it inside `where`")

    def __str__(self) -> str:
        return expr_source(self)


@dataclass(frozen=True)
class Var(Expr):
    """``q``, ``k``, ``h`` or ``n``."""

    name: str
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Const(Expr):
    value: int
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class BinOp(Expr):
    """``+ - * // %`` with Python's (floor) semantics."""

    op: str
    left: Expr
    right: Expr
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Call(Expr):
    """``abs(x)``, ``min(a, b, ...)``, ``max(a, b, ...)``, ``isqrt(x)``."""

    fn: str
    args: tuple[Expr, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Compare(Expr):
    """``< <= > >= == !=`` between two integer expressions."""

    op: str
    left: Expr
    right: Expr
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class BoolOp(Expr):
    """``and`` / ``or`` over two or more conditions."""

    op: str
    args: tuple[Expr, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Not(Expr):
    arg: Expr
    loc: Loc | None = field(**_LOC)


INT_OPS = ("+", "-", "*", "//", "%")
CMP_OPS = ("<", "<=", ">", ">=", "==", "!=")
FUNCS = {"abs": (1, 1), "min": (2, None), "max": (2, None), "isqrt": (1, 1)}
VARS = ("q", "k", "h", "n")

Arg = TUnion[int, Expr]


def expr_vars(e: Expr) -> set[str]:
    """The variables an expression mentions."""
    if isinstance(e, Var):
        return {e.name}
    out: set[str] = set()
    for child in expr_children(e):
        out |= expr_vars(child)
    return out


def expr_children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, (BinOp, Compare)):
        return (e.left, e.right)
    if isinstance(e, (Call, BoolOp)):
        return e.args
    if isinstance(e, Not):
        return (e.arg,)
    return ()


def eval_int(e: Arg, env: dict[str, int], loc: Loc | None = None) -> int:
    """Evaluate an integer expression with Python ints (exact, no overflow)."""
    if isinstance(e, int):
        return e
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Var):
        if e.name not in env:
            raise PatternValueError(f"`{e.name}` has no value here", e.loc or loc)
        return env[e.name]
    if isinstance(e, BinOp):
        a, b = eval_int(e.left, env, loc), eval_int(e.right, env, loc)
        if e.op in ("//", "%") and b == 0:
            raise PatternValueError(f"division by zero in `{expr_source(e)}`", e.loc or loc)
        return _INT_FN[e.op](a, b)
    if isinstance(e, Call):
        vals = [eval_int(a, env, loc) for a in e.args]
        if e.fn == "isqrt":
            if vals[0] < 0:
                raise PatternValueError(f"isqrt of a negative number ({vals[0]})", e.loc or loc)
            return math.isqrt(vals[0])
        return {"abs": lambda v: abs(v[0]), "min": min, "max": max}[e.fn](vals)
    raise PatternValueError(f"`{expr_source(e)}` is not an integer expression", getattr(e, "loc", None) or loc)


_INT_FN = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


# ----------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------


class Pattern:
    """Base of every pattern node. Combine with ``| & - ~``."""

    __slots__ = ()

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union(_flatten(Union, (self, _check(other, "|"))))

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersect(_flatten(Intersect, (self, _check(other, "&"))))

    def __sub__(self, other: "Pattern") -> "Pattern":
        return Difference(self, _check(other, "-"))

    def __invert__(self) -> "Pattern":
        return Complement(self)

    def __bool__(self):
        raise TypeError(
            "a pattern has no truth value: combine patterns with | and &, not `or`/`and`"
        )

    def __str__(self) -> str:
        return source(self)

    def scored(self, softcap: float | None = None, alibi: bool = False) -> "Pattern":
        """This pattern with score terms: ``softcap(c)``, ``alibi`` (see ``Terms``)."""
        return scored(self, softcap, alibi)


def _check(other, op: str) -> "Pattern":
    if not isinstance(other, Pattern):
        raise TypeError(f"cannot combine a pattern with {type(other).__name__!r} using `{op}`")
    if isinstance(other, Scored):
        raise _scored_operand(op)
    return other


def _flatten(kind, parts) -> tuple:
    out = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return tuple(out)


# -- primitives. Each docstring is the exact rule; masks.py, blocklayout.py and the
#    Triton code generator implement it in the same order.


@dataclass(frozen=True)
class All(Pattern):
    """``all``: true everywhere."""

    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Empty(Pattern):
    """``none``: false everywhere."""

    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Causal(Pattern):
    """``causal``: ``k <= q``."""

    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Local(Pattern):
    """``local(w)``: ``abs(q - k) < w``; ``w >= 1``."""

    w: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Stride(Pattern):
    """``stride(l)``: ``(q - k) % l == 0``; ``l >= 1``."""

    l: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Block(Pattern):
    """``block(l)``: ``q // l == k // l``; ``l >= 1``."""

    l: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Summary(Pattern):
    """``summary(l, c)``: ``k % l >= l - c``, the last ``c`` of every run of ``l``; ``1 <= c <= l``."""

    l: Arg
    c: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Global(Pattern):
    """``global(g)``: ``q < g or k < g``; ``g >= 0``."""

    g: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Sink(Pattern):
    """``sink(g)``: ``k < g``; ``g >= 0``."""

    g: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Dilated(Pattern):
    """``dilated(w, d)``: ``abs(q - k) < w * d and (q - k) % d == 0``; ``w, d >= 1``."""

    w: Arg
    d: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Random(Pattern):
    """``random(r, b, seed)``: query block ``q // b`` attends ``r`` distinct key
    blocks ``k // b``, drawn by ``randomblocks.draw`` (seeded, documented there);
    ``r >= 0``, ``b >= 1``, ``seed >= 0``."""

    r: Arg
    b: Arg
    seed: Arg
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Where(Pattern):
    """``where COND``: any condition over ``q, k, h, n``."""

    cond: Expr
    loc: Loc | None = field(**_LOC)


# -- combinators


@dataclass(frozen=True)
class Union(Pattern):
    """``A | B | ...``"""

    parts: tuple[Pattern, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Intersect(Pattern):
    """``A & B & ...``"""

    parts: tuple[Pattern, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Difference(Pattern):
    """``A - B``: in ``A`` and not in ``B``."""

    left: Pattern
    right: Pattern
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Complement(Pattern):
    """``~A``"""

    arg: Pattern
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class HeadRange:
    start: int
    stop: int
    pattern: Pattern
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Heads(Pattern):
    """``heads { 0..8 => A, 8..16 => B }``: half-open ranges that must cover
    every head exactly (checked against the head count when one is known)."""

    ranges: tuple[HeadRange, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Cycle(Pattern):
    """``cycle(A, B, ...)``: head ``h`` uses argument ``h % count``."""

    parts: tuple[Pattern, ...]
    loc: Loc | None = field(**_LOC)


# -- score terms: what a pattern adds to the scores of the pairs it allows.
#    They sit only at the top of a tree (``Scored``), never change which pairs
#    may attend, and every stage that works on the mask (masks, layouts,
#    plans, kernels' predicates) takes ``split_terms(p)[0]``.


@dataclass(frozen=True)
class Terms:
    """A pattern's score terms: ``softcap(c)`` (``s = c * tanh(s / c)`` on the
    scaled score, ``c > 0``) and ``alibi`` (``s -= slope_h * abs(q - k)``, the
    standard slopes unless the call gives its own)."""

    softcap: float | None = None
    alibi: bool = False

    def __bool__(self) -> bool:
        return self.softcap is not None or self.alibi

    def __str__(self) -> str:
        """The text after ``with``: ``softcap(50), alibi``."""
        out = [] if self.softcap is None else [f"softcap({number_source(self.softcap)})"]
        return ", ".join(out + (["alibi"] if self.alibi else []))


NO_TERMS = Terms()
TERM_NAMES = ("softcap", "alibi")


@dataclass(frozen=True)
class Scored(Pattern):
    """``BODY with softcap(c), alibi``: the mask ``body`` with score terms. Only
    at the top of a pattern: combining it (``| & - ~``, ``heads``, ``cycle``)
    is an error, since terms apply to the whole attention."""

    body: Pattern
    terms: Terms
    loc: Loc | None = field(**_LOC)

    def __or__(self, other):
        raise _scored_operand("|")

    def __and__(self, other):
        raise _scored_operand("&")

    def __sub__(self, other):
        raise _scored_operand("-")

    def __invert__(self):
        raise _scored_operand("~")



def _scored_operand(op: str) -> TypeError:
    return TypeError(
        f"cannot use `{op}` on a pattern with score terms: terms apply to the whole attention; "
        "combine the mask patterns first, then add the terms (`(A | B).scored(softcap=50)`)"
    )


def scored(p: Pattern, softcap: float | None = None, alibi: bool = False) -> Pattern:
    """``p`` with these terms added to its own (a term given twice is an error)."""
    if not isinstance(p, Pattern):
        raise TypeError(f"expected a pattern, got {type(p).__name__}")
    softcap = check_softcap(softcap)
    if not isinstance(alibi, bool):
        raise TypeError(f"alibi must be True or False, got {alibi!r}")
    body, terms = split_terms(p)
    if softcap is not None and terms.softcap is not None:
        raise PatternValueError(f"the pattern already has softcap({number_source(terms.softcap)})", p.loc)
    merged = Terms(terms.softcap if softcap is None else softcap, terms.alibi or alibi)
    return Scored(body, merged, p.loc) if merged else body


def split_terms(p: Pattern) -> tuple[Pattern, Terms]:
    """``(mask pattern, score terms)``: what decides which pairs attend, and
    what is added to their scores."""
    if isinstance(p, Scored):
        return p.body, p.terms
    return p, NO_TERMS


def check_softcap(c) -> float | None:
    """``c`` as a float, or a ValueError/TypeError naming it: a finite number > 0."""
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise TypeError(f"softcap must be a number, got {type(c).__name__}")
    c = float(c)
    if not (math.isfinite(c) and c > 0):
        raise PatternValueError(f"softcap must be a finite number > 0, got softcap={c:g}")
    return c


def number_source(x: float) -> str:
    """A float as the language writes it: ``50``, ``30.5``, ``0.00001`` (no
    exponent; an integer beyond int32 as a decimal, ``3000000000.0``)."""
    if float(x).is_integer() and abs(x) <= MAX_VALUE:
        return str(int(x))
    from decimal import Decimal

    text = format(Decimal(repr(float(x))), "f")
    return text if "." in text else text + ".0"


PRIMITIVES = {
    "all": All,
    "none": Empty,
    "causal": Causal,
    "local": Local,
    "stride": Stride,
    "block": Block,
    "summary": Summary,
    "global": Global,
    "sink": Sink,
    "dilated": Dilated,
    "random": Random,
}
PRIMITIVE_NAMES = {cls: name for name, cls in PRIMITIVES.items()}


def args_of(p: Pattern) -> tuple[Arg, ...]:
    """The integer arguments of a primitive, in source order."""
    return tuple(getattr(p, f.name) for f in fields(p) if f.name != "loc")


def children(p: Pattern) -> tuple[Pattern, ...]:
    if isinstance(p, (Union, Intersect, Cycle)):
        return p.parts
    if isinstance(p, Difference):
        return (p.left, p.right)
    if isinstance(p, Complement):
        return (p.arg,)
    if isinstance(p, Heads):
        return tuple(r.pattern for r in p.ranges)
    if isinstance(p, Scored):
        return (p.body,)
    return ()


def walk(p: Pattern) -> Iterator[Pattern]:
    """Every node, parents before children (iterative: deep trees are fine)."""
    stack = [p]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def depends_on_head(p: Pattern) -> bool:
    return any(
        isinstance(node, (Heads, Cycle)) or (isinstance(node, Where) and "h" in expr_vars(node.cond))
        for node in walk(p)
    )


def uses_n(p: Pattern) -> bool:
    """True when the pattern's meaning changes with the sequence length beyond
    the bounds check (then kernels are specialized per length)."""
    for node in walk(p):
        if isinstance(node, Where) and "n" in expr_vars(node.cond):
            return True
        if type(node) in PRIMITIVE_NAMES and any(isinstance(a, Expr) for a in args_of(node)):
            return True
    return False


# ----------------------------------------------------------------------------
# Binding a length: symbolic arguments -> checked ints
# ----------------------------------------------------------------------------

# (field, minimum) for every primitive argument; summary's c <= l is checked apart.
_MINIMUM = {
    Local: {"w": 1},
    Stride: {"l": 1},
    Block: {"l": 1},
    Summary: {"l": 1, "c": 1},
    Global: {"g": 0},
    Sink: {"g": 0},
    Dilated: {"w": 1, "d": 1},
    Random: {"r": 0, "b": 1, "seed": 0},
}


def check_args(p: Pattern, values: dict[str, int]) -> None:
    """Raise a located PatternValueError if a primitive's ints are out of range."""
    name = PRIMITIVE_NAMES[type(p)]
    for arg, lo in _MINIMUM.get(type(p), {}).items():
        v = values[arg]
        if not isinstance(v, int) or isinstance(v, bool):
            raise PatternValueError(f"{name}: `{arg}` must be an integer, got {v!r}", p.loc)
        if v < lo:
            raise PatternValueError(f"{name}: `{arg}` must be >= {lo}, got {arg}={v}", p.loc)
        if v > MAX_VALUE:
            raise LimitError(f"{name}: `{arg}`={v} is larger than the limit {MAX_VALUE}", p.loc)
    if isinstance(p, Summary) and values["c"] > values["l"]:
        raise PatternValueError(
            f"summary(l, c) needs 1 <= c <= l, got l={values['l']}, c={values['c']}", p.loc
        )


def bind(p: Pattern, n: int) -> Pattern:
    """Evaluate every symbolic primitive argument at sequence length ``n`` and
    check its range. ``where`` conditions keep ``n`` symbolic; their values
    are proven to stay within what the backends' integers hold at this ``n``
    (``check_where``)."""
    return _map(p, lambda node: _bind_node(node, n))


def _bind_node(node: Pattern, n: int) -> Pattern:
    if isinstance(node, Where):
        check_where(node.cond, n, node.loc)
        return node
    if type(node) not in PRIMITIVE_NAMES or not any(isinstance(a, Expr) for a in args_of(node)):
        return node
    names = [f.name for f in fields(node) if f.name != "loc"]
    values = {a: eval_int(getattr(node, a), {"n": n}, node.loc) for a in names}
    check_args(node, values)
    return replace(node, **values)


def for_head(p: Pattern, h: int) -> Pattern:
    """The head-free pattern that head ``h`` uses."""

    def pick(node: Pattern) -> Pattern:
        if isinstance(node, Cycle):
            return for_head(node.parts[h % len(node.parts)], h)
        if isinstance(node, Heads):
            for r in node.ranges:
                if r.start <= h < r.stop:
                    return for_head(r.pattern, h)
            raise HeadsError(f"head {h} is not covered by any range of `heads`", node.loc)
        if isinstance(node, Where) and "h" in expr_vars(node.cond):
            return replace(node, cond=substitute(node.cond, "h", h))
        return node

    return _map(p, pick)


def natural_heads(p: Pattern) -> int | None:
    """A head count that shows every head's pattern: what a ``heads { .. }``
    block covers (its largest range end), else the longest ``cycle``; None
    when the pattern does not depend on the head that way."""
    stops = [r.stop for node in walk(p) if isinstance(node, Heads) for r in node.ranges]
    if stops:
        return max(stops)
    cycles = [len(node.parts) for node in walk(p) if isinstance(node, Cycle)]
    return max(cycles) if cycles else None


def check_heads(p: Pattern, heads: int) -> None:
    """Every ``heads { .. }`` must cover ``0..heads`` exactly, without overlap;
    and ``heads`` is within ``MAX_HEADS`` (layouts and masks work per head)."""
    if heads > MAX_HEADS:
        raise LimitError(f"{heads=} is over the limit of {MAX_HEADS} heads")
    for node in walk(p):
        if not isinstance(node, Heads):
            continue
        covered = 0
        for r in sorted(node.ranges, key=lambda r: r.start):
            if r.start != covered:
                what = "overlaps the range before it" if r.start < covered else f"leaves heads {covered}..{r.start} uncovered"
                raise HeadsError(f"heads range {r.start}..{r.stop} {what}", r.loc or node.loc)
            covered = r.stop
        if covered != heads:
            raise HeadsError(
                f"`heads` covers heads 0..{covered} but the attention has {heads=} heads",
                node.loc,
                hint=f"make the ranges cover 0..{heads} exactly",
            )


def substitute(e: Expr, name: str, value: "int | Expr") -> Expr:
    """``e`` with variable ``name`` replaced by ``value`` (an int or an expression)."""
    if isinstance(e, Var):
        if e.name != name:
            return e
        return Const(value, e.loc) if isinstance(value, int) else value
    if isinstance(e, (BinOp, Compare)):
        return replace(e, left=substitute(e.left, name, value), right=substitute(e.right, name, value))
    if isinstance(e, (Call, BoolOp)):
        return replace(e, args=tuple(substitute(a, name, value) for a in e.args))
    if isinstance(e, Not):
        return replace(e, arg=substitute(e.arg, name, value))
    return e


def _map(p: Pattern, fn) -> Pattern:
    """Rebuild the tree bottom-up, applying ``fn`` to each node first (pre-order).

    ``fn`` may replace a node; its result's children are then mapped too.
    """
    node = fn(p)
    if isinstance(node, (Union, Intersect, Cycle)):
        parts = tuple(_map(c, fn) for c in node.parts)
        return node if parts == node.parts and all(a is b for a, b in zip(parts, node.parts)) else replace(node, parts=parts)
    if isinstance(node, Difference):
        return replace(node, left=_map(node.left, fn), right=_map(node.right, fn))
    if isinstance(node, Complement):
        return replace(node, arg=_map(node.arg, fn))
    if isinstance(node, Heads):
        return replace(node, ranges=tuple(replace(r, pattern=_map(r.pattern, fn)) for r in node.ranges))
    if isinstance(node, Scored):
        return replace(node, body=_map(node.body, fn))
    return node


# ----------------------------------------------------------------------------
# Printing: source that parses back to an equal pattern
# ----------------------------------------------------------------------------

# Python's precedence for set operators: ~ binds tightest, then -, &, |.
# A `where` pattern extends as far right as it can, so it is parenthesized
# whenever it is not the whole pattern.
_P_WHERE, _P_UNION, _P_INTER, _P_DIFF, _P_NOT, _P_ATOM = range(6)


def source(p: Pattern) -> str:
    return _src(p, _P_WHERE)


def _paren(text: str, prec: int, need: int) -> str:
    return f"({text})" if prec < need else text


def _src(p: Pattern, need: int) -> str:
    if isinstance(p, Union):
        return _paren(" | ".join(_src(c, _P_INTER) for c in p.parts), _P_UNION, need)
    if isinstance(p, Intersect):
        return _paren(" & ".join(_src(c, _P_DIFF) for c in p.parts), _P_INTER, need)
    if isinstance(p, Difference):
        return _paren(f"{_src(p.left, _P_DIFF)} - {_src(p.right, _P_NOT)}", _P_DIFF, need)
    if isinstance(p, Complement):
        return _paren(f"~{_src(p.arg, _P_NOT)}", _P_NOT, need)
    if isinstance(p, Where):
        return _paren(f"where {expr_source(p.cond)}", _P_WHERE, need)
    if isinstance(p, Cycle):
        return "cycle(" + ", ".join(_src(c, _P_WHERE) for c in p.parts) + ")"
    if isinstance(p, Heads):
        body = ", ".join(f"{r.start}..{r.stop} => {_src(r.pattern, _P_WHERE)}" for r in p.ranges)
        return "heads { " + body + " }"
    if isinstance(p, Scored):
        # `with` is looser than anything, `where` included: never parenthesized.
        return f"{_src(p.body, _P_WHERE)} with {p.terms}"
    name = PRIMITIVE_NAMES[type(p)]
    args = args_of(p)
    return f"{name}({', '.join(expr_source(a) for a in args)})" if args else name


# Expression precedence, Python's: or < and < not < comparison < + - < * // % < unary -.
_E_OR, _E_AND, _E_NOT, _E_CMP, _E_ADD, _E_MUL, _E_NEG, _E_ATOM = range(8)
_E_PREC = {"+": _E_ADD, "-": _E_ADD, "*": _E_MUL, "//": _E_MUL, "%": _E_MUL}


def expr_source(e: Arg) -> str:
    return _esrc(e, _E_OR)


def _esrc(e: Arg, need: int) -> str:
    if isinstance(e, int):
        return _paren(str(e), _E_NEG if e < 0 else _E_ATOM, need)
    if isinstance(e, Const):
        return _esrc(e.value, need)
    if isinstance(e, Var):
        return e.name
    if isinstance(e, BinOp):
        prec = _E_PREC[e.op]  # left-associative: the right operand binds one tighter
        return _paren(f"{_esrc(e.left, prec)} {e.op} {_esrc(e.right, prec + 1)}", prec, need)
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(_esrc(a, _E_OR) for a in e.args)})"
    if isinstance(e, Compare):
        return _paren(f"{_esrc(e.left, _E_ADD)} {e.op} {_esrc(e.right, _E_ADD)}", _E_CMP, need)
    if isinstance(e, BoolOp):
        prec = _E_OR if e.op == "or" else _E_AND
        return _paren(f" {e.op} ".join(_esrc(a, prec + 1) for a in e.args), prec, need)
    if isinstance(e, Not):
        return _paren(f"not {_esrc(e.arg, _E_NOT)}", _E_NOT, need)
    raise TypeError(f"not an expression: {e!r}")


# ----------------------------------------------------------------------------
# Bounds of `where` expressions
# ----------------------------------------------------------------------------
# Exact bounds of ``where`` expressions, so that no backend's integers wrap.
#
# The language promises Python's unbounded integers; the backends compute in
# fixed width: numpy int64 (the reference backend and the layouts), and in
# the generated Triton kernels int32, or int64 where some value could leave
# int32 at any length (``codegen._needs_int64``), as in the FlexAttention
# ``mask_mod``. So every ``where`` expression is checked when ``n`` becomes
# known (``ir.bind``): interval arithmetic over Python integers, with
# ``0 <= q, k < n`` and ``0 <= h < MAX_HEADS``, bounds every intermediate
# value, and an expression that could leave ``[-LIMIT, LIMIT]`` is refused
# with a ``LimitError`` located at the sub-expression. ``LIMIT`` is 2**62, not
# 2**63 - 1, so that the kernels' floor division (``a - floor_mod(a, b)``)
# and ``abs`` cannot wrap either.

LIMIT = 2**62


def check_where(cond: Expr, n: int, where_loc=None) -> None:
    """Refuse ``cond`` if any intermediate value could leave ``[-LIMIT, LIMIT]`` at length ``n``."""
    ranges = {"q": (0, n - 1), "k": (0, n - 1), "n": (n, n), "h": (0, MAX_HEADS - 1)}
    _bounds(cond, ranges, n, where_loc)


def _bounds(e: Expr, ranges: dict, n: int, where_loc) -> tuple[int, int]:
    lo, hi = _node_bounds(e, ranges, n, where_loc)
    if lo < -LIMIT or hi > LIMIT:
        worst = hi if hi > LIMIT else lo
        raise LimitError(
            f"`{expr_source(e)}` can reach {worst} at n={n}: beyond +-2**62, where the backends' "
            "64-bit integers no longer compute it exactly",
            getattr(e, "loc", None) or where_loc,
            hint="keep the values of a `where` expression within +-2**62 (4.6e18)",
        )
    return lo, hi


def _node_bounds(e, ranges, n, where_loc) -> tuple[int, int]:
    sub = lambda x: _bounds(x, ranges, n, where_loc)  # noqa: E731
    match e:
        case int():
            return e, e
        case Const(value=v):
            return v, v
        case Var(name=name):
            return ranges[name]
        case Compare(left=a, right=b):
            sub(a), sub(b)
            return 0, 1
        case BoolOp(args=args):
            for a in args:
                sub(a)
            return 0, 1
        case Not(arg=a):
            sub(a)
            return 0, 1
        case BinOp(op=op, left=a, right=b):
            (a0, a1), (b0, b1) = sub(a), sub(b)
            if op == "+":
                return a0 + b0, a1 + b1
            if op == "-":
                return a0 - b1, a1 - b0
            if op == "*":
                corners = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
                return min(corners), max(corners)
            if b0 <= 0 <= b1:  # a divisor that may be 0 (evaluation refuses it): no bound
                big = max(abs(a0), abs(a1), abs(b0), abs(b1))
                return -big, big
            if op == "%":  # the sign of the divisor, smaller than it
                return (0, b1 - 1) if b0 > 0 else (b0 + 1, 0)
            corners = (a0 // b0, a0 // b1, a1 // b0, a1 // b1)
            return min(corners), max(corners)
        case Call(fn=fn, args=args):
            bounds = [sub(a) for a in args]
            if fn == "abs":
                (x0, x1), = bounds
                return (0 if x0 <= 0 <= x1 else min(abs(x0), abs(x1))), max(abs(x0), abs(x1))
            if fn == "min":
                return min(b[0] for b in bounds), min(b[1] for b in bounds)
            if fn == "max":
                return max(b[0] for b in bounds), max(b[1] for b in bounds)
            (x0, x1), = bounds  # isqrt
            return math.isqrt(max(x0, 0)), math.isqrt(max(x1, 0))
    raise TypeError(f"not an expression: {e!r}")
