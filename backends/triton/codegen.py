"""Code generation: from a pattern to one complete Triton kernel module.

``generate_source(pattern, config)`` returns the text of a Python file with

1. the pattern's predicate, ``pattern_mask(q, k, h, N, RANDOM)``, a
   ``@triton.jit`` function over int32 positions ``q`` ``[M, 1]`` and ``k``
   ``[1, N]`` (or transposed), the runtime head index ``h``, the runtime
   length ``N`` and the int32 buffer ``RANDOM`` (the pattern's integers and
   its random tables, ``device_tables._random_buffer``); the kernels call it on
   PARTIAL steps only;
2. the attention kernels of ``kernels.py`` and ``kernels_backward.py``
   (forward, backward preprocess, dK/dV, dQ, and a mask picture for tests),
   copied verbatim;
3. ``make_mask_mod(N, random_tables)``: the same predicate as a torch
   ``mask_mod(b, h, q_idx, kv_idx)`` for FlexAttention.

Only integers taken from the IR and fixed operators reach the text: every
literal goes through ``_lit``, which asserts it is an int, and every name or
operator is checked against the IR's fixed sets first. Each primitive's
predicate is its class's ``emit`` (``patterncc.primitives``), next to its
rule; ``where`` and the combinators are emitted here.

The primitives' integers (``local(w)``'s ``w``, ``stride(l)``'s ``l``, ...)
and the constants of ``where`` expressions are literals in the text, which
the compiler folds, unless the pattern writes an argument with ``n``
(``shares_ints``; ``PATTERNCC_SHARED_INTS=1`` for every pattern). Then each
is a runtime argument ``a<i>``, read from ``RANDOM`` (Triton) or from
``make_mask_mod``'s ``args`` (torch), in the order ``pattern_args`` gives,
and patterns that differ only in them, such as ``local(isqrt(n))`` at two
lengths, or with sharing on ``strided(128)`` and ``strided(256)`` (and the
planner's components of each, whose ``where`` predicates differ in
constants), generate the same source and share one compiled module, in
memory and on disk. A ``where`` expression's int64 and
floor-division decisions still read its values, and the text shows what
they chose, so two patterns share a text only where those agree. Literals
stay where the code's shape depends on the value: ``random(r, b, seed)``
(the table and its loop), the head ranges of ``heads``/``cycle``, and
values beyond int32.
``PATTERNCC_LITERAL_INTS=1`` writes every integer as a literal, the
``n``-bound ones too (one module per length).

Integer semantics: positions are never negative, so ``//`` and ``%`` on them
agree in Triton (which truncates toward zero) and Python (which floors);
``(q - k) % l == 0`` holds for both conventions alike. Where an operand of a
``where`` expression can be negative, the generated code calls ``floor_div``
/ ``floor_mod``, which give Python's result under either convention. A
``where`` expression whose intermediate values could leave int32 (positions
and lengths up to 2**31 - 1) is computed in int64.

Arguments written with ``n`` (``local(isqrt(n))``) are bound per sequence
length before generation (``seq_len=``): the bound integers are run-time
arguments, so every length shares one module; ``where`` conditions read the
runtime ``N`` and need no rebinding.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

from patterncc import ir, primitives
from patterncc.blocklayout.intervals import bounds
from patterncc.errors import PatternValueError
from patterncc.primitives.base import INT32_MAX, lit as _lit

from .config import KernelConfig, default_config

__all__ = ["generate_source", "bitmap_source", "default_config", "needs_length", "pattern_args", "random_specs",
           "GENERATOR_VERSION", "SOURCE_HASH"]

# Part of the on-disk cache key, with SOURCE_HASH: bump it when the meaning of
# generated code changes.
GENERATOR_VERSION = 2

INT32_MIN = -(2**31)
# Ranges the variables of a `where` expression can take (for the int64 decision).
_VAR_RANGES = {"q": (0, INT32_MAX - 1), "k": (0, INT32_MAX - 1), "n": (1, INT32_MAX), "h": (0, 2**16)}

_KERNELS_MARKER = "# ---- kernels: everything below this line is copied into each generated module ----"


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def generate_source(pattern: ir.Pattern, config: KernelConfig | None = None, *, seq_len: int | None = None,
                    shared: bool | None = None) -> str:
    """The complete kernel module for ``pattern`` (bound at ``seq_len`` when
    its arguments use ``n``) and ``config`` (default: ``default_config()``).
    ``shared``: integers as run-time arguments (default ``shares_ints``; a
    caller that binds the pattern itself passes the unbound pattern's)."""
    if not isinstance(pattern, ir.Pattern):
        raise TypeError(f"pattern must be a patterncc pattern, got {type(pattern).__name__}")
    config = config or default_config()
    p = _bound(pattern, seq_len)
    _check_ir(p)
    shared = shares_ints(pattern) if shared is None else shared
    triton_pred = _Predicate(_TRITON, shared)
    result = triton_pred.emit(p)
    torch_pred = _Predicate(_TORCH, shared)
    torch_result = torch_pred.emit(p)
    assert triton_pred.random == torch_pred.random and triton_pred.args == torch_pred.args
    sections = [
        _header(p, config, triton_pred.random, triton_pred.args),
        _predicate_section(triton_pred, result),
        _kernel_section(),
        _mask_mod_section(torch_pred, torch_result),
    ]
    return "\n\n\n".join(s.strip("\n") for s in sections) + "\n"


def bitmap_source(config: KernelConfig | None = None) -> str:
    """The kernel module whose predicate reads a pattern's cells from a
    bitmap at run time (``standin.py`` builds it into ``RANDOM``): one text
    per config, so every pattern shares its compiled kernels. It stands in
    for a pattern's own module while that compiles; it has no
    ``make_mask_mod``."""
    config = config or default_config()
    return "\n\n\n".join(s.strip("\n") for s in (_bitmap_header(config), _bitmap_predicate(config.block),
                                                     _kernel_section())) + "\n"


def needs_length(pattern: ir.Pattern) -> bool:
    """True when a primitive argument is written with ``n``: the module is then
    generated per sequence length."""
    return any(
        type(node) in ir.PRIMITIVE_NAMES and any(isinstance(a, ir.Expr) for a in ir.args_of(node))
        for node in ir.walk(pattern)
    )


def pattern_args(pattern: ir.Pattern, *, seq_len: int | None = None, shared: bool | None = None) -> tuple[int, ...]:
    """The integers ``generate_source`` leaves out of the text, in the order
    of the module's ``a0, a1, ...``: what ``RANDOM`` and ``make_mask_mod``
    hand the shared module for this pattern (bound at ``seq_len`` when its
    arguments use ``n``)."""
    p = _bound(pattern, seq_len)
    _check_ir(p)
    pred = _Predicate(_TRITON, shares_ints(pattern) if shared is None else shared)
    pred.emit(p)
    return tuple(pred.args)


def shares_ints(pattern: ir.Pattern) -> bool:
    """Whether the module reads the primitives' integers at run time (see
    the module docstring): where they are written with ``n``, so that every
    length shares one module; elsewhere they are literals, which the
    compiler folds (a division by a literal is a multiply and a shift, by a
    run-time value a long sequence: partial blocks of fixed(128, 32) measured
    1.6x slower with run-time integers on the H200)."""
    if os.environ.get("PATTERNCC_LITERAL_INTS") == "1":
        return False
    return os.environ.get("PATTERNCC_SHARED_INTS") == "1" or needs_length(pattern)


def random_specs(pattern: ir.Pattern) -> list[tuple[int, int, int]]:
    """``(r, b, seed)`` of every distinct ``random`` node of a bound pattern, in
    the order of the ``RANDOM`` tables (the module's ``RANDOM_TABLES``)."""
    pred = _Predicate(_TRITON)
    pred.emit(pattern)
    return list(pred.random)


def _bound(pattern: ir.Pattern, seq_len: int | None) -> ir.Pattern:
    if not needs_length(pattern):
        return pattern
    if seq_len is None:
        raise PatternValueError(
            f"`{pattern}` has arguments that depend on n: its kernels are generated per sequence "
            "length; pass seq_len=")
    return ir.bind(pattern, seq_len)


# ----------------------------------------------------------------------------
# Literals and the IR check: nothing but ints and fixed names reach the text
# ----------------------------------------------------------------------------


def _check_ir(p: ir.Pattern) -> None:
    """Every name and operator the printer and the emitters use is from a fixed set."""
    for node in ir.walk(p):
        assert type(node) in _PATTERN_EMITTERS, f"unknown pattern node {type(node).__name__}"
        if type(node) in ir.PRIMITIVE_NAMES:
            for value in ir.args_of(node):
                _lit(value)
        if isinstance(node, ir.Heads):
            for r in node.ranges:
                _lit(r.start), _lit(r.stop)
        if isinstance(node, ir.Where):
            _check_expr(node.cond)


def _check_expr(e: ir.Expr) -> None:
    stack = [e]
    while stack:
        e = stack.pop()
        if isinstance(e, int):
            _lit(e)
        elif isinstance(e, ir.Var):
            assert e.name in ir.VARS, f"unknown variable {e.name!r}"
        elif isinstance(e, ir.Const):
            _lit(e.value)
        elif isinstance(e, ir.BinOp):
            assert e.op in ir.INT_OPS, f"unknown operator {e.op!r}"
        elif isinstance(e, ir.Compare):
            assert e.op in ir.CMP_OPS, f"unknown comparison {e.op!r}"
        elif isinstance(e, ir.BoolOp):
            assert e.op in ("and", "or"), f"unknown boolean operator {e.op!r}"
        elif isinstance(e, ir.Call):
            assert e.fn in ir.FUNCS, f"unknown function {e.fn!r}"
        else:
            assert isinstance(e, ir.Not), f"unknown expression {e!r}"
        stack.extend(ir.expr_children(e))


# ----------------------------------------------------------------------------
# Dialects: the few spellings that differ between Triton and torch
# ----------------------------------------------------------------------------


class _TritonDialect:
    name = "triton"

    def abs(self, x): return f"tl.abs({x})"
    def not_(self, x): return f"~{x}"
    def where(self, c, a, b): return f"tl.where({c}, {a}, {b})"
    def var(self, name, wide): return ("N" if name == "n" else name) + (".to(tl.int64)" if wide else "")
    def minimum(self, a, b, kinds): return f"tl.minimum({a}, {b})"
    def maximum(self, a, b, kinds): return f"tl.maximum({a}, {b})"

    def floor_op(self, op, a, b, nonneg):
        if nonneg:  # both conventions agree for a >= 0, b > 0
            return f"({a} {op} {b})"
        return f"floor_div({a}, {b})" if op == "//" else f"floor_mod({a}, {b})"

    def random(self, table, r, b): return f"random_blocks(q, k, N, RANDOM, {_lit(table)}, {_lit(r)}, {_lit(b)})"
    def scalar_condition(self, x): return x  # N and h are runtime scalars: tl ops broadcast them


class _TorchDialect:
    name = "torch"

    def abs(self, x): return f"abs({x})"
    def not_(self, x): return f"({x} == 0)"  # also right when x is a Python bool (conditions on n alone)
    def where(self, c, a, b): return f"torch.where({c}, {a}, {b})"
    def var(self, name, wide): return "N" if name == "n" else name + (".to(torch.int64)" if wide else "")

    def minimum(self, a, b, kinds):
        return self._clamp("min", a, b, kinds)

    def maximum(self, a, b, kinds):
        return self._clamp("max", a, b, kinds)

    @staticmethod
    def _clamp(fn, a, b, kinds):
        # kinds: is each operand a tensor (reads q, k or h) or a Python int (n and literals)?
        ta, tb = kinds
        if ta and tb:
            return f"torch.{fn}imum({a}, {b})"
        if ta or tb:  # min(t, s) caps t at s from above: clamp's max=, and max(t, s) its min=
            t, s = (a, b) if ta else (b, a)
            return f"torch.clamp({t}, {'max' if fn == 'min' else 'min'}={s})"
        return f"{fn}({a}, {b})"

    def floor_op(self, op, a, b, nonneg): return f"({a} {op} {b})"  # torch floors, like Python
    def random(self, table, r, b): return f"torch_random_blocks(q, k, tables[{_lit(table)}], {_lit(b)})"
    def scalar_condition(self, x): return f"({x}) & (q >= 0)"  # a condition on n alone is a Python bool


_TRITON, _TORCH = _TritonDialect(), _TorchDialect()


# ----------------------------------------------------------------------------
# The predicate: one boolean temporary per distinct node
# ----------------------------------------------------------------------------


class _Predicate:
    """Emits ``m<i> = <expr>  # <rule>`` lines, children first; equal subtrees share one line."""

    def __init__(self, dialect, shared: bool = False):
        self.d = dialect
        self.lines: list[str] = []
        self.names: dict[ir.Pattern, str] = {}
        self.random: list[tuple[int, int, int]] = []
        self.args: list[int] = []  # the value of each runtime argument a<i>
        self.shared = shared  # integers as run-time arguments a<i> (shares_ints)
        self.helpers: set[str] = set()

    def emit(self, p: ir.Pattern) -> str:
        if p not in self.names:
            expr, comment = _PATTERN_EMITTERS[type(p)](p, self)
            name = f"m{len(self.names)}"
            self.lines.append(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))
            self.names[p] = name
        return self.names[p]

    def arg(self, value: int) -> str:
        """A primitive's integer in the text: the name of a runtime argument
        (one per use), or a literal where it must be one (see the module
        docstring: beyond int32, the int32 buffer cannot hold it)."""
        _lit(value)
        if not self.shared or not INT32_MIN <= value <= INT32_MAX:
            return _lit(value)
        self.args.append(value)
        return f"a{len(self.args) - 1}"

    def random_table(self, spec: tuple[int, int, int]) -> int:
        if spec not in self.random:
            self.random.append(spec)
        return self.random.index(spec)


