"""The Sparse Transformer in PyTorch: attention layer, residual block, language model.

    from patterncc.nn import SparseSelfAttention, SparseTransformerBlock, SparseTransformer

    attn  = SparseSelfAttention(512, 8, "fixed(128, 32)")       # x (B, n, 512) -> (B, n, 512)
    block = SparseTransformerBlock(512, 8, "strided(128)", depth_for_init=12, recompute=True)
    lm    = SparseTransformer(256, 512, 12, 8, ["causal & local(128)", "causal & stride(128)"],
                              mode="interleaved", max_len=8192)

Follows Child et al. 2019, *Generating Long Sequences with Sparse
Transformers*, section 5.2:

    H_k  = H_{k-1} + a(H_{k-1}) + b(H_{k-1})
    a(H) = dropout(attention(norm(H)))
    b(H) = dropout(ff(norm(H + a(H))))          ff = Linear -> GELU -> Linear

Written-down choices:

- **Patterns** are pattern objects, ``.pat`` source text, or a path to a
  ``.pat`` file (an ``os.PathLike``, or a one-line ``str`` ending in ``.pat``):
  ``patterncc.as_pattern``'s rule, the same everywhere.
  ``None`` means dense causal attention through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, the
  baseline to compare against.
- **Backends.** ``backend="auto"`` picks by the device of the inputs: the
  generated Triton kernels for CUDA tensors, the reference backend (float64,
  slow, exact) otherwise. ``"reference"`` and ``"triton"`` force one (Triton on
  the CPU runs under ``TRITON_INTERPRET=1``).
- **Dropout** is applied only where a branch joins the residual stream (the
  paper's placement), never to attention probabilities: the fused kernels
  never materialize them.
- **Init** is GPT-2's: every Linear weight ``N(0, init_std)`` (0.02), biases
  0, LayerNorm 1 and 0, embeddings ``N(0, init_std)``; then the output
  projections of attention and feed-forward are scaled by
  ``1 / sqrt(2 * depth)`` (the paper's scaling, ``depth`` = number of blocks).
- **Grouped-query attention.** ``kv_heads`` divides ``heads``; query head
  ``h`` reads key/value head ``h // (heads // kv_heads)`` (contiguous groups,
  as ``repeat_interleave`` gives).
- **Multi-head mode** gives each pattern a contiguous range of
  ``heads // len(patterns)`` heads, as one ``heads { .. }`` pattern
  (``ir.Heads``), not ``cycle``: the printed pattern says which heads do what,
  and with ``kv_heads = len(patterns)`` each key/value head serves one pattern.
- **Score terms.** ``softcap=c`` caps every score (``c * tanh(s / c)``,
  replacing a pattern's own ``softcap``); ``sinks=True`` adds a learnable
  sink logit per head (``attn.sinks`` ``(heads,)``, starting at 0);
  ``rel_bias_distance=M`` a learnable relative-position bias (``attn.rel_bias``
  ``(heads, 2 * M + 1)``, starting at 0). ALiBi comes from the pattern
  (``"causal with alibi"``, standard slopes). Terms apply to a whole
  attention, so ``merged`` and ``multihead`` modes refuse patterns that carry
  them: put them on the model instead. Dense causal (``pattern=None``) takes
  no terms; write ``"causal"`` for them.
- **Packed batches.** ``forward(..., cu_seqlens=cu)`` (int32 ``[S + 1]``,
  cumulative lengths from 0 to ``total``) takes one row ``(1, total, ...)``
  holding ``S`` sequences: each attends only within itself, and
  ``SparseTransformer`` counts each one's positions from its own start, so
  the result is each sequence's own forward, concatenated. ``pattern=None``
  runs SDPA per sequence. A cache cannot be combined with it.
- **Context parallelism.** ``context_parallel_group=g`` (a process group,
  e.g. ``torch.distributed.group.WORLD``) runs every attention as
  ``patterncc.distributed.ContextParallelAttention`` over ``g`` with
  ``context_parallel_sharding`` (``"contiguous"`` or ``"zigzag"``): each rank
  passes its shard of the tokens (``cp.shard``) and ``SparseTransformer``
  gives them their global positions. Every layer needs a pattern (score
  terms apply at global positions); no cache, no packed batch. The
  parameters' gradients are each rank's share: sum them over ``g``
  (``all_reduce``) before the optimizer steps.
- **Recomputation** (``recompute=True``) wraps each whole residual branch
  ``a + b`` in ``torch.utils.checkpoint`` (``use_reentrant=False``, RNG state
  preserved, so dropout masks are replayed exactly): a block keeps only its
  input for the backward pass.
"""

