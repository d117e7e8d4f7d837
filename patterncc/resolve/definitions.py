"""The definitions a source sees, checked before anything is resolved: the
standard library (``grammar/stdlib.pat``) and the source's own, every one of
them, used or not, for reserved and duplicate names, unknown names, defaults
that use later parameters, and recursion."""

from __future__ import annotations

import functools
from importlib import resources

from .. import ast, ir
from ..errors import PatternSyntaxError, RecursiveDefinitionError, UnknownNameError
from ..parser import parse_source
from .messages import _did_you_mean, _reserved_what

_RESERVED = set(ir.PRIMITIVES) | set(ir.FUNCS) | set(ir.VARS)


@functools.lru_cache(maxsize=1)
def stdlib() -> dict[str, ast.Definition]:
    """The standard library's definitions, by name (parsed once)."""
    text = resources.files("patterncc.grammar").joinpath("stdlib.pat").read_text(encoding="utf-8")
    module = parse_source(text, "<stdlib>")
    definitions = {d.name: d for d in module.definitions}
    _check_definitions(definitions, visible=definitions)
    return definitions


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