# -- where COND (each primitive emits itself: patterncc.primitives)


def _where(p, e):
    wide = _needs_int64(p.cond)
    text = _Cond(e, wide).boolean(p.cond)
    if not (ir.expr_vars(p.cond) & {"q", "k", "h"}):
        text = e.d.scalar_condition(text)
    # the expression was checked by _check_ir: fixed names and operators, int literals
    # (not quoted in the comment: its integers are arguments, the text every such pattern's)
    return text, "where" + (" (in int64: values may leave int32)" if wide else "")


# -- combinators


def _union(p, e):
    return " | ".join(e.emit(c) for c in p.parts), None


def _intersect(p, e):
    return " & ".join(e.emit(c) for c in p.parts), None


def _difference(p, e):
    return f"{e.emit(p.left)} & {e.d.not_(e.emit(p.right))}", None


def _complement(p, e):
    return e.d.not_(e.emit(p.arg)), None


def _heads(p, e):
    ranges = sorted(p.ranges, key=lambda r: r.start)
    parts = [(r, e.emit(r.pattern)) for r in ranges]
    expr = parts[-1][1]
    for r, name in reversed(parts[:-1]):
        expr = e.d.where(f"h < {_lit(r.stop)}", name, expr)
    spans = ", ".join(f"{_lit(r.start)}..{_lit(r.stop)} => {name}" for r, name in parts)
    return expr, f"heads {{ {spans} }}"


