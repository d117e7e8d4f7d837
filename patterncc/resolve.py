"""Syntax tree -> IR: names, calls, types and values.

``resolve(module, overrides, entry=...)`` gives the pattern a source means:

- with ``entry``, the definition of that name (the source's own, else the
  standard library's), called with its defaults;
- else the source's final expression, if it ends with one;
- else its last definition, called with its defaults.

``overrides`` replace defaults of the chosen definition's parameters.

Definitions are inlined: a call resolves the callee's body with its
parameters bound to the argument values. Integer arguments that do not
depend on ``n`` are evaluated to ``int`` (and range-checked with
``ir.check_args`` when they reach a primitive); those that use ``n`` stay
``ir.Expr`` for ``ir.bind``. ``where`` conditions keep the expression exactly
as written (parameters replaced by their values), so ``str(p)`` parses back
to an equal pattern.

Names. A name in a pattern position is a primitive, a definition of the
source or of the standard library (``grammar/stdlib.pat``). A source may
define a pattern with a standard library name: the source's definition
replaces the library's everywhere in that source (``examples/strided.pat``
defines its own ``strided``). Primitives, the functions ``abs min max
isqrt``, the variables ``q k h n`` and keywords cannot be redefined. A
definition may call definitions written after it; recursion, direct or
through others, is an error.

Types. The grammar has one kind of expression; here each position expects a
pattern, an integer or a condition, and anything else is a located error.
Integer expressions in arguments, defaults and head ranges may use ``n`` and
parameters; ``where`` conditions may also use ``q``, ``k`` and ``h``. The
divisor of ``//`` and ``%`` must not depend on ``q``, ``k`` or ``h``, and must
be positive when it is constant.

Score terms. ``A with softcap(c), alibi`` gives ``ir.Scored``. Terms apply
to the whole attention, so a pattern that carries them (written with
``with``, or a definition whose body has ``with``) cannot be an operand of
``| & - ~`` nor a part of ``heads``/``cycle``; ``with`` on a pattern that
already has terms adds to them (each term at most once). ``softcap``'s
argument is a decimal number or an integer expression of parameters (not
``n``), and must be > 0.

Limits: nesting after inlining is capped at ``parse.MAX_DEPTH`` and the
inlined pattern at ``MAX_NODES`` nodes (definitions that each use the next
one twice double the size at every level), both raising ``LimitError``.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

from . import ast, ir
from .errors import (
    ArityError,
    HeadsError,
    LimitError,
    Loc,
    PatternError,
    PatternSyntaxError,
    PatternValueError,
    RecursiveDefinitionError,
    UnknownNameError,
)
from .parser import MAX_DEPTH, parse_source

# Nodes in the pattern once definitions are inlined (expressions included).
MAX_NODES = 50_000

_POSITIONS = frozenset({"q", "k", "h"})
_WHERE_VARS = frozenset(ir.VARS)
_ARGUMENT_VARS = frozenset({"n"})
_RESERVED = set(ir.PRIMITIVES) | set(ir.FUNCS) | set(ir.VARS)

Value = int | ir.Expr  # a parameter's value: an int, or an integer expression over n

# The element masks evaluate `where` conditions with numpy over all positions
# at once, and isqrt has no exact vectorized form there: it stays in arguments.
_WHERE_ISQRT = "a `where` condition cannot take `isqrt` of something that depends on `n`"
_WHERE_ISQRT_HINT = "use isqrt(n) in arguments, e.g. `local(isqrt(n))`, or compare squares: `(q - k) * (q - k) < n`"


def parse_pattern(
    text: str,
    filename: str = "<pattern>",
    overrides: Mapping[str, int] | None = None,
    entry: str | None = None,
) -> ir.Pattern:
    """Source text -> simplified IR: ``parse_source``, ``resolve``, ``simplify``."""
    from .simplify import simplify

    return simplify(resolve(parse_source(text, filename), overrides, entry=entry))


def resolve(
    module: ast.Module,
    overrides: Mapping[str, int] | None = None,
    *,
    entry: str | None = None,
) -> ir.Pattern:
    """The IR of the pattern a parsed source means (see the module docstring)."""
    return _Resolver(module).main(overrides or {}, entry)


@functools.lru_cache(maxsize=1)
def stdlib() -> dict[str, ast.Definition]:
    """The standard library's definitions, by name (parsed once)."""
    text = resources.files("patterncc.grammar").joinpath("stdlib.pat").read_text(encoding="utf-8")
    module = parse_source(text, "<stdlib>")
    definitions = {d.name: d for d in module.definitions}
    _check_definitions(definitions, visible=definitions)
    return definitions


# ----------------------------------------------------------------------------
# Static checks over every definition, used or not
# ----------------------------------------------------------------------------


