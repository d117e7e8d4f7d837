"""Block layouts: which (query block, key block) pairs a pattern touches.

One idea per module, in the order the layout stage uses them:

- ``format``: the ``BlockLayout`` record (each array's dtype, shape and
  encoding) and the helpers that build its CSR arrays (``head_csr``,
  ``from_heads``, ``from_dense_classes``, ``check_entries``);
- ``limits``: the size guards (``MAX_CANDIDATES``, ``MAX_ELEMENT_EVALS``,
  ``MAX_SPARSE_ELEMENTS``, ``MAX_BLOCKS``);
- ``tiles``: the working state: a call's budget, a pattern's context, tiles,
  ``random``'s drawn cells mapped onto tiles;
- ``builder``: the stage itself, ``build`` (candidates, then exact classes),
  with ``estimate_blocks``, ``row_pairs`` and ``classify_rectangles``;
- ``rules``: every node type's candidate and class rules (the primitives
  state their own) and those of ``where``;
- ``intervals``: interval arithmetic over ``where`` expressions, shared with
  code generation;
- ``evaluation``: exact classes by evaluating tiles, where closed forms
  cannot decide;
- ``elements``: ``sparse_mask``, the allowed elements as a scipy CSR.

The names listed in ``_HOMES`` are not copies: ``patterncc.blocklayout.X``
is the ``X`` of its home module, read and written there. So setting a limit
here (``blocklayout.MAX_CANDIDATES = ...``, a test's monkeypatch) reaches the
code that reads it.
"""

from __future__ import annotations

import sys
import types

from ..primitives import base as _base
from . import builder, elements, evaluation, format, limits, rules, tiles

# Each name and its home. The private ones are those that tests inspect or tune.
_HOMES = {
    _base: ("EMPTY", "PARTIAL", "FULL", "run_offsets", "run_ranges"),
    format: ("BlockLayout", "HeadCSR", "from_dense_classes", "from_heads", "head_csr", "check_entries"),
    limits: ("MAX_CANDIDATES", "MAX_ELEMENT_EVALS", "MAX_SPARSE_ELEMENTS", "MAX_BLOCKS"),
    tiles: ("_Ctx", "_Tiles"),
    builder: ("build", "estimate_blocks", "row_pairs", "classify_rectangles", "_classify", "_BAND_PAIRS"),
    rules: ("_ROWS", "_CLASS"),
    evaluation: ("_evaluate", "_EVAL_CHUNK"),
    elements: ("sparse_mask", "_CSR_CHUNK"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(name for name in _HOME if not name.startswith("_"))


class _Names(types.ModuleType):
    """This module's type: each name read from and written to its home."""

    def __getattr__(self, name: str):
        if name not in _HOME:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        return getattr(_HOME[name], name)

    def __setattr__(self, name: str, value) -> None:
        if name in _HOME:
            setattr(_HOME[name], name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_HOME))


sys.modules[__name__].__class__ = _Names
