"""Every live compiled attention by its key, the integer that names it to the
torch ops (ops.py): only tensors and plain numbers cross an op's boundary.

Its own module so that ops.py (which looks attentions up) and attention.py
(which registers them and calls the ops) both import it and not each other.
"""

from __future__ import annotations

import itertools
import weakref

live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key (int) -> Attention
_keys = itertools.count()


def register(attn) -> int:
    """Give ``attn`` a fresh key and record it (weakly: a dropped attention leaves)."""
    key = next(_keys)
    live[key] = attn
    return key
