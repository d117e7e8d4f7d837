"""The size guards of layouts, plans and sparse masks.

Each bounds the work of one call over all its heads together (a pattern of
``h`` has one layout per distinct head) and is checked before the work it
bounds, so that a call too large is refused with a ``LimitError`` naming the
size and the limit instead of running out of time or memory. ``ir.MAX_HEADS``
bounds the heads. README.md's table of limits quotes these values.

The code that enforces them reads them here at call time (``limits.NAME``),
so setting one here (or through ``patterncc.blocklayout``) takes effect.
"""

# One call may examine at most this many candidate block pairs, all heads
# together (an upper bound computed before any work): about 20 s and 2 GB.
MAX_CANDIDATES = 2**26
# At most this many single (q, k) evaluations when classes need evaluating,
# all heads together (25-100 ns each: seconds, not minutes).
MAX_ELEMENT_EVALS = 2**28
# sparse_mask() builds at most this many allowed elements, all heads together
# (about 5 bytes each).
MAX_SPARSE_ELEMENTS = 2**27
# At most this many blocks a side (per-row tables are this long).
MAX_BLOCKS = 2**24
