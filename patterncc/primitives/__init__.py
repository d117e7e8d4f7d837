"""The primitives of the language, one class each.

Each class is the IR node of its primitive (a small frozen dataclass, also
reachable as ``ir.<Name>``) and holds everything the stages need to know of
it: its exact rule (the docstring), the numpy mask, the block-layout rules,
the kernel predicate for Triton and torch, the planner's hints and a
hypothesis strategy (``base.Primitive`` lists the interface). The stages keep
their engines and dispatch through these classes.

Adding a primitive is one class here and one line in ``PRIMITIVES``; the
grammar needs nothing (a primitive is a call by name), and
``tests/test_primitives.py`` fails, naming the stage, until every stage has its
entry (README's table of primitives included).

- ``constant``: ``all``, ``none``
- ``diagonal``: rules of ``q - k``: ``causal``, ``local``, ``stride``, ``dilated``, ``band``
- ``positional``: rules of positions: ``block``, ``summary``, ``global``, ``sink``
- ``random``: ``random``, a drawn table
"""

from __future__ import annotations

from .base import EMPTY, FULL, PARTIAL, Primitive
from .constant import All, Empty
from .diagonal import Band, Causal, Dilated, Local, Stride
from .positional import Block, Global, Sink, Summary
from .random import Random

__all__ = [
    "EMPTY", "FULL", "PARTIAL", "PRIMITIVES", "Primitive",
    "All", "Band", "Block", "Causal", "Dilated", "Empty", "Global", "Local", "Random", "Sink", "Stride", "Summary",
]

# Every primitive by its name in the language, in the order the testing kit
# draws them (hypothesis shrinks towards the first).
PRIMITIVES: dict[str, type[Primitive]] = {
    cls.NAME: cls
    for cls in (Causal, Local, Stride, Block, Summary, Global, Sink, Dilated, Band, All, Empty, Random)
}
