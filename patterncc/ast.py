"""The syntax tree: what the user wrote, before names and types are resolved.

One grammar serves patterns, integers and conditions (see
``grammar/pattern.lark``), so the tree does not yet know whether ``a - b`` is
a difference of patterns or a subtraction of integers; the resolver decides.
Parentheses leave no node behind.

Every node is a frozen dataclass with a ``loc`` (``errors.Loc``: 1-based line
and column and the text of the line) that takes no part in equality, so two
trees compare equal when they say the same thing.

Binary operators keep the location of the operator, calls and names the
location of the name, keywords (``where``, ``heads``, ``cycle``) their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Union as TUnion

from .errors import Loc

_LOC = dict(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Num:
    """An integer literal."""

    value: int
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Name:
    """A bare name: a pattern (``causal``, ``strided``), a parameter or ``q k h n``."""

    name: str
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Keyword:
    """``name = value`` inside a call's argument list."""

    name: str
    value: "Node"
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Call:
    """``name(arg, ..., key = value, ...)``: a primitive, a definition or a function."""

    name: str
    args: tuple["Node | Keyword", ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Unary:
    """``-x``, ``~A`` or ``not c``."""

    op: str
    operand: "Node"
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Binary:
    """A left-associative ``-``, ``+``, ``*``, ``//`` or ``%``."""

    op: str
    left: "Node"
    right: "Node"
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Chain:
    """``a | b | ...``, ``a & b & ...``, ``a and b and ...`` or ``a or b or ...``:
    one node for a whole chain of the same associative operator."""

    op: str
    operands: tuple["Node", ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Compare:
    """``a < b <= c ...``: ``len(ops) == len(operands) - 1``."""

    operands: tuple["Node", ...]
    ops: tuple[str, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Where:
    """``where COND``."""

    cond: "Node"
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class HeadRange:
    """``start..stop => body`` inside ``heads { }``."""

    start: "Node"
    stop: "Node"
    body: "Node"
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Heads:
    """``heads { 0..8 => A, 8..16 => B }``."""

    ranges: tuple[HeadRange, ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Cycle:
    """``cycle(A, B, ...)``."""

    parts: tuple["Node", ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Real:
    """A decimal number such as ``30.5`` (only a score term's argument)."""

    value: float
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class ScoreTerm:
    """``softcap(50)`` or ``alibi``, after ``with``."""

    name: str
    args: tuple["Node", ...]
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Scored:
    """``body with term, term``; located at ``with``."""

    body: "Node"
    terms: tuple[ScoreTerm, ...]
    loc: Loc | None = field(**_LOC)


Node = TUnion[Num, Name, Call, Unary, Binary, Chain, Compare, Where, Heads, Cycle, Real, Scored]


@dataclass(frozen=True)
class Param:
    """A parameter of a definition, with its default expression if any."""

    name: str
    default: Node | None
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Definition:
    """``pattern name(params) = body``."""

    name: str
    params: tuple[Param, ...]
    body: Node
    loc: Loc | None = field(**_LOC)


@dataclass(frozen=True)
class Module:
    """A whole source: definitions in order, then at most one final expression."""

    definitions: tuple[Definition, ...]
    expr: Node | None = None
    filename: str = field(default="<pattern>", compare=False)


def children(node) -> Iterator:
    """The sub-nodes of any tree node, in source order."""
    for f in fields(node):
        value = getattr(node, f.name)
        if isinstance(value, tuple):
            yield from (v for v in value if _is_node(v))
        elif _is_node(value):
            yield value


def _is_node(value) -> bool:
    return hasattr(value, "__dataclass_fields__") and not isinstance(value, Loc)


def start_loc(node) -> Loc | None:
    """Where a node's text begins (a chain or operator is located at its operator)."""
    while True:
        if isinstance(node, (Binary, Scored)):
            node = node.left if isinstance(node, Binary) else node.body
        elif isinstance(node, (Chain, Compare)):
            node = node.operands[0]
        else:
            return node.loc


def deepest(node, limit: int):
    """The first node found more than ``limit`` levels below ``node``, or None.

    Iterative, so it is safe on trees far deeper than Python's recursion limit.
    """
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return current
        stack.extend((child, depth + 1) for child in children(current))
    return None
