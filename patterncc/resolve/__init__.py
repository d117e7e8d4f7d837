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

Limits: nesting after inlining is capped at ``parser.MAX_DEPTH`` and the
inlined pattern at ``MAX_NODES`` nodes (definitions that each use the next
one twice double the size at every level), both raising ``LimitError``.

The modules: ``definitions`` (the standard library, the source's own
definitions and the checks over all of them), ``patterns`` (the resolver:
patterns, score terms, heads, inlining), ``expressions`` (integer arguments
and ``where`` conditions, and the size limits), ``context`` (where
resolution is: parameter values, scope, depth) and ``messages`` (the errors
that explain what a position expected).
"""

from __future__ import annotations

from typing import Mapping

from .. import ast, ir
from ..parser import parse_source
from .definitions import stdlib
from .expressions import MAX_NODES
from .patterns import _Resolver

__all__ = ["MAX_NODES", "parse_pattern", "resolve", "stdlib"]


def parse_pattern(
    text: str,
    filename: str = "<pattern>",
    overrides: Mapping[str, int] | None = None,
    entry: str | None = None,
) -> ir.Pattern:
    """Source text -> simplified IR: ``parse_source``, ``resolve``, ``simplify``."""
    from ..simplify import simplify

    return simplify(resolve(parse_source(text, filename), overrides, entry=entry))


def resolve(
    module: ast.Module,
    overrides: Mapping[str, int] | None = None,
    *,
    entry: str | None = None,
) -> ir.Pattern:
    """The IR of the pattern a parsed source means (see the module docstring)."""
    return _Resolver(module).main(overrides or {}, entry)
