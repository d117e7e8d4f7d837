"""Where resolution is: the parameter values and definitions in sight, the
nesting depth so far, and the user's call site inside the standard library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .. import ast, ir
from ..errors import LimitError, Loc
from ..parser import MAX_DEPTH

Value = int | ir.Expr  # a parameter's value: an int, or an integer expression over n


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


def _start(node, ctx: _Ctx) -> Loc | None:
    """Where a node's text begins, or the user's call site inside the standard library."""
    return ctx.site or ast.start_loc(node)