def _user_definitions(module: ast.Module) -> dict[str, ast.Definition]:
    definitions: dict[str, ast.Definition] = {}
    for d in module.definitions:
        if d.name in _RESERVED:
            raise PatternSyntaxError(f"`{d.name}` is {_reserved_what(d.name)} and cannot be redefined", d.loc)
        if d.name in definitions:
            first = definitions[d.name].loc
            raise PatternSyntaxError(
                f"`{d.name}` is defined twice (first on line {first.line})" if first else f"`{d.name}` is defined twice",
                d.loc,
            )
        seen = set()
        for p in d.params:
            if p.name in _RESERVED:
                raise PatternSyntaxError(f"`{p.name}` is {_reserved_what(p.name)} and cannot be a parameter name", p.loc)
            if p.name in seen:
                raise PatternSyntaxError(f"parameter `{p.name}` appears twice in `{d.name}`", p.loc)
            seen.add(p.name)
        definitions[d.name] = d
    return definitions


def _reserved_what(name: str) -> str:
    if name in ir.PRIMITIVES:
        return "a primitive pattern"
    if name in ir.FUNCS:
        return "a built-in function"
    return {"q": "the query position", "k": "the key position", "h": "the head index", "n": "the sequence length"}[name]


def _check_definitions(
    definitions: dict[str, ast.Definition], visible: dict[str, ast.Definition], library=frozenset()
) -> None:
    """Unknown names, defaults that use later parameters, and recursion.
    ``library``: the standard library's names, for a hint when one is shadowed."""
    calls: dict[str, list[ast.Name | ast.Call]] = {}
    for d in definitions.values():
        params = [p.name for p in d.params]
        calls[d.name] = []
        for i, p in enumerate(d.params):
            if p.default is not None:
                for ref in _references(p.default):
                    if ref.name in params[i:]:
                        raise UnknownNameError(
                            f"the default of `{p.name}` uses `{ref.name}`, which is not set yet",
                            ref.loc,
                            hint="a default may use `n` and the parameters before it",
                        )
                    _check_known(ref, params, visible)
        for ref in _references(d.body):
            _check_known(ref, params, visible)
            if ref.name not in params and ref.name in definitions:
                calls[d.name].append(ref)
    _check_recursion(definitions, calls, library)


def _references(node) -> list[ast.Name | ast.Call]:
    """Every name used in a subtree (iteratively: trees may be deep)."""
    refs, stack = [], [node]
    while stack:
        current = stack.pop()
        if isinstance(current, (ast.Name, ast.Call)):
            refs.append(current)
        stack.extend(ast.children(current))
    return refs


def _check_known(ref: ast.Name | ast.Call, params: list[str], visible: dict) -> None:
    known = set(params) | _RESERVED | set(visible)
    if ref.name not in known:
        raise UnknownNameError(f"unknown name `{ref.name}`", ref.loc, hint=_did_you_mean(ref.name, known))


def _check_recursion(definitions: dict[str, ast.Definition], calls: dict[str, list], library) -> None:
    # Depth-first search with an explicit stack; a call back into the current
    # path is a cycle.
    done: set[str] = set()
    for root in definitions:
        if root in done:
            continue
        path, on_path = [root], {root}
        iterators = [iter(calls[root])]
        while iterators:
            ref = next(iterators[-1], None)
            if ref is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                iterators.pop()
                continue
            if ref.name in on_path:
                cycle = path[path.index(ref.name):] + [ref.name]
                if len(cycle) > 8:
                    cycle = cycle[:4] + [f"... ({len(cycle) - 7} more)"] + cycle[-3:]
                hint = None
                if ref.name in library:
                    hint = (
                        f"this source's `{ref.name}` replaces the standard library's, "
                        f"so `{ref.name}` inside it calls itself; give yours another name"
                    )
                raise RecursiveDefinitionError(
                    f"`{ref.name}` is recursive: {' -> '.join(cycle)}", ref.loc, hint=hint
                )
            if ref.name not in done:
                path.append(ref.name)
                on_path.add(ref.name)
                iterators.append(iter(calls[ref.name]))