from __future__ import annotations

import functools
import math
import operator
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ir
from .attention import BACKENDS, _traced, choose_backend
from .pipeline import as_pattern, compile as compile_pattern, mask

__all__ = [
    "KVCache",
    "MODES",
    "SparseSelfAttention",
    "SparseTransformer",
    "SparseTransformerBlock",
    "check_causal",
    "layer_patterns",
    "resolve_pattern",
]

MODES = ("interleaved", "merged", "multihead")

# Causality is checked on a dense mask of this many positions (or max_len, if
# smaller): large enough to see the structure of patterns with periods in the
# hundreds, small enough to cost milliseconds.
CAUSAL_CHECK_LEN = 512


# ----------------------------------------------------------------------------
# Patterns given as objects, source text, or files
# ----------------------------------------------------------------------------


def resolve_pattern(pattern) -> ir.Pattern | None:
    """A pattern object, ``.pat`` source text, or a ``.pat`` path -> IR (None stays None),
    by ``patterncc.as_pattern``'s rule."""
    return None if pattern is None else as_pattern(pattern)


def layer_patterns(patterns, mode: str, depth: int, heads: int) -> list[ir.Pattern | None]:
    """The pattern of every layer of a ``depth``-layer model (None: dense causal).

    ``interleaved``: layer ``r`` uses ``patterns[r % len(patterns)]``.
    ``merged``: every layer and head attends to the union of the patterns.
    ``multihead``: heads split into ``len(patterns)`` contiguous ranges, range
    ``i`` using ``patterns[i]`` (one ``heads { .. }`` pattern, every layer).
    """
    if mode not in MODES:
        raise ValueError(f"{mode=} is not one of {', '.join(MODES)}")
    if patterns is None:
        return [None] * depth
    if isinstance(patterns, (str, os.PathLike, ir.Pattern)):
        patterns = [patterns]
    pats = [resolve_pattern(p) for p in patterns]
    if not pats:
        raise ValueError("patterns is empty; pass patterns=None for dense causal attention")
    if any(p is None for p in pats):
        raise ValueError("patterns must all be patterns; pass patterns=None for a dense model")
    if mode == "interleaved":
        return [pats[r % len(pats)] for r in range(depth)]
    scored = [p for p in pats if isinstance(p, ir.Scored)]
    if scored:
        raise ValueError(
            f"{mode} mode combines the patterns, but `{scored[0]}` has score terms, which apply to a whole "
            "attention: give the model softcap=... (or use interleaved mode) instead"
        )
    if mode == "merged":
        return [functools.reduce(operator.or_, pats)] * depth
    if heads % len(pats):
        raise ValueError(
            f"multihead mode splits the heads evenly across the patterns, but {heads=} "
            f"is not divisible by {len(pats)} patterns"
        )
    per = heads // len(pats)
    split = ir.Heads(tuple(ir.HeadRange(i * per, (i + 1) * per, p) for i, p in enumerate(pats)))
    return [split] * depth


