"""Integer expressions (arguments, defaults, head ranges) and ``where``
conditions: what each position may use, divisors, ``isqrt``, magnitudes, and
the budget of nodes and nesting that inlining may not exceed."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ast, ir
from ..errors import ArityError, LimitError, Loc, PatternValueError
from .context import Value, _Ctx, _start
from .messages import _count_words, _expected, _misplaced

# Nodes in the pattern once definitions are inlined (expressions included).
MAX_NODES = 50_000

_POSITIONS = frozenset({"q", "k", "h"})
_WHERE_VARS = frozenset(ir.VARS)
_ARGUMENT_VARS = frozenset({"n"})


# The element masks evaluate `where` conditions with numpy over all positions
# at once, and isqrt has no exact vectorized form there: it stays in arguments.
_WHERE_ISQRT = "a `where` condition cannot take `isqrt` of something that depends on `n`"
_WHERE_ISQRT_HINT = "use isqrt(n) in arguments, e.g. `local(isqrt(n))`, or compare squares: `(q - k) * (q - k) < n`"


@dataclass(frozen=True)
class _Info:
    """What resolution needs to know about an integer expression."""

    vars: frozenset[str]
    depth: int
    size: int  # as a tree; parameters used twice make DAGs, counted twice
    isqrt_of_n: bool  # has an isqrt of something that is not constant


class _ExprResolver:
    """Resolves integer expressions and conditions, which never contain a
    pattern; ``patterns._Resolver`` adds patterns and definitions on top.
    Holds what both share: the node budget (``count``) and the memo of
    expression facts (``info``)."""

    def __init__(self):
        self.size = 0
        self._infos: dict[int, tuple[ir.Expr, _Info]] = {}

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
            raise _misplaced(node, ctx, "an integer", allowed)
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
        raise _misplaced(node, ctx, "an integer", allowed)

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
            raise _misplaced(node, ctx, "a condition", _WHERE_VARS)
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


def _check_magnitude(value: int, name: str | None, loc: Loc | None) -> None:
    if abs(value) > ir.MAX_VALUE:
        what = f"{name}={value}" if name else f"the value {value}"
        raise LimitError(f"{what} is beyond the limit of {ir.MAX_VALUE} (int32)", loc)
