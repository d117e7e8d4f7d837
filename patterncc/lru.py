"""The one cache helper: a dict that keeps only its most recently used entries.

Layouts, plans, device tables, kernel modules and launch lists are cached per
attention object, keyed by sequence length among other things; a model that
sees many lengths must not keep them all, so each such cache is an ``LRU``.
"""

from __future__ import annotations

from collections import OrderedDict


class LRU:
    """At most ``maxsize`` entries. Reading a key (``cache[key]``, ``get``) or
    writing it makes it the most recently used; a write beyond ``maxsize``
    drops the least recently used entry."""

    def __init__(self, maxsize: int):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer, got {maxsize=!r}")
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key):
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def get(self, key, default=None):
        if key not in self._entries:
            return default
        return self[key]

    def __setitem__(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def keys(self) -> list:
        """The keys, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