def check_causal(pattern: ir.Pattern, heads: int, seq_len: int = CAUSAL_CHECK_LEN) -> None:
    """Raise ValueError unless every head of ``pattern`` is inside ``causal``
    (checked on the dense mask at ``seq_len``)."""
    m = mask(pattern, seq_len=seq_len, heads=heads)  # (H, n, n) bool
    future = np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1)  # k > q
    bad = np.argwhere(m & future)
    if len(bad):
        h, q, k = (int(x) for x in bad[0])
        raise ValueError(
            f"pattern `{pattern}` is not causal: in head {h}, query {q} may attend to the "
            f"later key {k} (checked at n={seq_len}); a language model needs a pattern "
            f"inside `causal`, e.g. `causal & (...)`"
        )


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention over ``pattern``: x ``(B, n, dim)`` -> ``(B, n, dim)``.

    One fused projection makes q, k and v (``heads + 2 * kv_heads`` heads of
    ``head_dim``), the compiled pattern attends, an output projection maps
    back to ``dim``, and ``dropout`` applies to that output. ``pattern=None``
    is dense causal attention (SDPA). Score terms: ``softcap``, ``sinks=True``
    and ``rel_bias_distance=M`` (see the module docstring).
    """

    def __init__(self, dim: int, heads: int, pattern, *, kv_heads: int | None = None,
                 dropout: float = 0.0, backend: str = "auto", bias: bool = True,
                 head_dim: int | None = None, softcap: float | None = None, sinks: bool = False,
                 rel_bias_distance: int | None = None, context_parallel_group=None,
                 context_parallel_sharding: str = "contiguous"):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("dim", dim), ("heads", heads), ("kv_heads", kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if heads % kv_heads:
            raise ValueError(f"{kv_heads=} must divide {heads=}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"{dim=} is not divisible by {heads=}; pass head_dim")
            head_dim = dim // heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim=!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{backend=} is not one of {', '.join(BACKENDS)}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.backend = backend
        self.pattern = resolve_pattern(pattern)
        if self.pattern is not None:
            ir.check_heads(self.pattern, heads)  # `heads { .. }` must cover exactly our heads
        self.softcap = ir.check_softcap(softcap)
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be True or False, got {sinks!r}")
        if rel_bias_distance is not None and (isinstance(rel_bias_distance, bool) or
                                              not isinstance(rel_bias_distance, int) or rel_bias_distance < 0):
            raise ValueError(f"rel_bias_distance must be an integer >= 0 or None, got {rel_bias_distance!r}")
        if self.pattern is None and (softcap is not None or sinks or rel_bias_distance is not None):
            raise ValueError("score terms need a pattern: pattern=None is SDPA's dense causal attention; "
                             "write pattern='causal' to use them")
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None
        self.rel_bias = None if rel_bias_distance is None else nn.Parameter(torch.zeros(heads, 2 * rel_bias_distance + 1))
        # Compiled here, not in forward: torch.compile then traces no compiling
        # and finds one attention op per call. Without a pattern, the causal
        # pattern serves packed batches under torch.compile (SDPA has no packed form).
        served = ir.Causal() if self.pattern is None else self.pattern
        self._attentions = {b: _compiled(served, b, self.softcap) for b in BACKENDS[1:]}
        self.context_parallel = None
        if context_parallel_group is not None:
            self.context_parallel = _context_parallel(self.pattern, self.softcap, context_parallel_group,
                                                      context_parallel_sharding)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        pattern = "dense causal (sdpa)" if self.pattern is None else f"`{self.pattern}`"
        terms = "".join([
            "" if self.softcap is None else f", softcap={self.softcap:g}",
            "" if self.sinks is None else ", sinks=True",
            "" if self.rel_bias is None else f", rel_bias_distance={(self.rel_bias.shape[1] - 1) // 2}",
        ])
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, pattern={pattern}, backend={self.backend!r}{terms}")

    def forward(self, x: torch.Tensor, cache: "LayerCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """x ``(B, n, dim)``; with a ``cache`` the n tokens follow the
        ``cache.length`` cached ones: their keys and values are appended and
        they attend to every cached token the pattern allows. With
        ``cu_seqlens`` (int32 ``[S + 1]``) x ``(1, total, dim)`` packs
        sequences that each attend only within themselves (``Attention``'s
        packed call). With a context-parallel group, x is this rank's shard
        of the sequence (``ContextParallelAttention.shard``)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (batch, seq_len, dim={self.dim}), got shape {tuple(x.shape)}")
        if self.context_parallel is not None:
            check_unsharded_only(cache, cu_seqlens)
        B, n, _ = x.shape
        if cu_seqlens is not None:
            cu_seqlens = check_packed_batch(B, n, cu_seqlens, cache, traced=_traced(x))
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        k = k.view(B, n, Hkv, D).transpose(1, 2)  # (B, Hkv, n, D)
        v = v.view(B, n, Hkv, D).transpose(1, 2)  # (B, Hkv, n, D)
        if cache is None:
            o = self.attend(q, k, v, cu_seqlens=cu_seqlens)  # (B, H, n, D)
        else:
            k, v = cache.append(k, v)  # (B, Hkv, max_len, D) with the first cache.length + n tokens valid
            lens = [cache.length + n] * B
            if _traced(x):  # a tensor: a symbolic length stays symbolic (a list of them would be specialized)
                lens = torch.full((B,), cache.length + n, dtype=torch.int32, device=x.device)
            o = self.attend(q, k, v, cache_seqlens=lens)
        o = o.transpose(1, 2).reshape(B, n, H * D)
        return self.dropout(self.proj(o))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_seqlens=None,
               cu_seqlens=None) -> torch.Tensor:
        """q ``(B, H, n, D)``, k and v ``(B, Hkv, n, D)`` -> ``(B, H, n, D)``;
        with ``cache_seqlens``, k and v are caches, with ``cu_seqlens`` a
        packed batch (``Attention.__call__``)."""
        if self.pattern is None and isinstance(cu_seqlens, torch.Tensor):
            # A traced packed batch (check_packed_batch kept cu_seqlens a tensor): the causal
            # pattern's packed op, one node in the graph, where SDPA would split the batch on the host.
            return self.compiled(self.backend_for(q))(q, k, v, cu_seqlens=cu_seqlens)
        if self.pattern is None:
            if self.kv_heads != self.heads:
                group = self.heads // self.kv_heads
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            if cu_seqlens is not None:
                # Dense causal per sequence: SDPA has no packed form; empty sequences add no rows.
                spans = [(a, b) for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()) if b > a]
                return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                 is_causal=True) for a, b in spans], dim=2)
            if cache_seqlens is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            n_q, n_k = q.shape[2], cache_seqlens[0]
            # bottom-right causal: SDPA's is_causal aligns a short query block top-left
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            return F.scaled_dot_product_attention(q, k[:, :, :n_k], v[:, :, :n_k], attn_mask=keep)
        kwargs = {name: t for name, t in (("sinks", self.sinks), ("rel_bias", self.rel_bias)) if t is not None}
        if self.context_parallel is not None:
            return self.context_parallel(q, k, v, **kwargs).to(q.dtype)
        attn = self.compiled(self.backend_for(q))
        if cache_seqlens is not None:
            kwargs["cache_seqlens"] = cache_seqlens
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        return attn(q, k, v, **kwargs).to(q.dtype)  # strided views: the backends take any strides

    def backend_for(self, x: torch.Tensor) -> str:
        return choose_backend(self.backend, x)

    def compiled(self, backend: str):
        """The pattern compiled for one backend (shared by every layer with this pattern)."""
        return self._attentions[backend]


