"""Patterns: names and calls of primitives and definitions (inlined with
their parameters bound), ``| & - ~``, ``where``, ``heads``, ``cycle`` and
score terms, from the entry point that picks the pattern a source means."""

from __future__ import annotations

from typing import Mapping

from .. import ast, ir
from ..errors import (
    ArityError,
    HeadsError,
    LimitError,
    Loc,
    PatternError,
    PatternSyntaxError,
    PatternValueError,
    UnknownNameError,
)
from .context import Value, _Ctx, _start
from .definitions import _check_definitions, _user_definitions, stdlib
from .expressions import _check_magnitude, _ExprResolver
from .messages import _called_from, _count_words, _describe, _did_you_mean, _expected, _misplaced


class _Resolver(_ExprResolver):
    """Resolves one parsed source: its entry point, patterns, score terms,
    heads and inlined definitions, over the integers of ``_ExprResolver``."""

    def __init__(self, module: ast.Module):
        super().__init__()
        self.module = module
        library = stdlib()
        self.user = _user_definitions(module)
        _check_definitions(self.user, visible={**library, **self.user}, library=frozenset(library))
        self.stdlib_scope = library
        self.user_scope = {**library, **self.user}
        self.expanding: list[str] = []  # definitions being inlined, outermost first

    # -- the entry point

    def main(self, overrides: Mapping[str, int], entry: str | None) -> ir.Pattern:
        top = _Ctx({}, self.user_scope, 0)
        if entry is not None:
            if entry not in self.user_scope:
                raise UnknownNameError(
                    f"no pattern named `{entry}` in {self.module.filename} or the standard library",
                    hint=_did_you_mean(entry, self.user_scope),
                )
            return self.expand(self.user_scope[entry], self.overrides(entry, overrides), top, None)
        if self.module.expr is not None:
            if overrides:
                raise UnknownNameError(
                    f"cannot set {', '.join(sorted(overrides))}: the source ends with an expression, which has no parameters",
                    ast.start_loc(self.module.expr),
                    hint="overrides set the parameters of a definition; name one with `entry`",
                )
            return self.pattern(self.module.expr, top)
        if not self.module.definitions:
            raise PatternSyntaxError(
                f"{self.module.filename} defines no pattern",
                Loc(1, 1, "", self.module.filename),
                hint="write an expression such as `causal & local(128)`, or a `pattern name = ...` definition",
            )
        last = self.module.definitions[-1]
        return self.expand(last, self.overrides(last.name, overrides), top, None)

    def overrides(self, name: str, overrides: Mapping[str, int]) -> dict[str, Value]:
        definition = self.user_scope[name]
        params = [p.name for p in definition.params]
        for key, value in overrides.items():
            if key not in params:
                listed = ", ".join(params) if params else "none"
                raise UnknownNameError(
                    f"`{name}` has no parameter `{key}`; its parameters: {listed}",
                    definition.loc,
                    hint=_did_you_mean(key, params),
                )
            if isinstance(value, bool) or not isinstance(value, int):
                raise PatternValueError(f"{key}={value!r} is not an integer", definition.loc)
            _check_magnitude(value, key, definition.loc)
        return dict(overrides)

    # -- patterns

    def pattern(self, node, ctx: _Ctx) -> ir.Pattern:
        ctx = ctx.deeper(node)
        self.count(1, ctx.loc(node))
        loc = ctx.loc(node)
        if isinstance(node, ast.Name):
            return self.pattern_name(node, ctx)
        if isinstance(node, ast.Call):
            return self.pattern_call(node, ctx)
        if isinstance(node, ast.Chain) and node.op in ("|", "&"):
            kind = ir.Union if node.op == "|" else ir.Intersect
            return _combine(kind, [self.operand(p, ctx, f"`{node.op}`") for p in node.operands], loc)
        if isinstance(node, ast.Binary) and node.op == "-":
            return ir.Difference(self.operand(node.left, ctx, "`-`"), self.operand(node.right, ctx, "`-`"), loc)
        if isinstance(node, ast.Unary) and node.op == "~":
            return ir.Complement(self.operand(node.operand, ctx, "`~`"), loc)
        if isinstance(node, ast.Where):
            return ir.Where(self.condition(node.cond, ctx), loc)
        if isinstance(node, ast.Heads):
            return self.heads(node, ctx)
        if isinstance(node, ast.Cycle):
            return ir.Cycle(tuple(self.operand(p, ctx, "`cycle`") for p in node.parts), loc)
        if isinstance(node, ast.Scored):
            return self.scored(node, ctx)
        raise _expected("a pattern", node, ctx)

    def operand(self, node, ctx: _Ctx, where: str) -> ir.Pattern:
        """A pattern inside a combination: one without score terms."""
        p = self.pattern(node, ctx)
        if isinstance(p, ir.Scored):
            what = f"`{node.name}`" if isinstance(node, (ast.Name, ast.Call)) else "this pattern"
            raise PatternValueError(
                f"{what} has score terms (`with {p.terms}`), so it cannot be a part of {where}: "
                "terms apply to the whole attention",
                _start(node, ctx),
                hint="define the mask without `with`, combine it, and put `with` after the combination",
            )
        return p

    # -- score terms

    def scored(self, node: ast.Scored, ctx: _Ctx) -> ir.Pattern:
        found, kind, _ = _describe(node.body)
        if kind in ("integer", "condition"):
            raise PatternValueError(
                f"`with` adds score terms to a pattern, but its left side is {found}",
                _start(node.body, ctx),
                hint="a condition becomes a pattern with `where`" if kind == "condition" else None,
            )
        body, terms = ir.split_terms(self.pattern(node.body, ctx))
        softcap, alibi = terms.softcap, terms.alibi
        for term in node.terms:
            loc = ctx.loc(term)
            if term.name not in ir.TERM_NAMES:
                raise UnknownNameError(
                    f"unknown score term `{term.name}`",
                    loc,
                    hint=_did_you_mean(term.name, ir.TERM_NAMES) or "the score terms: `softcap(c)`, `alibi`",
                )
            if term.name == "alibi":
                if term.args:
                    raise ArityError("`alibi` takes no arguments (the call's `alibi_slopes=` sets the slopes)", loc)
                if alibi:
                    raise PatternValueError("`alibi` is given twice", loc)
                alibi = True
                continue
            if len(term.args) != 1 or isinstance(term.args[0], ast.Keyword):
                raise ArityError(f"`softcap` takes exactly one argument, softcap(c), got {len(term.args)}", loc)
            if softcap is not None:
                raise PatternValueError(f"softcap is given twice (already softcap({ir.number_source(softcap)}))", loc)
            softcap = self.softcap(term.args[0], ctx)
        return ir.Scored(body, ir.Terms(softcap, alibi), ctx.loc(node))

    def softcap(self, node, ctx: _Ctx) -> float:
        loc = _start(node, ctx)
        if isinstance(node, ast.Real):
            value = node.value
        else:
            value = self.argument(node, ctx)
            if isinstance(value, ir.Expr):
                raise PatternValueError("softcap's argument must be a constant; it cannot depend on `n`", loc)
        if value <= 0:
            raise PatternValueError(f"softcap(c) needs c > 0, got c={ir.number_source(value)}", loc)
        if value == float("inf"):
            raise LimitError("softcap's argument is too large to be a float", loc)
        return float(value)

    def pattern_name(self, node: ast.Name, ctx: _Ctx) -> ir.Pattern:
        name = node.name
        if name in ctx.env:
            raise PatternValueError(f"`{name}` is an integer parameter, but a pattern is expected here", ctx.loc(node))
        if name in ir.PRIMITIVES:
            cls = ir.PRIMITIVES[name]
            params = _primitive_params(cls)
            if params:
                raise ArityError(
                    f"`{name}` needs {_count_words(len(params), 'argument')}: {name}({', '.join(params)})", ctx.loc(node)
                )
            return cls(loc=ctx.loc(node))
        if name in ctx.scope:
            return self.expand(ctx.scope[name], {}, ctx, node)
        raise _misplaced(node, ctx, "a pattern")

    def pattern_call(self, node: ast.Call, ctx: _Ctx) -> ir.Pattern:
        name = node.name
        if name in ir.PRIMITIVES:
            cls = ir.PRIMITIVES[name]
            params = _primitive_params(cls)
            given = _match_arguments(name, params, node, ctx)
            missing = [p for p in params if p not in given]
            if missing:
                raise ArityError(
                    f"`{name}` needs {_count_words(len(params), 'argument')}: {name}({', '.join(params)}); "
                    f"`{missing[0]}` is missing",
                    ctx.loc(node),
                )
            values = {p: self.argument(given[p], ctx) for p in params}
            primitive = cls(**values, loc=ctx.loc(node))
            if all(isinstance(v, int) for v in values.values()):
                ir.check_args(primitive, values)
            return primitive
        if name in ctx.scope:
            definition = ctx.scope[name]
            given = _match_arguments(name, [p.name for p in definition.params], node, ctx)
            values = {p: self.argument(arg, ctx) for p, arg in given.items()}
            return self.expand(definition, values, ctx, node)
        raise _misplaced(node, ctx, "a pattern")

    def expand(self, definition: ast.Definition, values: dict[str, Value], ctx: _Ctx, call) -> ir.Pattern:
        """Inline a definition: bind its parameters, resolve its body."""
        assert definition.name not in self.expanding, "recursion is refused before resolution"
        in_stdlib = self.stdlib_scope.get(definition.name) is definition
        scope = self.stdlib_scope if in_stdlib else self.user_scope
        site = ctx.site or (ctx.loc(call) if in_stdlib and call is not None else None)
        inner = _Ctx({}, scope, ctx.depth, site).deeper(call or definition)
        self.expanding.append(definition.name)
        try:
            env: dict[str, Value] = {}
            for p in definition.params:
                if p.name in values:
                    env[p.name] = values[p.name]
                elif p.default is not None:
                    env[p.name] = self.argument(p.default, _Ctx(dict(env), scope, inner.depth, site))
                else:
                    raise ArityError(
                        f"`{definition.name}` needs a value for its parameter `{p.name}`, which has no default",
                        ctx.loc(call) if call is not None else definition.loc,
                    )
            return self.pattern(definition.body, _Ctx(env, scope, inner.depth, site))
        except PatternError as err:
            raise _called_from(err, definition, call, ctx, in_stdlib) from None
        finally:
            self.expanding.pop()

    def heads(self, node: ast.Heads, ctx: _Ctx) -> ir.Heads:
        ranges = []
        for r in node.ranges:
            loc = ctx.loc(r)
            start, stop = self.constant(r.start, ctx), self.constant(r.stop, ctx)
            if start < 0:
                raise HeadsError(f"head range {start}..{stop} starts below 0", loc)
            if start >= stop:
                raise HeadsError(f"head range {start}..{stop} is empty", loc, hint="ranges are half-open: `0..8` is heads 0 to 7")
            ranges.append(ir.HeadRange(start, stop, self.operand(r.body, ctx, "`heads`"), loc))
        ordered = sorted(ranges, key=lambda r: r.start)
        for before, after in zip(ordered, ordered[1:]):
            if after.start < before.stop:
                raise HeadsError(
                    f"head range {after.start}..{after.stop} overlaps {before.start}..{before.stop}",
                    after.loc,
                )
        return ir.Heads(tuple(ranges), ctx.loc(node))