def _cycle(p, e):
    names = [e.emit(c) for c in p.parts]
    count = _lit(len(names))
    expr = names[-1]
    for i in reversed(range(len(names) - 1)):
        expr = e.d.where(f"h % {count} == {_lit(i)}", names[i], expr)
    return expr, f"cycle: head h uses argument h % {count}"


_PATTERN_EMITTERS = {cls: cls.emit for cls in ir.PRIMITIVES.values()} | {
    ir.Where: _where,
    ir.Union: _union, ir.Intersect: _intersect, ir.Difference: _difference, ir.Complement: _complement,
    ir.Heads: _heads, ir.Cycle: _cycle,
}


# ----------------------------------------------------------------------------
# `where` expressions
# ----------------------------------------------------------------------------


class _Cond:
    """Text of one ``where`` condition; ``wide`` computes it in int64."""

    def __init__(self, pred: _Predicate, wide: bool):
        self.pred, self.d, self.wide = pred, pred.d, wide

    def boolean(self, e: ir.Expr) -> str:
        if not ir.expr_vars(e):
            return "(q >= 0) & (k >= 0)" if _eval_bool(e) else "(q < 0) & (k < 0)"
        if isinstance(e, ir.Compare):
            return f"({self.integer(e.left)} {e.op} {self.integer(e.right)})"
        if isinstance(e, ir.BoolOp):
            joiner = " & " if e.op == "and" else " | "
            return "(" + joiner.join(self.boolean(a) for a in e.args) + ")"
        if isinstance(e, ir.Not):
            return self.d.not_(self.boolean(e.arg))
        return f"({self.integer(e)} != 0)"  # an integer used as a condition

    def integer(self, e: ir.Expr) -> str:
        if not ir.expr_vars(e):  # constant: fold it (this also checks isqrt and division by zero)
            return self.pred.arg(ir.eval_int(e, {}))
        if isinstance(e, ir.Var):
            return self.d.var(e.name, self.wide)
        if isinstance(e, ir.BinOp):
            a, b = self.integer(e.left), self.integer(e.right)
            if e.op in ("//", "%"):
                nonneg = _nonneg_division(e)
                if not nonneg and self.d is _TRITON:
                    self.pred.helpers.add("floor_mod")  # floor_div uses it too
                    if e.op == "//":
                        self.pred.helpers.add("floor_div")
                return self.d.floor_op(e.op, a, b, nonneg)
            return f"({a} {e.op} {b})"
        if isinstance(e, ir.Call):
            if e.fn == "abs":
                return self.d.abs(self.integer(e.args[0]))
            if e.fn == "isqrt":
                raise PatternValueError(
                    "isqrt over q, k, h or n inside `where` is not supported by the Triton backend",
                    e.loc, hint="write the bound as a literal or as a primitive argument")
            out, out_tensor = self.integer(e.args[0]), _is_tensor(e.args[0])
            for arg in e.args[1:]:
                kinds = (out_tensor, _is_tensor(arg))
                op = self.d.minimum if e.fn == "min" else self.d.maximum
                out, out_tensor = op(out, self.integer(arg), kinds), out_tensor or kinds[1]
            return out
        raise AssertionError(f"not an integer expression: {e!r}")