def _did_you_mean(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"


# ----------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    env: Mapping[str, Value]  # parameter values
    scope: Mapping[str, ast.Definition]  # definitions in sight; the standard library sees only itself
    depth: int  # nesting so far: tree levels plus inlined calls
    site: Loc | None = None  # inside the standard library: the user's call

    def loc(self, node) -> Loc | None:
        return self.site or node.loc

    def deeper(self, node, extra: int = 1) -> "_Ctx":
        depth = self.depth + extra
        if depth > MAX_DEPTH:
            raise LimitError(
                f"nesting too deep: more than {MAX_DEPTH} levels once definitions are inlined",
                self.loc(node),
            )
        return _Ctx(self.env, self.scope, depth, self.site)


@dataclass(frozen=True)
class _Info:
    """What resolution needs to know about an integer expression."""

    vars: frozenset[str]
    depth: int
    size: int  # as a tree; parameters used twice make DAGs, counted twice
    isqrt_of_n: bool  # has an isqrt of something that is not constant


class _Resolver:
    def __init__(self, module: ast.Module):
        self.module = module
        library = stdlib()
        self.user = _user_definitions(module)
        _check_definitions(self.user, visible={**library, **self.user}, library=frozenset(library))
        self.stdlib_scope = library
        self.user_scope = {**library, **self.user}
        self.size = 0
        self.expanding: list[str] = []  # definitions being inlined, outermost first
        self._infos: dict[int, tuple[ir.Expr, _Info]] = {}

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
        raise self.misplaced(node, ctx, "a pattern")

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
        raise self.misplaced(node, ctx, "a pattern")

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

    # -- integers

    def argument(self, node, ctx: _Ctx) -> Value:
        """An argument or default: an int when constant, else an Expr over n."""
        expr = self.integer(node, ctx, _ARGUMENT_VARS)
        if self.info(expr).vars:
            return expr
        value = ir.eval_int(expr, {}, _start(node, ctx))
        _check_magnitude(value, None, _start(node, ctx))
        return value

    def constant(self, node, ctx: _Ctx) -> int:
        """A head range bound: an integer that does not depend on anything."""
        expr = self.integer(node, ctx, frozenset())
        value = ir.eval_int(expr, {}, _start(node, ctx))
        _check_magnitude(value, None, _start(node, ctx))
        return value

    def integer(self, node, ctx: _Ctx, allowed: frozenset[str]) -> ir.Expr:
        ctx = ctx.deeper(node)
        self.count(1, ctx.loc(node))
        loc = ctx.loc(node)
        if isinstance(node, ast.Num):
            return ir.Const(node.value, loc)
        if isinstance(node, ast.Name):
            return self.integer_name(node, ctx, allowed)
        if isinstance(node, ast.Unary) and node.op == "-":
            if isinstance(node.operand, ast.Num):
                return ir.Const(-node.operand.value, loc)
            return ir.BinOp("-", ir.Const(0, loc), self.integer(node.operand, ctx, allowed), loc)
        if isinstance(node, ast.Binary):
            left, right = self.integer(node.left, ctx, allowed), self.integer(node.right, ctx, allowed)
            if node.op in ("//", "%"):
                self.check_divisor(node, right, ctx)
            return ir.BinOp(node.op, left, right, loc)
        if isinstance(node, ast.Call):
            if node.name in ir.FUNCS:
                return self.function(node, ctx, allowed)
            raise self.misplaced(node, ctx, "an integer", allowed)
        raise _expected("an integer", node, ctx)

    def integer_name(self, node: ast.Name, ctx: _Ctx, allowed: frozenset[str]) -> ir.Expr:
        name, loc = node.name, ctx.loc(node)
        if name in ctx.env:
            value = ctx.env[name]
            if isinstance(value, int):
                return ir.Const(value, loc)
            info = self.info(value)
            if info.isqrt_of_n and "q" in allowed:
                shown = f"`{ir.expr_source(value)}`" if info.size <= 40 else "an expression with isqrt"
                raise PatternValueError(f"`{name}` is {shown}: {_WHERE_ISQRT}", loc, hint=_WHERE_ISQRT_HINT)
            self.count(info.size, loc)
            ctx.deeper(node, info.depth)
            return value
        if name in ir.VARS:
            if name in allowed:
                return ir.Var(name, loc)
            if allowed:
                raise PatternValueError(
                    f"`{name}` cannot be used here: arguments and defaults may use only `n`, parameters and numbers",
                    loc,
                    hint="`q`, `k` and `h` belong in `where` conditions",
                )
            raise PatternValueError(f"`{name}` cannot be used here: head ranges must be constant", loc)
        raise self.misplaced(node, ctx, "an integer", allowed)

    def function(self, node: ast.Call, ctx: _Ctx, allowed: frozenset[str]) -> ir.Expr:
        low, high = ir.FUNCS[node.name]
        loc = ctx.loc(node)
        for a in node.args:
            if isinstance(a, ast.Keyword):
                raise ArityError(f"`{node.name}` takes no keyword arguments", ctx.loc(a))
        if len(node.args) < low or (high is not None and len(node.args) > high):
            wanted = f"exactly {_count_words(low, 'argument')}" if low == high else f"at least {_count_words(low, 'argument')}"
            raise ArityError(f"`{node.name}` takes {wanted}, got {len(node.args)}", loc)
        call = ir.Call(node.name, tuple(self.integer(a, ctx, allowed) for a in node.args), loc)
        if node.name == "isqrt":
            variables = self.info(call).vars
            if variables & _POSITIONS:
                raise PatternValueError("`isqrt` works only on values that do not depend on q, k or h", loc)
            if variables and "q" in allowed:
                raise PatternValueError(_WHERE_ISQRT, loc, hint=_WHERE_ISQRT_HINT)
            if not variables:
                ir.eval_int(call, {}, loc)  # a negative argument is an error now, not later
        return call

    def check_divisor(self, node: ast.Binary, divisor: ir.Expr, ctx: _Ctx) -> None:
        loc = _start(node.right, ctx)
        variables = self.info(divisor).vars
        if variables & _POSITIONS:
            raise PatternValueError(
                f"the divisor of `{node.op}` must not depend on q, k or h",
                loc,
                hint="a divisor may use `n`, parameters and numbers",
            )
        if not variables:
            value = ir.eval_int(divisor, {}, loc)
            if value <= 0:
                raise PatternValueError(f"the divisor of `{node.op}` must be positive, got {value}", loc)

    # -- conditions

    def condition(self, node, ctx: _Ctx) -> ir.Expr:
        ctx = ctx.deeper(node)
        self.count(1, ctx.loc(node))
        loc = ctx.loc(node)
        if isinstance(node, ast.Chain) and node.op in ("and", "or"):
            args = []
            for operand in node.operands:
                cond = self.condition(operand, ctx)
                chained = node.op == "and" and isinstance(operand, ast.Compare) and len(operand.ops) > 1
                args.extend(cond.args if chained else (cond,))
            return ir.BoolOp(node.op, tuple(args), loc)
        if isinstance(node, ast.Unary) and node.op == "not":
            return ir.Not(self.condition(node.operand, ctx), loc)
        if isinstance(node, ast.Compare):
            terms = [self.integer(o, ctx, _WHERE_VARS) for o in node.operands]
            pairs = tuple(ir.Compare(op, a, b, loc) for op, a, b in zip(node.ops, terms, terms[1:]))
            return pairs[0] if len(pairs) == 1 else ir.BoolOp("and", pairs, loc)
        if isinstance(node, (ast.Name, ast.Call)):
            raise self.misplaced(node, ctx, "a condition", _WHERE_VARS)
        raise _expected("a condition", node, ctx)

    # -- bookkeeping

    def count(self, nodes: int, loc: Loc | None) -> None:
        self.size += nodes
        if self.size > MAX_NODES:
            raise LimitError(
                f"the pattern is too large: over {MAX_NODES} nodes once definitions are inlined",
                loc,
                hint="a definition that uses another one twice doubles the size at every level",
            )

    def info(self, expr: ir.Expr) -> _Info:
        """Variables, depth and tree size of an expression, memoized per node
        so that parameters used many times cost nothing to inspect again."""
        infos = self._infos
        stack = [expr]
        while stack:
            top = stack[-1]
            if id(top) in infos:
                stack.pop()
                continue
            kids = ir.expr_children(top)
            missing = [c for c in kids if id(c) not in infos]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            parts = [infos[id(c)][1] for c in kids]
            variables = frozenset({top.name}) if isinstance(top, ir.Var) else frozenset().union(*(p.vars for p in parts))
            depth = 1 + max((p.depth for p in parts), default=0)
            size = 1 + sum(p.size for p in parts)
            isqrt_of_n = any(p.isqrt_of_n for p in parts) or (
                isinstance(top, ir.Call) and top.fn == "isqrt" and bool(variables)
            )
            infos[id(top)] = (top, _Info(variables, depth, size, isqrt_of_n))
        return infos[id(expr)][1]

    def misplaced(
        self, node: ast.Name | ast.Call, ctx: _Ctx, wanted: str, allowed: frozenset[str] = frozenset()
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


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _combine(kind, parts: list[ir.Pattern], loc: Loc | None) -> ir.Pattern:
    """``a | b | c`` as one flat Union (what ``a | b | c`` on IR objects builds,
    in one pass rather than one tuple per operator)."""
    flat: list[ir.Pattern] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, kind) else (p,))
    return kind(tuple(flat), loc)


def _primitive_params(cls) -> list[str]:
    return [f for f in cls.__dataclass_fields__ if f != "loc"]


def _count_words(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


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


def _start(node, ctx: _Ctx) -> Loc | None:
    """Where a node's text begins, or the user's call site inside the standard library."""
    return ctx.site or ast.start_loc(node)


def _check_magnitude(value: int, name: str | None, loc: Loc | None) -> None:
    if abs(value) > ir.MAX_VALUE:
        what = f"{name}={value}" if name else f"the value {value}"
        raise LimitError(f"{what} is beyond the limit of {ir.MAX_VALUE} (int32)", loc)


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
