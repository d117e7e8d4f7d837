"""ReferenceAttention: the definition of correct, in float64.

``q`` ``(B, H, n_q, D)``; ``k``, ``v`` ``(B, Hkv, n, D)`` with ``Hkv`` dividing
``H``: query head ``h`` reads kv head ``h // (H // Hkv)``. With ``n_q < n``
the queries are the last ``n_q`` positions, ``n - n_q .. n - 1``
(bottom-right), and the pattern is evaluated there with its own ``n``;
``cache_seqlens`` (one length per batch row) reads only the first
``cache_seqlens[b]`` keys of row ``b``, its queries the last of those. Outputs: ``o``
``(B, H, n, D)`` and ``lse`` ``(B, H, n)``, the natural-log logsumexp of the
scaled scores over the allowed keys. A query row with no allowed key gets
``o = 0``, ``lse = -inf`` and zero gradients.

Up to ``dense_limit`` tokens every score is computed (``dense.py``); beyond
it only the allowed pairs are (``sparse.py``). Masks are cached per
``(seq_len, heads)``.
"""

from __future__ import annotations

import functools
import numbers
import sys
import numpy as np

from patterncc import ir
from patterncc.lru import LRU

from . import dense, masks, sparse
from .checks import check_cache_seqlens, check_scale, check_shapes

# Masks kept per attention object, most recently used last.
CACHE_SIZE = 8


class ReferenceAttention:
    """``attn(q, k, v, scale=None, return_lse=False)`` for one pattern.

    numpy arrays in give float64 numpy arrays out; torch tensors in give
    tensors of the inputs' dtype and device (computed in float64 on the CPU)
    with autograd through the explicit backward.
    """

    def __init__(self, pattern: ir.Pattern, *, dense_limit: int = 4096):
        if not isinstance(pattern, ir.Pattern):
            raise TypeError(f"pattern must be a patterncc pattern, got {type(pattern).__name__}")
        if isinstance(dense_limit, bool) or not isinstance(dense_limit, numbers.Integral) or dense_limit < 0:
            raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit=!r}")
        self.pattern = pattern
        self.dense_limit = int(dense_limit)
        self._masks = LRU(CACHE_SIZE)  # (seq_len, heads) -> (kernel module, masks)

    def __repr__(self) -> str:
        return f"ReferenceAttention({str(self.pattern)!r}, dense_limit={self.dense_limit})"

    def __call__(self, q, k, v, scale=None, return_lse=False, *, cache_seqlens=None):
        if cache_seqlens is not None:
            o, lse = self._cached(q, k, v, scale, cache_seqlens)
        elif any(_is_torch(x) for x in (q, k, v)):
            from . import _torch

            o, lse = _torch.attention(self, q, k, v, scale)
        else:
            o, lse = self.forward(q, k, v, scale)
        return (o, lse) if return_lse else o

    def _cached(self, q, k, v, scale, cache_seqlens):
        """Each batch row ``b`` against the first ``cache_seqlens[b]`` keys of
        its cache, as a call of its own (numpy or torch, with autograd)."""
        lens = check_cache_seqlens(cache_seqlens, q.shape, k.shape)
        rows = [self(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale, return_lse=True)
                for b, n in enumerate(lens)]
        if _is_torch(q):
            import torch

            return torch.cat([o for o, _ in rows]), torch.cat([lse for _, lse in rows])
        return np.concatenate([o for o, _ in rows]), np.concatenate([lse for _, lse in rows])

    def forward(self, q, k, v, scale=None):
        """float64 numpy ``(o, lse)``; queries shorter than keys are the last
        ``n_q`` positions (``check_shapes``)."""
        q, k, v = (_float64(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
        check_shapes(q.shape, k.shape, v.shape)
        B, H, n_q, D = q.shape
        n = k.shape[2]
        scale = check_scale(scale, D)
        kernel, head_masks = self.masks(n, H)
        head_masks = [m[n - n_q:] for m in head_masks]  # the queries' rows
        group = H // k.shape[1]
        o = np.zeros((B, H, n_q, D))
        lse = np.full((B, H, n_q), -np.inf)
        for b in range(B):
            for h in range(H):
                kv = h // group
                o[b, h], lse[b, h] = kernel.forward_head(
                    head_masks[h % len(head_masks)], q[b, h], k[b, kv], v[b, kv], scale
                )
        return o, lse

    def backward(self, q, k, v, o, lse, do, scale=None, dlse=None):
        """float64 numpy ``(dq, dk, dv)`` from the forward's ``o`` and ``lse``.

        ``dlse`` (optional, ``(B, H, n)``) is a gradient arriving at ``lse``
        itself. ``dk`` and ``dv`` sum over the query heads sharing a kv head.
        """
        q, k, v, o, do = (
            _float64(name, x) for name, x in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do))
        )
        check_shapes(q.shape, k.shape, v.shape)
        B, H, n, D = q.shape
        n_k = k.shape[2]
        for name, x in (("o", o), ("do", do)):
            if x.shape != q.shape:
                raise ValueError(f"{name} must have q's shape {q.shape}, got {x.shape}")
        lse = _float64("lse", lse)
        if dlse is not None:
            dlse = _float64("dlse", dlse)
        for name, x in (("lse", lse), ("dlse", dlse)):
            if x is not None and x.shape != (B, H, n):
                raise ValueError(f"{name} must have shape {(B, H, n)} (B, H, n), got {x.shape}")
        scale = check_scale(scale, D)
        kernel, head_masks = self.masks(n_k, H)
        head_masks = [m[n_k - n:] for m in head_masks]
        group = H // k.shape[1]
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        for b in range(B):
            for h in range(H):
                kv = h // group
                dq[b, h], dk_h, dv_h = kernel.backward_head(
                    head_masks[h % len(head_masks)], q[b, h], k[b, kv], v[b, kv],
                    o[b, h], lse[b, h], do[b, h], None if dlse is None else dlse[b, h], scale,
                )
                dk[b, kv] += dk_h
                dv[b, kv] += dv_h
        return dq, dk, dv

    def masks(self, seq_len: int, heads: int):
        """``(kernel module, [mask per layout head])`` for this length, cached."""
        key = (seq_len, heads)
        if key in self._masks:
            return self._masks[key]
        if seq_len <= self.dense_limit:
            entry = (dense, masks.dense_masks(self.pattern, seq_len, heads))
        else:
            entry = (sparse, masks.sparse_masks(self.pattern, seq_len, heads))
        self._masks[key] = entry
        return entry


def forward(pattern: ir.Pattern, q, k, v, scale=None):
    """float64 ``(o, lse)`` of ``pattern``; see ``ReferenceAttention``."""
    return _attention_for(pattern).forward(q, k, v, scale)


def backward(pattern: ir.Pattern, q, k, v, o, lse, do, scale=None, dlse=None):
    """float64 ``(dq, dk, dv)`` of ``pattern``; see ``ReferenceAttention.backward``."""
    return _attention_for(pattern).backward(q, k, v, o, lse, do, scale, dlse)


@functools.lru_cache(maxsize=16)
def _attention_for(pattern: ir.Pattern) -> ReferenceAttention:
    return ReferenceAttention(pattern)


def _float64(name: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (or q, k, v all torch tensors), got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return x.astype(np.float64, copy=False)


def _is_torch(x) -> bool:
    # Only look for torch if the caller has imported it: the numpy path never loads it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
