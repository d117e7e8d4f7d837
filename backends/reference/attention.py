"""ReferenceAttention: the definition of correct, in float64.

``q`` ``(B, H, n, D)``; ``k``, ``v`` ``(B, Hkv, n, D)`` with ``Hkv`` dividing
``H``: query head ``h`` reads kv head ``h // (H // Hkv)``. Outputs: ``o``
``(B, H, n, D)`` and ``lse`` ``(B, H, n)``, the natural-log logsumexp of the
scores over the allowed keys. A query row with no allowed key gets
``o = 0``, ``lse = -inf`` and zero gradients.

Score terms (``patterncc/scores.py`` has the formulas): ``softcap`` (a float
> 0), ``alibi_slopes`` and ``sinks`` (``(H,)``), ``rel_bias`` (``(H, 2 * M +
1)``), all per query head, all optional. A pattern that carries terms
(``A with softcap(50), alibi``) supplies defaults: its softcap where the call
gives none, the standard ALiBi slopes (as float32 numbers, like the public
API's) where the call gives no ``alibi_slopes``. With a sink, a row with no
allowed key gets ``lse = sink``.

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
from patterncc.scores import ScoreTerms, alibi_slopes as standard_alibi_slopes

from . import dense, masks, sparse
from .checks import check_block_table, check_cache_seqlens, check_packed, check_pages, check_scale, check_shapes
from .terms import HeadTerms

# Masks kept per attention object, most recently used last.
CACHE_SIZE = 8


class ReferenceAttention:
    """``attn(q, k, v, scale=None, return_lse=False, *, softcap=None,
    alibi_slopes=None, sinks=None, rel_bias=None, cache_seqlens=None,
    cu_seqlens=None)`` for one pattern.

    ``cu_seqlens`` (``checks.check_cu_seqlens``): q ``[1, H, total, D]`` and
    k, v ``[1, Hkv, total, D]`` pack sequences of lengths ``cu_seqlens[s + 1]
    - cu_seqlens[s]``; the pattern applies to each alone (``q``, ``k``, ``n``
    counted within it), and the result is each sequence's call concatenated.

    numpy arrays in give float64 numpy arrays out; torch tensors in give
    tensors of the inputs' dtype and device (computed in float64 on the CPU)
    with autograd through the explicit backward, to the term tensors too.
    """

    def __init__(self, pattern: ir.Pattern, *, dense_limit: int = 4096):
        if not isinstance(pattern, ir.Pattern):
            raise TypeError(f"pattern must be a patterncc pattern, got {type(pattern).__name__}")
        if isinstance(dense_limit, bool) or not isinstance(dense_limit, numbers.Integral) or dense_limit < 0:
            raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit=!r}")
        self.pattern = pattern
        self.mask_pattern, self.pattern_terms = ir.split_terms(pattern)
        self.dense_limit = int(dense_limit)
        self._masks = LRU(CACHE_SIZE)  # (seq_len, heads) -> (kernel module, masks)

    def __repr__(self) -> str:
        return f"ReferenceAttention({str(self.pattern)!r}, dense_limit={self.dense_limit})"

    def __call__(self, q, k, v, scale=None, return_lse=False, *, softcap=None, alibi_slopes=None, sinks=None,
                 rel_bias=None, cache_seqlens=None, block_table=None, cu_seqlens=None):
        terms = ScoreTerms(softcap, alibi_slopes, sinks, rel_bias)
        if block_table is not None:
            if cache_seqlens is None:
                raise ValueError("block_table needs cache_seqlens: the length of each row's paged cache")
            k, v = pages_as_cache(q, k, v, cache_seqlens, block_table)
        if cu_seqlens is not None:
            o, lse = self._packed(q, k, v, scale, check_packed(q, k, v, cu_seqlens, cache_seqlens), terms)
        elif cache_seqlens is not None:
            o, lse = self._cached(q, k, v, scale, cache_seqlens, terms)
        elif any(_is_torch(x) for x in (q, k, v)):
            from . import _torch

            o, lse = _torch.attention(self, q, k, v, scale, terms)
        else:
            o, lse = self.forward(q, k, v, scale, terms)
        return (o, lse) if return_lse else o

    def _cached(self, q, k, v, scale, cache_seqlens, terms: ScoreTerms):
        """Each batch row ``b`` against the first ``cache_seqlens[b]`` keys of
        its cache, as a call of its own (numpy or torch, with autograd)."""
        lens = check_cache_seqlens(cache_seqlens, q.shape, k.shape)
        given = {name: value for name, value in zip(("softcap", "alibi_slopes", "sinks", "rel_bias"),
                                                    (terms.softcap, *terms.tensors())) if value is not None}
        if not lens:  # no batch rows: the call without a cache gives the empty outputs of their shapes
            return self(q, k[:, :, :q.shape[2]], v[:, :, :q.shape[2]], scale, return_lse=True, **given)
        rows = [self(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale, return_lse=True, **given)
                for b, n in enumerate(lens)]
        if _is_torch(q):
            import torch

            return torch.cat([o for o, _ in rows]), torch.cat([lse for _, lse in rows])
        return np.concatenate([o for o, _ in rows]), np.concatenate([lse for _, lse in rows])

    def _packed(self, q, k, v, scale, offsets, terms: ScoreTerms):
        """A packed batch (q ``[1, H, total, D]``): each sequence
        ``offsets[s]:offsets[s + 1]`` as a call of its own, the results
        concatenated along the tokens. This is the definition of a packed
        call, and it keeps memory to each sequence's own size (its dense or
        sparse mask), never ``total * total``."""
        given = {name: value for name, value in zip(("softcap", "alibi_slopes", "sinks", "rel_bias"),
                                                    (terms.softcap, *terms.tensors())) if value is not None}
        spans = [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:]) if b > a]  # empty ones add no rows
        parts = [self(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale, return_lse=True, **given) for a, b in spans]
        if _is_torch(q):
            import torch

            return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)
        return np.concatenate([o for o, _ in parts], axis=2), np.concatenate([lse for _, lse in parts], axis=2)

    def forward(self, q, k, v, scale=None, terms: ScoreTerms | None = None):
        """float64 numpy ``(o, lse)``; ``terms`` holds numpy arrays (or None);
        queries shorter than keys are the last ``n_q`` positions."""
        q, k, v = (_float64(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
        check_shapes(q.shape, k.shape, v.shape)
        B, H, n, D = q.shape
        n_k = k.shape[2]
        scale = check_scale(scale, D)
        per_head = self.head_terms(terms, H)
        kernel, head_masks = self.masks(n_k, H)
        head_masks = [m[n_k - n:] for m in head_masks]  # the queries' rows
        group = H // k.shape[1]
        o = np.zeros((B, H, n, D))
        lse = np.full((B, H, n), -np.inf)
        for b in range(B):
            for h in range(H):
                kv = h // group
                o[b, h], lse[b, h] = kernel.forward_head(
                    head_masks[h % len(head_masks)], q[b, h], k[b, kv], v[b, kv], scale, per_head[h]
                )
        return o, lse

    def backward(self, q, k, v, o, lse, do, scale=None, dlse=None, terms: ScoreTerms | None = None):
        """float64 numpy ``(dq, dk, dv)`` from the forward's ``o`` and ``lse``;
        with ``terms`` (even empty ones) ``(dq, dk, dv, (d_alibi_slopes,
        d_sinks, d_rel_bias))``, None for each tensor the terms do not give.

        ``dlse`` (optional, ``(B, H, n)``) is a gradient arriving at ``lse``
        itself. ``dk`` and ``dv`` sum over the query heads sharing a kv head.
        """
        q, k, v, o, do = (
            _float64(name, x) for name, x in (("q", q), ("k", k), ("v", v), ("o", o), ("do", do))
        )
        check_shapes(q.shape, k.shape, v.shape)
        B, H, n, D = q.shape
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
        per_head = self.head_terms(terms, H)
        n_k = k.shape[2]
        kernel, head_masks = self.masks(n_k, H)
        head_masks = [m[n_k - n:] for m in head_masks]
        group = H // k.shape[1]
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        d_slopes = np.zeros(H)
        d_bias = None if per_head[0].bias is None else np.zeros((H, per_head[0].bias.size))
        for b in range(B):
            for h in range(H):
                kv = h // group
                dq[b, h], dk_h, dv_h, d_slope, d_bias_h = kernel.backward_head(
                    head_masks[h % len(head_masks)], q[b, h], k[b, kv], v[b, kv],
                    o[b, h], lse[b, h], do[b, h], None if dlse is None else dlse[b, h], scale, per_head[h],
                )
                dk[b, kv] += dk_h
                dv[b, kv] += dv_h
                if d_slope is not None:
                    d_slopes[h] += d_slope
                if d_bias_h is not None:
                    d_bias[h] += d_bias_h
        if terms is None:
            return dq, dk, dv
        d_sinks = None
        if terms.sinks is not None:
            # lse = log(sum exp(s) + exp(t)): d lse / d t = exp(t - lse), and a
            # change of lse moves the loss by dlse - dO . O (o scales by exp(-lse)).
            delta = np.sum(do * o, axis=-1) - (0.0 if dlse is None else dlse)  # (B, H, n)
            sinks = np.array([t.sink for t in per_head])  # (H,)
            d_sinks = -np.sum(np.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
        return dq, dk, dv, (
            None if terms.alibi_slopes is None else d_slopes,
            d_sinks,
            None if terms.rel_bias is None else d_bias,
        )

    def head_terms(self, terms: ScoreTerms | None, heads: int) -> list[HeadTerms]:
        """The call's terms (numpy arrays), with the pattern's as defaults, per query head."""
        terms = check_numpy_terms(terms or ScoreTerms(), heads)
        softcap = terms.softcap if terms.softcap is not None else self.pattern_terms.softcap
        slopes = terms.alibi_slopes
        if slopes is None and self.pattern_terms.alibi:
            # float32 values, as the public API passes them to every backend
            slopes = np.array(standard_alibi_slopes(heads), dtype=np.float32).astype(np.float64)
        return [
            HeadTerms(
                softcap,
                None if slopes is None else float(slopes[h]),
                None if terms.sinks is None else float(terms.sinks[h]),
                None if terms.rel_bias is None else terms.rel_bias[h],
            )
            for h in range(heads)
        ]

    def masks(self, seq_len: int, heads: int):
        """``(kernel module, [mask per layout head])`` for this length, cached."""
        key = (seq_len, heads)
        if key not in self._masks:
            if seq_len <= self.dense_limit:
                self._masks[key] = (dense, masks.dense_masks(self.mask_pattern, seq_len, heads))
            else:
                self._masks[key] = (sparse, masks.sparse_masks(self.mask_pattern, seq_len, heads))
        return self._masks[key]


def forward(pattern: ir.Pattern, q, k, v, scale=None, terms: ScoreTerms | None = None):
    """float64 ``(o, lse)`` of ``pattern``; see ``ReferenceAttention``."""
    return _attention_for(pattern).forward(q, k, v, scale, terms)


def backward(pattern: ir.Pattern, q, k, v, o, lse, do, scale=None, dlse=None, terms: ScoreTerms | None = None):
    """float64 ``(dq, dk, dv)`` of ``pattern`` (and the terms' gradients when
    ``terms`` is given); see ``ReferenceAttention.backward``."""
    return _attention_for(pattern).backward(q, k, v, o, lse, do, scale, dlse, terms)


def pages_as_cache(q, k_pool, v_pool, cache_seqlens, block_table):
    """A paged cache as the contiguous one it stands for (its definition):
    pools ``[num_pages, Hkv, page, D]`` and ``block_table`` ``[B, max_pages]``
    give caches ``[B, Hkv, max_pages * page, D]`` whose positions ``t`` of row
    ``b`` are slot ``t % page`` of page ``block_table[b, t // page]``. Entries
    past a row's length are never read (they may hold anything). numpy or
    torch (with autograd to the pools), as the pools are."""
    for name, x in (("k", k_pool), ("v", v_pool)):
        if getattr(x, "shape", None) is None:
            raise TypeError(f"{name} must be a page pool array or tensor, got {type(x).__name__}")
    if tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"v must have k's shape {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    max_len = check_block_table(block_table, q.shape, k_pool.shape)
    num_pages, Hkv, page, D = k_pool.shape
    lens = check_cache_seqlens(cache_seqlens, q.shape, (q.shape[0], Hkv, max_len, D))
    rows = np.asarray(block_table.tolist(), dtype=np.int64).reshape(tuple(block_table.shape))  # (B = 0 too)
    check_pages(rows.tolist(), lens, page, num_pages)
    used = np.arange(rows.shape[1])[None, :] < np.asarray([-(-n // page) for n in lens])[:, None]
    rows = np.where(used, rows, 0)  # pages past a row's length: any page will do, it is masked
    B = q.shape[0]
    if _is_torch(k_pool):
        import torch

        rows = torch.as_tensor(rows, device=k_pool.device)
        gather = lambda pool: pool[rows].transpose(1, 2).reshape(B, Hkv, max_len, D)
    else:
        gather = lambda pool: np.swapaxes(np.asarray(pool)[rows], 1, 2).reshape(B, Hkv, max_len, D)
    return gather(k_pool), gather(v_pool)  # (B, Hkv, max_pages * page, D)


@functools.lru_cache(maxsize=16)
def _attention_for(pattern: ir.Pattern) -> ReferenceAttention:
    return ReferenceAttention(pattern)


# ----------------------------------------------------------------------------
# Input checks, shared with the torch glue
# ----------------------------------------------------------------------------


def check_numpy_terms(terms: ScoreTerms, heads: int) -> ScoreTerms:
    """``terms`` with float64 numpy arrays, or a TypeError/ValueError naming
    the argument (the numpy counterpart of ``patterncc.scores.check_terms``)."""
    softcap = ir.check_softcap(terms.softcap)
    arrays = {}
    for name, t in (("alibi_slopes", terms.alibi_slopes), ("sinks", terms.sinks), ("rel_bias", terms.rel_bias)):
        if t is None:
            arrays[name] = None
            continue
        t = _float64(name, t)
        if name == "rel_bias":
            if t.ndim != 2 or t.shape[0] != heads or t.shape[1] % 2 != 1:
                raise ValueError(f"rel_bias must be shaped [H, 2 * max_distance + 1] with H = {heads} (q's heads), "
                                 f"got {t.shape}")
        elif t.shape != (heads,):
            raise ValueError(f"{name} must be shaped [H] with H = {heads} (q's heads), got {t.shape}")
        arrays[name] = t
    return ScoreTerms(softcap, **arrays)


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
