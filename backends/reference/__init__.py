"""The reference backend: float64 numpy/scipy attention, the definition of correct.

    from patterncc.backends.reference import ReferenceAttention, forward, backward
    attn = ReferenceAttention(pattern)           # dense_limit=4096
    o, lse = attn(q, k, v, return_lse=True)      # numpy or torch, (B, H, n, D)
    o, lse = forward(pattern, q, k, v)           # float64 numpy
    dq, dk, dv = backward(pattern, q, k, v, o, lse, do)
"""

__all__ = ["ReferenceAttention", "forward", "backward"]


def __getattr__(name: str):
    # Imported at first use: the Triton backend reads this package's input
    # checks (``.checks``) and should not pay for scipy.sparse (0.3 s of a
    # first call on the H200's host) unless the reference itself runs.
    if name in __all__:
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