def _context_parallel(pattern, softcap, group, sharding: str):
    """The ``ContextParallelAttention`` of a layer, or a ValueError if it has
    no pattern (dense SDPA)."""
    if pattern is None:
        raise ValueError("context parallelism needs a pattern: pattern=None is SDPA's dense causal attention; "
                         "write pattern='causal'")
    from .distributed import ContextParallelAttention  # torch.distributed only for models that use it

    return ContextParallelAttention(pattern, group, sharding, softcap=softcap)


def check_unsharded_only(cache, cu_seqlens) -> None:
    """A context-parallel model runs whole sequences sharded across ranks: no cache, no packed batch."""
    if cache is not None or cu_seqlens is not None:
        raise ValueError("a context-parallel model takes neither a cache nor cu_seqlens: each rank passes "
                         "its shard of the sequences; decode and pack without context_parallel_group")


def check_packed_batch(batch: int, total: int, cu_seqlens, cache=None, traced: bool = False):
    """A packed batch's ``cu_seqlens`` as int64 numpy offsets (read on the host
    once, then passed to every layer), after checking that the batch is one
    row and that no cache is given. ``traced``: the tensor itself, as a
    compiled graph takes it (its values are checked by the attention op)."""
    from .backends.reference.checks import check_cu_seqlens

    if cache is not None:
        raise ValueError("cu_seqlens and a KV cache cannot be combined: a packed batch is a whole batch of "
                         "sequences; generate one sequence (or a batch of rows) at a time")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed into one row: the batch must be 1 "
                         f"((1, total) tokens or (1, total, dim) activations), got batch {batch}")
    if traced:
        return cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.as_tensor(np.asarray(cu_seqlens))
    return check_cu_seqlens(cu_seqlens, total)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: ir.Pattern, backend: str, softcap: float | None = None):
    # One compiled attention per (pattern, backend, softcap): layers and models
    # with the same pattern share its per-length layouts and its kernels.
    return compile_pattern(pattern, backend=backend, softcap=softcap)