def _nonneg_division(e: ir.BinOp) -> bool:
    """a // b or a % b with a >= 0 and b > 0: truncation and floor agree."""
    return _interval(e.left)[0] >= 0 and _interval(e.right)[0] > 0


def _is_tensor(e: ir.Expr) -> bool:
    return bool(ir.expr_vars(e) & {"q", "k", "h"})


def _eval_bool(e: ir.Expr) -> bool:
    """A condition without variables, evaluated with Python ints."""
    if isinstance(e, ir.Compare):
        a, b = ir.eval_int(e.left, {}), ir.eval_int(e.right, {})
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[e.op]
    if isinstance(e, ir.BoolOp):
        values = [_eval_bool(a) for a in e.args]
        return all(values) if e.op == "and" else any(values)
    if isinstance(e, ir.Not):
        return not _eval_bool(e.arg)
    return ir.eval_int(e, {}) != 0


def _interval(e: ir.Expr) -> tuple[float, float]:
    """Bounds of an integer expression over the ranges of q, k, h and n: the
    layout's interval arithmetic (``blocklayout.intervals``), unbounded where
    that knows no bound (a value past 2**62 - 1, a divisor whose range holds 0)."""
    got = bounds(e, _VAR_RANGES)
    return (-math.inf, math.inf) if got is None else got


