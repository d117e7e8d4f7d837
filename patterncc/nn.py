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
  ``.pat`` file (a ``str`` ending in ``.pat`` or an ``os.PathLike``).
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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ir
from .pipeline import as_pattern, compile as compile_pattern, load, mask

__all__ = [
    "MODES",
    "SparseSelfAttention",
    "SparseTransformer",
    "SparseTransformerBlock",
    "check_causal",
    "layer_patterns",
    "resolve_pattern",
]

BACKENDS = ("auto", "reference", "triton")
MODES = ("interleaved", "merged", "multihead")

# Causality is checked on a dense mask of this many positions (or max_len, if
# smaller): large enough to see the structure of patterns with periods in the
# hundreds, small enough to cost milliseconds.
CAUSAL_CHECK_LEN = 512


# ----------------------------------------------------------------------------
# Patterns given as objects, source text, or files
# ----------------------------------------------------------------------------


def resolve_pattern(pattern) -> ir.Pattern | None:
    """A pattern object, ``.pat`` source text, or a ``.pat`` path -> IR (None stays None)."""
    if pattern is None or isinstance(pattern, ir.Pattern):
        return pattern
    if isinstance(pattern, os.PathLike):
        return load(pattern)
    if isinstance(pattern, str):
        text = pattern.strip()
        if text.endswith(".pat") and "\n" not in text:
            if not Path(text).is_file():
                raise FileNotFoundError(f"pattern file {text!r} does not exist")
            return load(text)
        return as_pattern(pattern)
    raise TypeError(
        f"expected a pattern, pattern source text or a .pat path, got {type(pattern).__name__}"
    )


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
    is dense causal attention (SDPA).
    """

    def __init__(self, dim: int, heads: int, pattern, *, kv_heads: int | None = None,
                 dropout: float = 0.0, backend: str = "auto", bias: bool = True,
                 head_dim: int | None = None):
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
        # Compiled here, not in forward: torch.compile then traces no compiling
        # and finds one attention op per call.
        self._attentions = {} if self.pattern is None else {b: _compiled(self.pattern, b) for b in BACKENDS[1:]}
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        pattern = "dense causal (sdpa)" if self.pattern is None else f"`{self.pattern}`"
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, pattern={pattern}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, n, H, D).transpose(1, 2)  # (B, H, n, D)
        k = k.view(B, n, Hkv, D).transpose(1, 2)  # (B, Hkv, n, D)
        v = v.view(B, n, Hkv, D).transpose(1, 2)  # (B, Hkv, n, D)
        o = self.attend(q, k, v)  # (B, H, n, D)
        o = o.transpose(1, 2).reshape(B, n, H * D)
        return self.dropout(self.proj(o))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``(B, H, n, D)``, k and v ``(B, Hkv, n, D)`` -> ``(B, H, n, D)``."""
        if self.pattern is None:
            if self.kv_heads != self.heads:
                group = self.heads // self.kv_heads
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = self.compiled(self.backend_for(q))
        return attn(q, k, v).to(q.dtype)  # strided views: the backends take any strides

    def backend_for(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if x.device.type == "cuda" else "reference"

    def compiled(self, backend: str):
        """The pattern compiled for one backend (shared by every layer with this pattern)."""
        return self._attentions[backend]


@functools.lru_cache(maxsize=64)
def _compiled(pattern: ir.Pattern, backend: str):
    # One compiled attention per (pattern, backend): layers and models with the
    # same pattern share its per-length layouts and its kernels.
    return compile_pattern(pattern, backend=backend)


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
                 init_std: float = 0.02):
        super().__init__()
        if isinstance(depth_for_init, bool) or not isinstance(depth_for_init, int) or depth_for_init < 1:
            raise ValueError(f"depth_for_init must be a positive integer, got {depth_for_init!r}")
        self.recompute = recompute
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SparseSelfAttention(dim, heads, pattern, kv_heads=kv_heads, dropout=dropout,
                                        backend=backend, bias=bias, head_dim=head_dim)
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
        out_scale = 1.0 / math.sqrt(2 * depth_for_init)
        self.attn.proj.weight.mul_(out_scale)
        self.ff.proj.weight.mul_(out_scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            # Non-reentrant checkpoint; preserve_rng_state replays the dropout masks.
            return h + checkpoint(self.residual, h, use_reentrant=False, preserve_rng_state=True)
        return h + self.residual(h)

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """``a(H) + b(H)``, the paper's resblock."""
        a = self.attn(self.norm1(h))  # dropout(attention(norm(H)))
        b = self.ff_dropout(self.ff(self.norm2(h + a)))  # dropout(ff(norm(H + a(H))))
        return a + b


class SparseTransformer(nn.Module):
    """A causal language model: ``forward(idx (B, n)) -> logits (B, n, vocab_size)``.

    Token embedding + learned position embedding, ``depth`` residual blocks,
    a final LayerNorm and a head (tied to the token embedding by default).
    ``patterns`` (one or a list; None for dense causal attention) are arranged
    over layers and heads by ``mode`` (see ``layer_patterns``); every pattern
    must be causal.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, patterns=None,
                 mode: str = "interleaved", max_len: int = 1024, recompute: bool = False,
                 dropout: float = 0.0, *, kv_heads: int | None = None, mlp_ratio: float = 4,
                 backend: str = "auto", bias: bool = True, head_dim: int | None = None,
                 tie_weights: bool = True, init_std: float = 0.02):
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
                                   backend=backend, bias=bias, head_dim=head_dim, init_std=init_std)
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, n = idx.shape
        if n > self.max_len:
            raise ValueError(f"sequence length {n} is longer than the model's max_len={self.max_len}")
        pos = torch.arange(n, device=idx.device)
        h = self.tok_emb(idx) + self.pos_emb(pos)  # (B, n, dim)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))  # (B, n, vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats of ``targets (B, n)`` given ``idx (B, n)``
        (divide by ln 2 for bits per token)."""
        logits = self(idx)  # (B, n, vocab_size)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