class FeedForward(nn.Sequential):
    """``Linear(dim, hidden) -> GELU -> Linear(hidden, dim)``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__(nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias))

    @property
    def proj(self) -> nn.Linear:
        return self[2]


class SparseTransformerBlock(nn.Module):
    """The paper's pre-activation residual block (section 5.2), ``(B, n, dim)`` in and out::

        H + a(H) + b(H),  a(H) = dropout(attention(norm(H))),  b(H) = dropout(ff(norm(H + a(H))))

    ``depth_for_init`` is the number of blocks in the whole model: the output
    projections of attention and feed-forward start scaled by
    ``1 / sqrt(2 * depth_for_init)``. ``recompute=True`` keeps only the
    block's input and recomputes attention and feed-forward in the backward pass.
    """

    def __init__(self, dim: int, heads: int, pattern, *, mlp_ratio: float = 4, dropout: float = 0.0,
                 depth_for_init: int = 1, recompute: bool = False, kv_heads: int | None = None,
                 backend: str = "auto", bias: bool = True, head_dim: int | None = None,
                 init_std: float = 0.02, softcap: float | None = None, sinks: bool = False,
                 rel_bias_distance: int | None = None, context_parallel_group=None,
                 context_parallel_sharding: str = "contiguous"):
        super().__init__()
        if isinstance(depth_for_init, bool) or not isinstance(depth_for_init, int) or depth_for_init < 1:
            raise ValueError(f"depth_for_init must be a positive integer, got {depth_for_init!r}")
        self.recompute = recompute
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SparseSelfAttention(dim, heads, pattern, kv_heads=kv_heads, dropout=dropout,
                                        backend=backend, bias=bias, head_dim=head_dim, softcap=softcap,
                                        sinks=sinks, rel_bias_distance=rel_bias_distance,
                                        context_parallel_group=context_parallel_group,
                                        context_parallel_sharding=context_parallel_sharding)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, int(mlp_ratio * dim), bias=bias)
        self.ff_dropout = nn.Dropout(dropout)
        self.reset_parameters(init_std, depth_for_init)

    @property
    def pattern(self) -> ir.Pattern | None:
        return self.attn.pattern

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, depth_for_init: int = 1) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for term in (self.attn.sinks, self.attn.rel_bias):
            if term is not None:
                nn.init.zeros_(term)
        out_scale = 1.0 / math.sqrt(2 * depth_for_init)
        self.attn.proj.weight.mul_(out_scale)
        self.ff.proj.weight.mul_(out_scale)

    def forward(self, h: torch.Tensor, cache: "LayerCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """h ``(B, n, dim)``; ``cu_seqlens``: h ``(1, total, dim)`` is a packed batch."""
        if self.recompute and torch.is_grad_enabled() and cache is None:
            # Non-reentrant checkpoint; preserve_rng_state replays the dropout masks.
            return h + checkpoint(self.residual, h, None, cu_seqlens, use_reentrant=False, preserve_rng_state=True)
        return h + self.residual(h, cache, cu_seqlens)

    def residual(self, h: torch.Tensor, cache: "LayerCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """``a(H) + b(H)``, the paper's resblock."""
        a = self.attn(self.norm1(h), cache, cu_seqlens)  # dropout(attention(norm(H)))
        b = self.ff_dropout(self.ff(self.norm2(h + a)))  # dropout(ff(norm(H + a(H))))
        return a + b