def _needs_int64(cond: ir.Expr) -> bool:
    """True when some intermediate value of the condition may leave int32,
    including the ``a - floor_mod(a, b)`` step of ``floor_div``."""
    stack = [cond]
    while stack:
        e = stack.pop()
        stack.extend(ir.expr_children(e))
        if isinstance(e, (ir.Compare, ir.BoolOp, ir.Not)):
            continue
        lo, hi = _interval(e)
        if lo < INT32_MIN or hi > INT32_MAX:
            return True
        if isinstance(e, ir.BinOp) and e.op == "//" and not _nonneg_division(e):
            (a0, a1), (b0, b1) = _interval(e.left), _interval(e.right)
            # floor_mod(a, b) has the sign of b and |floor_mod(a, b)| < |b|
            r_lo = min(b0 + 1, 0)
            r_hi = max(b1 - 1, 0)
            if a0 - r_hi < INT32_MIN or a1 - r_lo > INT32_MAX:
                return True
    return False


# ----------------------------------------------------------------------------
# The module text
# ----------------------------------------------------------------------------


def _header(p: ir.Pattern, config: KernelConfig, random: list, args: list) -> str:
    tables = ", ".join(f"({_lit(r)}, {_lit(b)}, {_lit(s)})" for r, b, s in random)
    # The pattern's source names its integers: with runtime arguments, this text is every such pattern's.
    pattern = (ir.source(p) if not args else
               f"every pattern of this predicate; its integers a0..a{_lit(len(args) - 1)} come at run time")
    return f'''\
# Generated by patterncc (backends/triton/codegen.py, generator version {_lit(GENERATOR_VERSION)}).
# Do not edit: the kernel cache rebuilds this file from the pattern.
#
#   pattern: {pattern}
#   config:  {config.describe()}
#
# 1. the pattern's predicate (Triton), applied on PARTIAL steps only
# 2. the attention kernels: forward, backward preprocess, dK/dV, dQ, mask picture
# 3. the same predicate as a torch mask_mod, for FlexAttention

import os

import torch
import triton
import triton.language as tl

HEAD_DEPENDENT = {ir.depends_on_head(p)}  # the predicate reads the head index h
# No allowed pair has its key after its query (ir.within_causal): ALiBi's |q - k| is q - k
PAST_ONLY = tl.constexpr({ir.within_causal(p)})
RANDOM_TABLES = ({tables}{"," if len(random) == 1 else ""})  # (r, b, seed) of each random(...), in RANDOM order
'''


