"""torch tensors through the float64 numpy reference, with autograd.

Imported only when torch tensors are passed. The forward and the explicit
backward both run in float64 on the CPU; results go back to the inputs'
dtype and device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from patterncc.scores import ScoreTerms, check_terms

from .checks import check_scale, check_shapes


def attention(attn, q, k, v, scale, terms: ScoreTerms):
    """``(o, lse)`` as tensors of ``q``'s dtype and device, differentiable in q,
    k, v and the term tensors (each gradient in its tensor's dtype)."""
    check_tensors(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    terms = check_terms(terms, q.shape[1], q.device)
    return _Attention.apply(q, k, v, *terms.tensors(), attn, scale, terms.softcap)


def check_tensors(q, k, v) -> None:
    """TypeError/ValueError naming the argument unless q, k, v are floating-point
    tensors of one dtype and device, shaped as ``check_shapes`` wants."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor like the others, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype, got q {q.dtype} and {name} {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"q, k and v must be on one device, got q on {q.device} and {name} on {x.device}")
    check_shapes(q.shape, k.shape, v.shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, sinks, rel_bias, attn, scale, softcap):
        q64, k64, v64 = (_numpy(x) for x in (q, k, v))
        tensors = (alibi_slopes, sinks, rel_bias)
        terms = ScoreTerms(softcap, *(None if t is None else _numpy(t) for t in tensors))
        o, lse = attn.forward(q64, k64, v64, scale, terms)
        # float64 copies for the backward: o and lse exactly as computed, not rounded.
        ctx.attn, ctx.scale, ctx.terms = attn, scale, terms
        ctx.saved = (q64, k64, v64, o, lse)
        ctx.dtype, ctx.device = q.dtype, q.device
        ctx.term_dtypes = tuple(None if t is None else t.dtype for t in tensors)
        return _tensor(o, q.dtype, q.device), _tensor(lse, q.dtype, q.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q64, k64, v64, o, lse = ctx.saved
        dlse = None if dlse is None or not dlse.any() else _numpy(dlse)
        dq, dk, dv, term_grads = ctx.attn.backward(q64, k64, v64, o, lse, _numpy(do), ctx.scale, dlse, ctx.terms)
        grads = (_tensor(g, ctx.dtype, ctx.device) for g in (dq, dk, dv))
        term_grads = (None if g is None else _tensor(g, dtype, ctx.device)
                      for g, dtype in zip(term_grads, ctx.term_dtypes))
        return (*grads, *term_grads, None, None, None)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float64).numpy()


def _tensor(x: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device=device, dtype=dtype)
