"""The log-sum-exp merge of two partial attention results, one pass.

Imported lazily (by ``planned.py``, when a planned run first merges), so
that ``TRITON_INTERPRET`` set by the caller still decides how it runs.
"""

import triton
import triton.language as tl


@triton.jit
def merge_kernel(O0, L0, O1, L1, O, L, ROWS, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """o = (e^(l0 - m) o0 + e^(l1 - m) o1) / s, lse = m + log s, over BLOCK_R rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    inside = rows < ROWS
    l0 = tl.load(L0 + rows, mask=inside, other=float("-inf")).to(tl.float32)
    l1 = tl.load(L1 + rows, mask=inside, other=float("-inf")).to(tl.float32)
    # -- a row no component reaches has l0 = l1 = -inf: subtract 0, not -inf
    m = tl.maximum(l0, l1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w0 = tl.exp(l0 - m)
    w1 = tl.exp(l1 - m)
    s = w0 + w1
    s_safe = tl.where(s > 0.0, s, 1.0)
    offs = rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    o0 = tl.load(O0 + offs, mask=inside[:, None], other=0.0).to(tl.float32)
    o1 = tl.load(O1 + offs, mask=inside[:, None], other=0.0).to(tl.float32)
    o = (w0[:, None] * o0 + w1[:, None] * o1) / s_safe[:, None]
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=inside[:, None])
    tl.store(L + rows, tl.where(s > 0.0, m + tl.log(s_safe), float("-inf")), mask=inside)