def _combine(kind, parts: list[ir.Pattern], loc: Loc | None) -> ir.Pattern:
    """``a | b | c`` as one flat Union (what ``a | b | c`` on IR objects builds,
    in one pass rather than one tuple per operator)."""
    flat: list[ir.Pattern] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, kind) else (p,))
    return kind(tuple(flat), loc)


def _primitive_params(cls) -> list[str]:
    return [f for f in cls.__dataclass_fields__ if f != "loc"]


def _match_arguments(callee: str, params: list[str], call: ast.Call, ctx: _Ctx) -> dict:
    """Positional and keyword arguments -> {parameter: syntax tree}, Python's rules."""
    given: dict = {}
    keyword_seen = False
    signature = f"{callee}({', '.join(params)})"
    for i, arg in enumerate(call.args):
        if isinstance(arg, ast.Keyword):
            keyword_seen = True
            if arg.name not in params:
                listed = f"its parameters: {', '.join(params)}" if params else "it takes no arguments"
                raise UnknownNameError(
                    f"`{callee}` has no parameter `{arg.name}`; {listed}",
                    ctx.loc(arg),
                    hint=_did_you_mean(arg.name, params),
                )
            if arg.name in given:
                raise ArityError(f"`{callee}` got a value for `{arg.name}` twice", ctx.loc(arg))
            given[arg.name] = arg.value
        elif keyword_seen:
            raise PatternSyntaxError("a positional argument cannot follow a keyword argument", _start(arg, ctx))
        elif i >= len(params):
            takes = f"{_count_words(len(params), 'argument')} ({signature})" if params else "no arguments"
            raise ArityError(f"`{callee}` takes {takes}, got {len(call.args)}", _start(arg, ctx))
        else:
            given[params[i]] = arg
    return given