def _bitmap_header(config: KernelConfig) -> str:
    return f'''\
# Generated by patterncc (backends/triton/codegen.py, generator version {_lit(GENERATOR_VERSION)}).
# Do not edit: the kernel cache rebuilds this file.
#
#   pattern: any, its cells read from a bitmap at run time (standin.py)
#   config:  {config.describe()}
#
# 1. the bitmap predicate, applied on PARTIAL steps only
# 2. the attention kernels: forward, backward preprocess, dK/dV, dQ, mask picture

import os

import torch
import triton
import triton.language as tl

HEAD_DEPENDENT = None  # the bitmap says, per launch: its head stride is 0 for a pattern that ignores h
PAST_ONLY = tl.constexpr(False)  # not known here: ALiBi takes |q - k| as it is
RANDOM_TABLES = ()
'''


def _bitmap_predicate(block: int) -> str:
    words = _lit(block * block // 32)
    return f'''
# ----------------------------------------------------------------------------
# The predicate: a bitmap of the pattern's cells, in blocks of {_lit(block)} tokens
# ----------------------------------------------------------------------------


@triton.jit
def pattern_mask(q, k, h, N, RANDOM):
    """q [M, 1] and k [1, K] int32 positions (or [1, M] and [K, 1]), h the head index, N the length."""
    # RANDOM (int32): 0, the blocks per side nb, the head stride of the codes (0 or nb * nb), the
    # offset of the words, then the codes [heads, nb, nb]: -1 EMPTY, -2 FULL, p >= 0 the PARTIAL
    # block whose bits are words p * {words} ..., row-major over its (q % B, k % B), bit t % 32 of word t // 32
    nb = tl.load(RANDOM + 1)
    codes = RANDOM + 4 + h * tl.load(RANDOM + 2)
    # rows and keys past N (masked by the kernels) read the last block, never out of bounds
    code = tl.load(codes + tl.minimum(q // {_lit(block)}, nb - 1) * nb + tl.minimum(k // {_lit(block)}, nb - 1))
    t = (q % {_lit(block)}) * {_lit(block)} + k % {_lit(block)}
    word = tl.load(RANDOM + tl.load(RANDOM + 3) + tl.maximum(code, 0) * {words} + t // 32)
    return (code == -2) | ((code >= 0) & (((word >> (t % 32)) & 1) != 0))
'''


_FLOOR_MOD = '''

@triton.jit
def floor_mod(a, b):
    """Python's a % b (the sign of b), whichever way the native % rounds."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
'''

_FLOOR_DIV = '''

@triton.jit
def floor_div(a, b):
    """Python's a // b: once the floored remainder is gone the division is exact."""
    return (a - floor_mod(a, b)) // b
'''

_RANDOM_HELPER = '''

@triton.jit
def random_blocks(q, k, N, RANDOM, TABLE: tl.constexpr, R: tl.constexpr, B: tl.constexpr):
    """random(R, B, seed): is key block k // B one of the min(R, nb) blocks that
    randomblocks.draw picked for query block q // B? RANDOM[TABLE] is the offset
    of this node's int32 table [nb, min(R, nb)] inside RANDOM."""
    nb = (N + B - 1) // B
    count = tl.minimum(nb, R)
    table = RANDOM + tl.load(RANDOM + TABLE)
    q_block = tl.minimum(q // B, nb - 1)  # rows past N read the last row, never out of bounds
    k_block = k // B
    hit = (q < 0) & (k < 0)  # all false, in the shape of the tile
    for t in range(0, count):
        hit = hit | (tl.load(table + q_block * count + t) == k_block)
    return hit
'''


def _predicate_section(pred: _Predicate, result: str) -> str:
    # The arguments follow the random tables' offsets in RANDOM (one dummy entry if none).
    base = max(len(pred.random), 1)
    loads = [f"a{i} = tl.load(RANDOM + {_lit(base + i)})" for i in range(len(pred.args))]
    helpers = ""
    if "floor_mod" in pred.helpers:
        helpers += _FLOOR_MOD
    if "floor_div" in pred.helpers:
        helpers += _FLOOR_DIV
    if "random_blocks" in pred.helpers:
        helpers += _RANDOM_HELPER
    body = "\n".join("    " + line for line in loads + pred.lines)
    return f'''
# ----------------------------------------------------------------------------
# The pattern's predicate: True where query q may attend to key k in head h
# ----------------------------------------------------------------------------
{helpers}

@triton.jit
def pattern_mask(q, k, h, N, RANDOM):
    """q [M, 1] and k [1, K] int32 positions (or [1, M] and [K, 1]), h the head index, N the length."""
    # RANDOM (int32): the random tables' offsets, the pattern's integers a0, a1, ..., the tables
{body}
    return {result}
'''


def _kernel_section() -> str:
    """The kernel templates' bodies, forward then backward, as one section."""
    bodies = []
    for name, text in _KERNEL_TEMPLATES.items():
        head, marker, body = text.partition(_KERNELS_MARKER)
        assert marker, f"{name} lost its marker line"
        bodies.append(body.strip("\n"))
    return "\n\n\n".join(bodies) + "\n"


# The kernels' template, in two files (forward with the shared helpers; backward).
_KERNEL_TEMPLATES = {name: (Path(__file__).parent / name).read_text() for name in ("kernels.py", "kernels_backward.py")}
_KERNELS_TEXT = "".join(_KERNEL_TEMPLATES.values())
# The primitives' emitters are part of the generator.
_PRIMITIVES_TEXT = "".join(p.read_text() for p in sorted(Path(primitives.__file__).parent.glob("*.py")))
# The interval arithmetic that decides int32 or int64 is part of it too.
_INTERVALS_TEXT = Path(sys.modules[bounds.__module__].__file__).read_text()
# The generator's own text: any edit to it, to the primitives, to the interval
# arithmetic or to the kernel template makes new cache keys.
SOURCE_HASH = hashlib.sha256(
    (Path(__file__).read_text() + _PRIMITIVES_TEXT + _INTERVALS_TEXT + _KERNELS_TEXT).encode()).hexdigest()


_TORCH_RANDOM_HELPER = '''

def torch_random_blocks(q, k, member, B):
    """random(r, B, seed) through member, a bool table [nb, nb] of drawn blocks."""
    last = member.shape[0] - 1
    return member[torch.clamp(q // B, max=last), torch.clamp(k // B, max=last)]
'''


def _mask_mod_section(pred: _Predicate, result: str) -> str:
    unpack = [f"{', '.join(f'a{i}' for i in range(len(pred.args)))}, = args"] if pred.args else []
    body = "\n".join("        " + line for line in unpack + pred.lines)
    helper = _TORCH_RANDOM_HELPER if pred.random else ""
    return f'''
# ----------------------------------------------------------------------------
# The same predicate as a FlexAttention mask_mod
# ----------------------------------------------------------------------------
{helper}

def make_mask_mod(N, random_tables=(), args=()):
    """mask_mod(b, h, q_idx, kv_idx) at sequence length N. random_tables: one
    bool [nb, nb] membership table per entry of RANDOM_TABLES (flex.py builds them);
    args: the pattern's integers a0, a1, ... (codegen.pattern_args)."""
    tables = tuple(random_tables)

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_idx, kv_idx
{body}
        return {result}

    return mask_mod
'''
