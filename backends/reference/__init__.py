"""The reference backend: float64 numpy/scipy attention, the definition of correct.

    from patterncc.backends.reference import ReferenceAttention, forward, backward
    attn = ReferenceAttention(pattern)           # dense_limit=4096
    o, lse = attn(q, k, v, return_lse=True)      # numpy or torch, (B, H, n, D)
    o, lse = forward(pattern, q, k, v)           # float64 numpy
    dq, dk, dv = backward(pattern, q, k, v, o, lse, do)
"""

from .attention import ReferenceAttention, backward, forward

__all__ = ["ReferenceAttention", "forward", "backward"]
