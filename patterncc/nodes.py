"""The IR's nodes, apart from the primitives: integer and boolean expressions,
the ``Pattern`` base with its operators, ``where``, the combinators, heads,
score terms, and the printer that turns any pattern back into source.

``ir`` is the IR's one public face: it re-exports everything here and the
primitives (``patterncc.primitives``), which build on this module. Nodes are
frozen, hashable dataclasses that hold no numpy; every node may carry a
``loc`` that takes no part in equality or hashing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Union as TUnion

from .errors import Loc, PatternValueError


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



def args_of(p: Pattern) -> tuple[Arg, ...]:
    """The integer arguments of a primitive, in source order."""
    return tuple(getattr(p, f.name) for f in fields(p) if f.name != "loc")



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
    name = p.NAME  # a primitive (patterncc.primitives)
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

