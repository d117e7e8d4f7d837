"""Element masks: the direct, elementwise meaning of every node.

``evaluate`` is the executable form of the rules: each primitive's own
``mask`` (``patterncc.primitives``), ``where`` conditions and the
combinators here. The analytic layout, the reference backend and the tests
all trust it.
"""

from __future__ import annotations

import numpy as np

from . import ir
from .errors import LimitError, PatternValueError

# Dense masks are for small n; above this many elements (256 MiB) mask() refuses.
MAX_MASK_ELEMENTS = 2**28
# Elements evaluated per numpy call: evaluation's int64 temporaries stay small
# next to the bool result.
_ROWS_CHUNK = 2**22


def evaluate(p: ir.Pattern, q: np.ndarray, k: np.ndarray, n: int, *, random=None) -> np.ndarray:
    """Boolean mask of a bound, head-free pattern at int64 positions ``q``, ``k``
    (broadcast against each other). ``random(node, q, k)`` may replace the
    dense table lookup of ``random`` nodes (the layout looks cells up sparsely)."""
    q = np.asarray(q, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    shape = np.broadcast_shapes(q.shape, k.shape)
    return np.broadcast_to(_eval(p, q, k, n, random), shape)


def _eval(p: ir.Pattern, q: np.ndarray, k: np.ndarray, n: int, random=None) -> np.ndarray:
    match p:
        case ir.Primitive():
            return p.mask(q, k, n, random)
        case ir.Where(cond=cond):
            value = eval_expr(cond, {"q": q, "k": k, "n": np.int64(n)})
            return np.broadcast_to(np.asarray(value, dtype=bool), np.broadcast_shapes(q.shape, k.shape))
        case ir.Union(parts=parts):
            out = _eval(parts[0], q, k, n, random)
            for part in parts[1:]:
                out = out | _eval(part, q, k, n, random)
            return out
        case ir.Intersect(parts=parts):
            out = _eval(parts[0], q, k, n, random)
            for part in parts[1:]:
                out = out & _eval(part, q, k, n, random)
            return out
        case ir.Difference(left=a, right=b):
            return _eval(a, q, k, n, random) & ~_eval(b, q, k, n, random)
        case ir.Complement(arg=a):
            return ~_eval(a, q, k, n, random)
    raise TypeError(f"evaluate() needs a bound, head-free pattern; got {type(p).__name__}")


def eval_expr(e: ir.Expr, env: dict) -> np.ndarray:
    """Vectorized int64 evaluation of a ``where`` condition, Python semantics."""
    match e:
        case ir.Const(value=v):
            return np.int64(v)
        case ir.Var(name=name):
            if name not in env:
                raise PatternValueError(f"`{name}` has no value here", e.loc)
            return env[name]
        case ir.BinOp(op=op, left=a, right=b):
            x, y = eval_expr(a, env), eval_expr(b, env)
            if op in ("//", "%"):
                if np.any(np.asarray(y) == 0):
                    raise PatternValueError(f"division by zero in `{ir.expr_source(e)}`", e.loc)
                return np.floor_divide(x, y) if op == "//" else np.mod(x, y)
            return {"+": np.add, "-": np.subtract, "*": np.multiply}[op](x, y)
        case ir.Call(fn=fn, args=args):
            vals = [eval_expr(a, env) for a in args]
            if fn == "abs":
                return np.abs(vals[0])
            if fn == "isqrt":
                return np.int64(ir.eval_int(e, {}))  # only constants reach here
            out = vals[0]
            for v in vals[1:]:
                out = np.minimum(out, v) if fn == "min" else np.maximum(out, v)
            return out
        case ir.Compare(op=op, left=a, right=b):
            x, y = eval_expr(a, env), eval_expr(b, env)
            return {
                "<": np.less, "<=": np.less_equal, ">": np.greater,
                ">=": np.greater_equal, "==": np.equal, "!=": np.not_equal,
            }[op](x, y)
        case ir.BoolOp(op=op, args=args):
            out = eval_expr(args[0], env)
            for a in args[1:]:
                out = (out & eval_expr(a, env)) if op == "and" else (out | eval_expr(a, env))
            return out
        case ir.Not(arg=a):
            return ~np.asarray(eval_expr(a, env), dtype=bool)
    raise TypeError(f"not an expression: {e!r}")


def dense_mask(p: ir.Pattern, seq_len: int, heads: int = 1) -> np.ndarray:
    """numpy bool ``[heads, n, n]``; ``[h, q, k]`` is True when q may attend to k."""
    n = seq_len
    if heads * n * n > MAX_MASK_ELEMENTS:
        raise LimitError(
            f"a dense mask of {heads=} x {n} x {n} elements is over the limit of "
            f"{MAX_MASK_ELEMENTS}; use layout() or sparse_mask() for long sequences"
        )
    p = ir.split_terms(p)[0]  # score terms never change which pairs attend
    ir.check_heads(p, heads)
    bound = ir.bind(p, n)
    pos = np.arange(n, dtype=np.int64)
    out = np.empty((heads, n, n), dtype=bool)
    first: dict[ir.Pattern, int] = {}  # each distinct head pattern is evaluated once
    rows = max(1, _ROWS_CHUNK // n)
    for h in range(heads):
        ph = ir.for_head(bound, h)
        if ph in first:
            out[h] = out[first[ph]]
            continue
        first[ph] = h
        for q0 in range(0, n, rows):
            out[h, q0 : q0 + rows] = evaluate(ph, pos[q0 : q0 + rows, None], pos[None, :], n)
    return out
