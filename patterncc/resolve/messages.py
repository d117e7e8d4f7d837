"""The errors that say what a position expected and what it found, with
"did you mean" hints, and the note naming the definition an error came out of."""

from __future__ import annotations

import difflib

from .. import ast, ir
from ..errors import PatternError, PatternValueError, UnknownNameError
from .context import _Ctx


def _did_you_mean(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


def _reserved_what(name: str) -> str:
    if name in ir.PRIMITIVES:
        return "a primitive pattern"
    if name in ir.FUNCS:
        return "a built-in function"
    return {"q": "the query position", "k": "the key position", "h": "the head index", "n": "the sequence length"}[name]


def _count_words(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _misplaced(
    node: ast.Name | ast.Call, ctx: _Ctx, wanted: str, allowed: frozenset[str] = frozenset()
) -> PatternError:
    """The error for a name that is not what this position needs."""
    name, loc = node.name, ctx.loc(node)
    if name in ctx.env:
        what = "an integer parameter"
    elif name in ir.VARS:
        what = f"{_reserved_what(name)} (an integer)"
    elif name in ir.FUNCS:
        what = "a function returning an integer"
    elif name in ir.PRIMITIVES or name in ctx.scope:
        what = "a pattern"
    else:
        if wanted == "a pattern":
            candidates = set(ir.PRIMITIVES) | set(ctx.scope)
            return UnknownNameError(f"unknown name `{name}`", loc, hint=_did_you_mean(name, candidates))
        names = sorted(allowed, key=ir.VARS.index) + sorted(ctx.env)
        listed = f"the names usable here: {', '.join(f'`{v}`' for v in names)}" if names else "only numbers can be used here"
        return UnknownNameError(
            f"unknown name `{name}`", loc, hint=_did_you_mean(name, set(names) | set(ir.FUNCS)) or listed
        )
    if isinstance(node, ast.Call) and what == "an integer parameter":
        return PatternValueError(f"`{name}` is {what} and cannot be called", loc)
    hint = None
    if wanted == "a pattern" and name in ir.VARS:
        hint = "a condition becomes a pattern with `where`, e.g. `where q - k < 64`"
    return PatternValueError(f"`{name}` is {what}, but {wanted} is expected here", loc, hint=hint)


def _expected(wanted: str, node, ctx: _Ctx) -> PatternError:
    """A type error: ``node`` is not what this position needs."""
    found, kind, hint = _describe(node)
    if wanted == "a condition" and isinstance(node, ast.Binary):  # `-` is a subtraction here
        found, kind = f"an integer expression (`{node.op}`)", "integer"
    if wanted == "a pattern" and kind == "condition":
        hint = hint or "a condition becomes a pattern with `where`, e.g. `where q - k < 64`"
    elif wanted == "a condition" and kind == "pattern":
        hint = "combine patterns outside the `where`: `causal & (where k % 2 == 0)`"
    elif wanted == "a condition" and kind == "integer":
        hint = "compare it, e.g. `... == 0`"
    # Located at the operator when there is one: `|` in `q < (k | 2)`.
    return PatternValueError(f"expected {wanted}, found {found}", ctx.loc(node), hint=hint)


def _describe(node) -> tuple[str, str, str | None]:
    """What a node is, in words; its kind (pattern, integer, condition); a hint."""
    if isinstance(node, ast.Num):
        return f"the number {node.value}", "integer", None
    if isinstance(node, ast.Compare):
        return "a comparison", "condition", None
    if isinstance(node, ast.Chain) and node.op in ("and", "or"):
        return f"a condition (`{node.op}`)", "condition", "combine patterns with `|` and `&`; `and`, `or` and `not` belong in `where` conditions"
    if isinstance(node, ast.Unary) and node.op == "not":
        return "a condition (`not`)", "condition", "the complement of a pattern is `~A`; `not` belongs in `where` conditions"
    if isinstance(node, ast.Unary) and node.op == "-":
        return "an integer (unary `-`)", "integer", "the complement of a pattern is `~A`"
    if isinstance(node, ast.Binary) and node.op != "-":
        return f"an integer expression (`{node.op}`)", "integer", None
    if isinstance(node, ast.Unary) and node.op == "~":
        return "a pattern (`~`)", "pattern", "`~` is the complement of a pattern; integers have no `~`"
    if isinstance(node, ast.Binary):
        return "a difference (`-`)", "unknown", None
    if isinstance(node, ast.Chain):
        return f"a pattern (`{node.op}`)", "pattern", None
    return "a pattern", "pattern", None


def _called_from(err: PatternError, definition: ast.Definition, call, ctx: _Ctx, in_stdlib: bool) -> PatternError:
    """Say, once, which definition an error came out of.

    For the standard library (whose errors are located at the user's call),
    show the library's definition; for a user definition, where it was called.
    """
    if getattr(err, "_call_noted", False) or call is None or ctx.site is not None:
        return err
    if in_stdlib:
        note = f"`{definition.name}` is the standard library's `{definition.loc.text.strip()}`"
    else:
        loc = ctx.loc(call)
        if loc is None or (err.loc is not None and (err.loc.line, err.loc.column) == (loc.line, loc.column)):
            return err
        note = f"in `{definition.name}`, called on line {loc.line}, column {loc.column}"
    new = type(err)(err.message, err.loc, hint=f"{err.hint}; {note}" if err.hint else note)
    new._call_noted = True
    return new
