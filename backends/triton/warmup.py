"""``patterncc warmup``: the stand-in kernels compiled ahead, on a GPU.

A new pattern's first calls run on the stand-in kernels (``standin.py``)
while its own compile; on a machine that has never compiled the stand-in's
own kernels, those compile first (three or four kernels, their launchers,
Triton's one-time work: seconds). ``warm`` makes that happen once, ahead
(``scripts/setup.sh`` runs it on a GPU), by running the stand-in on small
calls of the usual kinds; what it leaves is their kernels in Triton's cache.
"""

from __future__ import annotations

import torch

from patterncc import ir
from patterncc.scores import ScoreTerms

from .runtime import attend, load_bitmap_kernels
from .standin import StandIns


# The kinds of call whose stand-in kernels ``warm`` compiles by default: 16 query heads with as many
# KV heads and with a quarter of them (Triton compiles apart a head count or grouping of 1, one
# that is a multiple of 16, and any other), a pattern that ignores the head and one that reads it
# (the step lists per head), at the usual head dims; bf16, no score terms.
WARM_HEAD_DIMS = (64, 128)
WARM_HEADS = 16
WARM_PATTERNS = (ir.Causal() & ir.Local(100), ir.Cycle((ir.Causal(), ir.Causal() & ir.Local(100))))
TERMS = ("none", "softcap", "alibi", "sinks", "rel_bias")


def kv_heads_for(heads: int) -> list[int]:
    """The KV head counts warmed by default for ``heads`` query heads: as
    many, and a quarter of them where that divides (grouped heads)."""
    return [heads] + ([heads // 4] if heads % 4 == 0 else [])


def warm(head_dims=WARM_HEAD_DIMS, dtypes=("bfloat16",), terms=("none",), heads: int = WARM_HEADS,
         kv_heads=None, device="cuda") -> list[str]:
    """Compile the stand-in kernels for these kinds of call, so that a new
    pattern's first call on this machine finds them in Triton's cache (with
    their launchers and Triton's other one-time work) instead of compiling
    them first: one forward and backward of the stand-in per head dim,
    dtype, score term (``TERMS``: each alone, or ``"none"``), KV head count
    and kind of pattern (``WARM_PATTERNS``). The calls are small (256
    tokens); what they leave is the compiled kernels. Returns a line per
    call made."""
    for name in terms:
        if name not in TERMS:
            raise ValueError(f"unknown score term {name!r}: warm takes {', '.join(TERMS)}")
    kv_heads = kv_heads or kv_heads_for(heads)
    for hkv in kv_heads:
        if hkv < 1 or heads % hkv:
            raise ValueError(f"kv_heads={hkv} must divide heads={heads}")
    done = []
    n = 256
    for pattern in WARM_PATTERNS:
        standins = StandIns(pattern, None, load_bitmap_kernels)
        for D, dtype, hkv, term in ((D, dtype, h, t) for D in head_dims for dtype in dtypes for h in kv_heads
                                   for t in terms):
            kind = getattr(torch, dtype)
            q = torch.randn(1, heads, n, D, device=device, dtype=kind, requires_grad=True)
            k, v = (torch.randn(1, hkv, n, D, device=device, dtype=kind, requires_grad=True) for _ in range(2))
            call_terms = ScoreTerms(
                softcap=30.0 if term == "softcap" else None,
                alibi_slopes=torch.rand(heads, device=device) if term == "alibi" else None,  # fixed, as models hold them
                sinks=torch.zeros(heads, device=device, requires_grad=True) if term == "sinks" else None,
                rel_bias=torch.zeros(heads, 17, device=device, requires_grad=True) if term == "rel_bias" else None)
            o, lse = attend(q, k, v, None, standins.launches, call_terms)
            o.float().sum().backward()
            done.append(f"{pattern}: D={D} {dtype} {heads}:{hkv} heads, {term}")
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return done