class SparseTransformer(nn.Module):
    """A causal language model: ``forward(idx (B, n)) -> logits (B, n, vocab_size)``.

    Token embedding + learned position embedding, ``depth`` residual blocks,
    a final LayerNorm and a head (tied to the token embedding by default).
    ``patterns`` (one or a list; None for dense causal attention) are arranged
    over layers and heads by ``mode`` (see ``layer_patterns``); every pattern
    must be causal. ``softcap``, ``sinks`` and ``rel_bias_distance`` go to every
    layer (each layer learns its own sinks and bias).
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, patterns=None,
                 mode: str = "interleaved", max_len: int = 1024, recompute: bool = False,
                 dropout: float = 0.0, *, kv_heads: int | None = None, mlp_ratio: float = 4,
                 backend: str = "auto", bias: bool = True, head_dim: int | None = None,
                 tie_weights: bool = True, init_std: float = 0.02, softcap: float | None = None,
                 sinks: bool = False, rel_bias_distance: int | None = None, context_parallel_group=None,
                 context_parallel_sharding: str = "contiguous"):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("depth", depth), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        self.mode = mode
        self.max_len = max_len
        per_layer = layer_patterns(patterns, mode, depth, heads)
        for pattern in dict.fromkeys(p for p in per_layer if p is not None):
            check_causal(pattern, heads, min(max_len, CAUSAL_CHECK_LEN))

        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(dim, heads, p, mlp_ratio=mlp_ratio, dropout=dropout,
                                   depth_for_init=depth, recompute=recompute, kv_heads=kv_heads,
                                   backend=backend, bias=bias, head_dim=head_dim, init_std=init_std,
                                   softcap=softcap, sinks=sinks, rel_bias_distance=rel_bias_distance,
                                   context_parallel_group=context_parallel_group,
                                   context_parallel_sharding=context_parallel_sharding)
            for p in per_layer
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=init_std)
            nn.init.normal_(self.pos_emb.weight, mean=0.0, std=init_std)
            nn.init.normal_(self.head.weight, mean=0.0, std=init_std)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @property
    def layer_patterns(self) -> list[ir.Pattern | None]:
        """The pattern of each layer (None: dense causal)."""
        return [block.pattern for block in self.blocks]

    @property
    def recompute(self) -> bool:
        return all(block.recompute for block in self.blocks)

    @recompute.setter
    def recompute(self, value: bool) -> None:
        for block in self.blocks:
            block.recompute = value

    def forward(self, idx: torch.Tensor, cache: "KVCache | None" = None, cu_seqlens=None) -> torch.Tensor:
        """logits ``(B, n, vocab_size)`` of ``idx (B, n)``; with a ``cache``
        (``new_cache``), ``idx`` continues the tokens it holds, and is added to it.
        With ``cu_seqlens`` (int32 ``[S + 1]``, cumulative lengths from 0 to
        ``total``) ``idx (1, total)`` packs sequences: each attends only within
        itself and its positions count from its own start, so the logits are
        each sequence's own, concatenated."""
        B, n = idx.shape
        cp = self.blocks[0].attn.context_parallel
        if cp is not None:  # idx is this rank's shard: its tokens' positions are global
            check_unsharded_only(cache, cu_seqlens)
            n_global = cp.seq_len(n, idx.device)
            if n_global > self.max_len:
                raise ValueError(f"sequence length {n_global} is longer than the model's max_len={self.max_len}")
            pos = torch.as_tensor(cp.positions(n_global), device=idx.device)
        elif cu_seqlens is not None and _traced(idx):
            # Traced (torch.compile): cu_seqlens stays a tensor, whose values the attention op
            # checks when it runs; each token's position is found from it on the device.
            cu_seqlens = check_packed_batch(B, n, cu_seqlens, cache, traced=True)
            tokens = torch.arange(n, device=idx.device)
            cu = cu_seqlens.to(device=idx.device, dtype=torch.int64)
            pos = tokens - cu[torch.searchsorted(cu, tokens, right=True) - 1]  # (n,): within its sequence
        elif cu_seqlens is not None:
            cu_seqlens = check_packed_batch(B, n, cu_seqlens, cache)
            lengths = np.diff(cu_seqlens)
            if lengths.max() > self.max_len:
                s = int(lengths.argmax())
                raise ValueError(f"packed sequence {s} has {lengths[s]} tokens, more than the model's "
                                 f"max_len={self.max_len}")
            starts = torch.from_numpy(np.repeat(cu_seqlens[:-1], lengths)).to(idx.device)  # (n,): each token's start
            pos = torch.arange(n, device=idx.device) - starts
        else:
            start = 0 if cache is None else cache.length
            if start + n > self.max_len:
                raise ValueError(f"sequence length {start + n} is longer than the model's max_len={self.max_len}")
            pos = torch.arange(start, start + n, device=idx.device)
        h = self.tok_emb(idx) + self.pos_emb(pos)  # (B, n, dim)
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache.layer(i), cu_seqlens)
        if cache is not None:
            cache.length += n
        return self.head(self.norm(h))  # (B, n, vocab_size)

    def new_cache(self, batch: int, max_len: int | None = None) -> "KVCache":
        """An empty KV cache for ``batch`` sequences of up to ``max_len``
        tokens (default: the model's), on the model's device and dtype."""
        attn = self.blocks[0].attn
        weight = attn.qkv.weight
        return KVCache(len(self.blocks), batch, attn.kv_heads, max_len or self.max_len, attn.head_dim,
                       dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """``idx (B, n)`` followed by ``max_new_tokens`` sampled tokens.
        ``temperature=0`` is greedy; ``top_k`` keeps the k likeliest tokens.
        With ``use_cache`` the prompt is run once and every new token attends
        to the cached keys through the decode path; without, every step
        recomputes the whole sequence (the reference the cache must match)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if idx.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"{idx.shape[1]} prompt tokens + {max_new_tokens=} exceed max_len={self.max_len}")
        cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        step = idx
        for _ in range(max_new_tokens):
            logits = self(step, cache) if use_cache else self(idx)
            nxt = _sample(logits[:, -1, :].float(), temperature, top_k)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            step = nxt
        return idx

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        """Mean cross-entropy in nats of ``targets (B, n)`` given ``idx (B, n)``
        (divide by ln 2 for bits per token); ``cu_seqlens``: a packed batch."""
        logits = self(idx, cu_seqlens=cu_seqlens)  # (B, n, vocab_size)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------
# Generation: a KV cache and sampling
# ----------------------------------------------------------------------------


class LayerCache:
    """One layer's keys and values ``(B, Hkv, max_len, D)``, the first
    ``length`` positions valid (``length`` is the whole cache's, shared)."""

    def __init__(self, owner: "KVCache", k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    @property
    def length(self) -> int:
        return self.owner.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``n`` new positions after the valid ones; the whole buffers back."""
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"the cache holds {self.k.shape[2]} positions: {self.length} + {n} do not fit")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        return self.k, self.v


class KVCache:
    """Keys and values of every layer of a ``SparseTransformer`` for
    generation; ``length`` counts the tokens it holds (the model advances it)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype=torch.float32, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.length = 0
        self.layers = [LayerCache(self, torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device)) for _ in range(layers)]

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Next tokens ``(B, 1)`` from last-position logits ``(B, vocab)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
