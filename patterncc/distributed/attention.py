"""Context-parallel attention: each rank holds a shard of the sequence.

``cp = ContextParallelAttention(pattern, group)``; on every rank
``o_local = cp(q_local, k_local, v_local)`` with that rank's shard of
``[B, H, n, D]`` tensors (``cp.shard(x)`` cuts it). Each call

1. learns ``n`` from every rank's local length (a small all_gather, which
   also makes every rank raise when any rank's inputs are wrong);
2. starts gathering the keys and values its queries need from their owners
   (``exchange``: only what the pattern reads, in one message per peer);
3. while they travel, computes its queries against its own keys, then,
   once they have arrived, against the others', and merges the two by
   log-sum-exp (the sink, if any, joins there). Each part applies the
   pattern's exact element mask and score terms at absolute positions as
   a masked softmax in float32 (float64 for float64 inputs), in chunks of
   query rows against the keys their blocks reach in the layout (a
   window's chunk reads about ``w`` keys, not the whole shard), each
   recomputed in the backward pass so memory stays bounded. The own part
   of a rank holding one run of positions under a pattern of ``q - k``
   alone is instead one call of patterncc's attention on the shard
   (``_own_part``): the generated kernels on the GPU.

Gradients flow through plain autograd in step 3 and through the exchange's
backward, which returns dK/dV rows to the ranks that own them, overlapped
too: the remote part's backward starts the transfer, the own part's
backward runs while it travels, and the received gradients are added last
(``exchange.arriving``). The result
is the single-process attention of the whole sequence, sharded: a row with
no allowed key gives ``o = 0`` and ``lse = -inf``, with zero gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .. import ir
from ..backends.reference.checks import check_scale
from ..blocklayout.evaluation import depends_on
from ..masks import evaluate
from ..lru import LRU
from ..pipeline import as_pattern
from ..scores import ScoreTerms, check_terms
from ..scores import alibi_slopes as standard_alibi_slopes
from . import sharding as sh
from .exchange import Exchange, Returning, arriving, exchange_plan, remote_kv

# Mask elements (bools) kept per exchange plan between calls: a training
# loop at one length evaluates its masks once.
MASK_CACHE_ELEMENTS = 2**26
# Exchange plans kept per instance, one per (n, heads, device) seen most recently.
_PLANS_KEPT = 8
OWN_PART_WAYS = ("auto", "attention", "chunks")


class ContextParallelAttention:
    """``ContextParallelAttention(pattern, group=None, sharding="contiguous", *,
    block=64, scale=None, softcap=None)``; call as ``cp(q_local, k_local,
    v_local, return_lse=False, *, alibi_slopes=None, sinks=None, rel_bias=None)``.

    ``q_local`` ``[B, H, n_local, D]``, ``k_local``, ``v_local`` ``[B, Hkv,
    n_local, D]`` (``Hkv`` divides ``H``): this rank's shard (``shard``).
    Returns this rank's shard of ``o`` (and of ``lse`` ``[B, H, n_local]``,
    float32, or float64 for float64 inputs). ``block`` is the layout block
    at which the needed keys are found; ``scale`` defaults to ``1/sqrt(D)``.
    Score terms mean what they mean for ``pcc.compile``: the pattern's
    ``softcap``/``alibi`` (``softcap=`` replaces the pattern's), and per call
    ``alibi_slopes``, ``sinks`` ``[H]`` and ``rel_bias`` ``[H, 2M + 1]``; the
    gradient a rank gets for those tensors is its queries' share (sum it over
    the group, as for any replicated parameter).
    ``own_part``: how a rank attends to its own keys where its positions
    are one run and the pattern reads ``q - k`` alone: ``"attention"``,
    patterncc's attention on the shard (the generated kernels on the GPU,
    the reference elsewhere); ``"chunks"``, the masked chunks every other
    part uses; ``"auto"`` (default), the first on the GPU and the second
    elsewhere.
    ``last_bytes_sent`` / ``last_bytes_sent_backward``: what this rank sent
    in the last call's exchange and its backward; ``last_own_part``: how the
    last call computed its queries against its own keys, ``"attention"``
    (patterncc's attention on the shard) or ``"chunks"`` (masked chunks)."""

    def __init__(self, pattern, group=None, sharding: str = "contiguous", *, block: int = 64, scale=None,
                 softcap: float | None = None, own_part: str = "auto"):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ContextParallelAttention needs torch.distributed initialised: "
                               "call torch.distributed.init_process_group() first (torchrun sets it up)")
        self.mask_pattern, self.pattern_terms = ir.split_terms(as_pattern(pattern))
        self.softcap = ir.check_softcap(softcap) if softcap is not None else self.pattern_terms.softcap
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block=}")
        self.sharding = sh.check_sharding(sharding)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the group given to ContextParallelAttention")
        if scale is not None:
            check_scale(scale, 1)
        if own_part not in OWN_PART_WAYS:
            raise ValueError(f"{own_part=} is not one of {', '.join(map(repr, OWN_PART_WAYS))}")
        self.block = block
        self.scale = scale
        self.own_part = own_part
        self._plans = LRU(_PLANS_KEPT)  # (n, heads, device) -> Exchange
        self._own = LRU(_PLANS_KEPT)  # n -> the own part's compiled attention (its backend per call)
        self.last_own_part: str | None = None  # how the last call computed the own part (_own_part)
        self._last: Exchange | None = None

    def __repr__(self) -> str:
        return (f"ContextParallelAttention({ir.source(self.mask_pattern)!r}, sharding={self.sharding!r}, "
                f"rank={self.rank}, world_size={self.world_size})")

    @property
    def last_bytes_sent(self) -> int:
        return self._last.bytes_sent if self._last else 0

    @property
    def last_bytes_sent_backward(self) -> int:
        return self._last.bytes_sent_backward if self._last else 0

    def positions(self, seq_len: int) -> np.ndarray:
        """int64: the absolute positions this rank holds out of ``seq_len``."""
        return sh.positions(seq_len, self.world_size, self.rank, self.sharding)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``x [B, H, n, D]``."""
        return sh.shard(x, self.world_size, self.rank, self.sharding)

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's shard (a collective: every rank calls it)."""
        return sh.unshard(x_local, self.group, self.sharding)

    def __call__(self, q, k, v, return_lse: bool = False, *, alibi_slopes=None, sinks=None, rel_bias=None):
        try:  # before the first collective, so that every rank hears of a problem on any
            check_tensors(q, k, v)
            ir.check_heads(self.mask_pattern, q.shape[1])
            terms = self._terms(q.shape[1], q.device, alibi_slopes, sinks, rel_bias)
        except (TypeError, ValueError):
            self._agree(None, getattr(q, "device", None))
            raise
        B, H, n_local, D = q.shape
        n = self._agree(n_local, q.device)
        exchange = self._exchange(n, H, q.device)
        returning = Returning()
        k, v = arriving(k, v, exchange, returning)  # first: in the backward pass it runs last, after the own part
        flight = exchange.start(k, v)  # every rank takes part, even with nothing to send
        qpos = self.positions(n)
        scale = check_scale(self.scale, D)
        heads = head_patterns(ir.bind(self.mask_pattern, n), H)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        part_terms = ScoreTerms(terms.softcap, terms.alibi_slopes, None, terms.rel_bias)  # the sink joins once
        o_own, lse_own = self._own_part(q, k, v, qpos, exchange, heads, n, scale, part_terms, compute)
        kr, vr = remote_kv(exchange, flight, k, v, returning)  # (B, Hkv, M_remote, D): waits for the transfer
        o_rem, lse_rem = local_attention(q, kr, vr, qpos, *exchange.remote, heads, n, scale, part_terms,
                                         exchange.masks.setdefault("remote", {}), compute)
        o, lse = merge_parts([(o_own, lse_own), (o_rem, lse_rem)], terms.sinks)
        return (o.to(q.dtype), lse) if return_lse else o.to(q.dtype)

    def _own_part(self, q, k, v, qpos, exchange, heads, n, scale, terms: ScoreTerms, compute):
        """The rank's queries against its own keys. Where the rank holds one
        run of positions and the pattern reads only ``q - k`` (causal, local,
        stride, dilated, band and their combinations, per head), that block
        of the attention matrix is the pattern on a sequence of the shard's
        length, and so one call of patterncc's own attention (the generated
        kernels on the GPU, planned as for one device; the reference on the
        CPU); otherwise ``local_attention``'s masked chunks."""
        attn = self._diagonal_attention(n, qpos, q) if heads_read_only_differences(heads) else None
        self.last_own_part = "chunks" if attn is None else "attention"
        if attn is not None:
            o, lse = attn(q, k, v, scale=scale, return_lse=True, alibi_slopes=terms.alibi_slopes,
                          rel_bias=terms.rel_bias)
            return o.to(compute), lse.to(compute)
        own = exchange.send[self.rank]
        return local_attention(q, k.index_select(2, own), v.index_select(2, own), qpos, *exchange.own, heads, n,
                               scale, terms, exchange.masks.setdefault("own", {}), compute)

    def _diagonal_attention(self, n: int, qpos: np.ndarray, q):
        """The compiled attention for the own part at length ``n`` (cached), or
        None where ``own_part`` says chunks (``"auto"`` off the GPU: there the
        float32 chunks are about ten times faster than the float64
        reference), the rank's positions are not one run, or no backend
        takes these inputs (float64 on the GPU: the generated kernels
        compute in float32 at most)."""
        if self.own_part == "chunks" or (self.own_part == "auto" and not q.is_cuda):
            return None
        if qpos.size == 0 or int(qpos[-1] - qpos[0]) + 1 != qpos.size:
            return None
        if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        if n not in self._own:
            from ..attention import Attention

            # backend "auto": the generated kernels for CUDA tensors, the reference otherwise
            self._own[n] = Attention(ir.bind(self.mask_pattern, n), softcap=self.softcap)
        return self._own[n]

    def seq_len(self, n_local: int, device=None) -> int:
        """The whole sequence's length, from every rank's ``n_local`` (a
        collective: every rank calls it), checked against the sharding."""
        return self._agree(n_local, device)

    def _agree(self, n_local: int | None, device) -> int | None:
        """Every rank's local length (``None``: this rank's inputs are wrong),
        so that all ranks raise together: the whole length, or a ValueError
        naming the ranks with wrong inputs or a length the sharding cannot give."""
        lengths = sh.gather_lengths(-1 if n_local is None else n_local, self.group, device)
        if n_local is None:
            return None
        wrong = [r for r, length in enumerate(lengths) if length < 0]
        if wrong:
            raise ValueError(f"the inputs of rank{'s' * (len(wrong) > 1)} {', '.join(map(str, wrong))} are wrong "
                             f"(that rank's own error says how), so every rank stops")
        return sh.seq_len_from(lengths, self.world_size, self.sharding)

    def _terms(self, H: int, device, alibi_slopes, sinks, rel_bias) -> ScoreTerms:
        terms = check_terms(ScoreTerms(self.softcap, alibi_slopes, sinks, rel_bias), H, device)
        if terms.alibi_slopes is None and self.pattern_terms.alibi:  # float32 values, as every backend takes them
            slopes = torch.tensor(standard_alibi_slopes(H), dtype=torch.float32, device=device)
            terms = ScoreTerms(terms.softcap, slopes, terms.sinks, terms.rel_bias)
        return terms

    def _exchange(self, n: int, heads: int, device: torch.device) -> Exchange:
        key = (n, heads, device)
        if key not in self._plans:
            plan = exchange_plan(self.mask_pattern, n, heads, self.world_size, self.rank, self.sharding, self.block)
            self._plans[key] = Exchange(plan, self.group, device)
        self._last = self._plans[key]
        return self._last


def check_tensors(q, k, v) -> None:
    """TypeError/ValueError naming the argument unless q ``[B, H, n_local, D]``
    and k, v ``[B, Hkv, n_local, D]`` are floating-point tensors of one dtype
    and device with ``Hkv`` dividing ``H``."""
    for name, x in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, n_local, D] (4 dims), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"q_local, k_local and v_local must share one dtype and device, got q_local "
                            f"{q.dtype} on {q.device} and {name} {x.dtype} on {x.device}")
    if k.shape != v.shape:
        raise ValueError(f"k_local and v_local must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, nq, D), (Bk, Hkv, nk, Dk) = q.shape, k.shape
    if (Bk, nk, Dk) != (B, nq, D):
        raise ValueError(f"k_local {tuple(k.shape)} must match q_local {tuple(q.shape)} in batch, local "
                         f"length and head dim (dims 0, 2, 3)")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q_local's heads H={H} must be a multiple of k_local's heads Hkv={Hkv}")


def heads_read_only_differences(heads) -> bool:
    """Whether every head's pattern depends on ``q - k`` alone (``head_patterns``' result)."""
    return all(depends_on(p) == "d" for p in heads[0])


def head_patterns(bound: ir.Pattern, heads: int) -> tuple[list[ir.Pattern], list[int]]:
    """The distinct head-free patterns, and for each head the index of its own."""
    distinct: dict[ir.Pattern, int] = {}
    index = [distinct.setdefault(ir.for_head(bound, h), len(distinct)) for h in range(heads)]
    return list(distinct), index


def local_attention(q, kg, vg, qpos: np.ndarray, kpos: np.ndarray, chunks: np.ndarray, heads, n: int,
                    scale: float, terms: ScoreTerms = ScoreTerms(), cache: dict | None = None, dtype=None):
    """``q [B, H, nq, D]`` at positions ``qpos`` against the gathered ``kg``,
    ``vg [B, Hkv, M, D]`` at ``kpos``, chunk by chunk (``ExchangePlan.chunks``:
    rows ``r0:r1`` against keys ``a:b``): ``(o [B, H, nq, D] in ``dtype``
    (default q's), lse [B, H, nq])``, differentiable (in the terms' tensors too). Under
    autograd each chunk is recomputed in the backward pass rather than
    stored, so memory stays one chunk's scores whatever the length.
    ``cache``: a dict kept with the exchange plan, where chunks' masks are
    kept between calls up to ``MASK_CACHE_ELEMENTS``."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc, vc = kg.to(compute), vg.to(compute)
    patterns, index = heads
    tensors = (terms.alibi_slopes, terms.sinks, terms.rel_bias)
    recompute = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, kg, vg, *tensors))
    outs, lses = [], []
    cache = {} if cache is None else cache
    for r0, r1, a, b in chunks.tolist():  # a rank with no queries has one empty chunk: it joins the backward
        mask = cache.get((r0, a))
        if mask is None:
            mask = chunk_mask(patterns, index, qpos[r0:r1], kpos[a:b], n, q.device)
            if cache.get("elements", 0) + mask.numel() <= MASK_CACHE_ELEMENTS:
                cache[(r0, a)], cache["elements"] = mask, cache.get("elements", 0) + mask.numel()
        diff = None
        if terms.alibi_slopes is not None or terms.rel_bias is not None:
            diff = torch.as_tensor(qpos[r0:r1, None] - kpos[None, a:b], device=q.device)  # (rows, keys): q - k
        args = (q[:, :, r0:r1].to(compute), kc[:, :, a:b], vc[:, :, a:b], mask, diff, scale, terms.softcap, *tensors)
        o, lse = checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2).to(dtype or q.dtype), torch.cat(lses, dim=2)


def merge_parts(parts, sinks=None):
    """``(o, lse)`` of attention over the union of disjoint key sets, from
    each set's ``(o, lse)`` (and a sink logit per head ``[H]`` joining the
    denominators with no value): differentiable, and exact where every part
    is empty (o = 0, lse = -inf, zero gradients, never NaN)."""
    lses = [lse for _, lse in parts]
    if sinks is not None:
        lses.append(sinks.to(lses[0].dtype).view(1, -1, 1).expand_as(lses[0]))
    stacked = torch.stack(lses)
    m = stacked.amax(0).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    total = torch.exp(stacked - m).sum(0)
    some = total > 0
    lse = torch.where(some, m + torch.log(torch.where(some, total, 1.0)), -math.inf)
    base = torch.where(some, lse, 0.0)
    o = sum(o * torch.exp(part_lse - base).unsqueeze(-1) for o, part_lse in parts)
    return o, lse


def chunk_mask(patterns, index, qpos: np.ndarray, kpos: np.ndarray, n: int, device) -> torch.Tensor:
    """bool ``(H, rows, keys)``, or ``(1, rows, keys)`` when every head
    shares one pattern: which of these queries may attend to these keys."""
    # writable (a broadcast result is not, and torch warns on those)
    masks = [torch.as_tensor(np.require(evaluate(p, qpos[:, None], kpos[None, :], n), requirements="W"),
                             device=device) for p in patterns]
    return masks[0][None] if len(masks) == 1 else torch.stack([masks[i] for i in index])


def _chunk(q, k, v, mask, diff, scale, softcap, slopes, sinks, bias):
    """Masked softmax attention of ``q [B, H, rows, D]`` against ``k``, ``v``
    ``[B, Hkv, keys, D]`` (one compute dtype): ``(o, lse)``; a row with no
    allowed key (and no sink) gives ``o = 0``, ``lse = -inf``."""
    B, H, rows, D = q.shape
    Hkv, keys = k.shape[1], k.shape[2]
    G = H // Hkv  # query heads per kv head: head h reads kv head h // G
    per_head = lambda t: None if t is None else t.to(q.dtype).view(1, H, 1, 1)  # noqa: E731
    slopes, sinks = per_head(slopes), per_head(sinks)
    s = torch.einsum("bkgqd,bkmd->bkgqm", q.view(B, Hkv, G, rows, D), k).reshape(B, H, rows, keys) * scale
    s = score_terms(s, diff, softcap, slopes, None if bias is None else bias.to(q.dtype))
    s = torch.where(mask, s, -math.inf)
    m = s.amax(-1, keepdim=True) if keys else s.new_full((B, H, rows, 1), -math.inf)
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m = m.detach()
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows with no allowed key: exp(-inf) stays 0
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if sinks is not None:  # the sink joins the denominator and adds no value
        l = l + torch.exp(sinks - m)
    allowed = l > 0
    l_safe = torch.where(allowed, l, 1.0)
    o = torch.einsum("bkgqm,bkmd->bkgqd", p.view(B, Hkv, G, rows, keys), v).reshape(B, H, rows, D)
    return o / l_safe, torch.where(allowed, m + torch.log(l_safe), -math.inf).squeeze(-1)


def score_terms(s, diff, softcap, slopes, bias):
    """The scores the softmax sees, from ``s = scale * q.k`` ``(B, H, rows,
    M)`` and ``diff = q - k`` at absolute positions: softcap, then alibi,
    then the relative bias (the reference's order)."""
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        s = s - slopes * diff.abs()
    if bias is not None:
        reach = (bias.shape[1] - 1) // 2
        s = s + bias[:, diff.clamp(-reach, reach) + reach]  # (H, rows, M)
    return s
