"""GPU timings of the Triton backend against FlexAttention and SDPA flash.

    from patterncc.backends.triton import bench
    print(bench.run(pattern, seq_lens=[16384], heads=16, head_dims=[64]))

For each (pattern, n, D), on the same random inputs (standard normal, never
zeros) and in one process: forward and forward+backward medians
(``triton.testing.do_bench(..., return_mode="median")``; with ``rounds`` > 1
every contender is timed once per round, back to back, and the median over
rounds is kept: see ``bench_case``) of

- patterncc (``TritonAttention``),
- FlexAttention, ``torch.compile``'d, with a BlockMask from
  ``create_block_mask`` (compiled) over the generated mask_mod,
- FlexAttention with the same-sparsity BlockMask built from our layout
  (``flex.to_flex_block_mask``: same blocks, FULL and PARTIAL alike),
- dense SDPA with the flash backend (``is_causal`` when the pattern is causal),

TFLOP/s counted on the computed blocks (``4 * B * H * D * block**2 * nnz``
forward, 2.5x that for the backward), ratios flex/patterncc and
sdpa/patterncc (> 1: patterncc is faster), the host layout build time against
``create_block_mask``'s, and the largest difference between patterncc's and
Flex's outputs.

This module holds what ``patterncc bench`` runs; the tile sweeps, resource
probes and first-call timings behind the performance record are in the
repository's ``bench/`` folder (``bench/probes.py``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from patterncc import ir

from .config import KernelConfig
from .runtime import TritonAttention

FLEX_BLOCK = 128  # FlexAttention's block size, and the sparsity the TFLOP/s are counted on
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Row:
    pattern: str
    n: int
    D: int
    H: int
    Hkv: int
    dtype: str
    density: float = math.nan
    ms: dict = field(default_factory=dict)  # "pcc fwd", "pcc fwd+bwd", "flex fwd", ...
    tflops: dict = field(default_factory=dict)
    layout_ms: float = math.nan
    block_mask_ms: float = math.nan
    max_diff: float = math.nan
    notes: list = field(default_factory=list)


def _bench(fn, grad_to_none=None, rep: int = 100, device="cuda") -> float:
    import triton.testing

    from patterncc import wait_for_kernels

    if device != "cuda":  # a dry run of the harness on the CPU (TRITON_INTERPRET=1): one timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()  # a pattern new to the machine runs its first calls on the stand-in kernels,
    wait_for_kernels()  # and the timed ones on its own
    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def _flex(device="cuda"):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device != "cuda":  # dry run: eager flex, uncompiled block masks
        return flex_attention, partial(create_block_mask, _compile=False)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    return torch.compile(flex_attention, dynamic=False), partial(create_block_mask, _compile=True)


def bench_case(pattern: ir.Pattern, name: str, n: int, *, heads: int = 16, kv_heads: int | None = None,
               head_dim: int = 64, batch: int = 1, dtype: str = "bfloat16", config: KernelConfig | None = None,
               flex: bool = True, sdpa: bool = True, rep: int = 100, device: str = "cuda",
               extras: bool = True, rounds: int = 1) -> Row:
    """One row: every contender on the same inputs (``device="cpu"`` under
    TRITON_INTERPRET=1 only checks that the harness runs). ``extras=False``
    leaves out the two diagnostic contenders (``pcc@128``, ``flex(layout)``).

    ``rounds`` > 1 times all contenders that many times over, one after the
    other in each round (in reverse order every other round), and keeps the
    median over rounds: two do_bench medians of the same call taken seconds
    apart differ by up to 8% on an H200, whatever the inputs' placement in
    memory, and one round's flex/pcc ratio by up to ~6% (PERFORMANCE.md,
    "Run-to-run spread"), so contenders timed back to back in one round
    compare under the same conditions; the per-round flex/pcc ratios go
    into the row's notes.

    Long for a reason: every contender is built and timed here on the same
    inputs, so that what is compared is visibly the same thing."""
    from . import flex as flex_interop

    H, Hkv, D, B = heads, kv_heads or heads, head_dim, batch
    dt = _DTYPES[dtype]
    row = Row(name, n, D, H, Hkv, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, n, D, device=device, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, n, D, device=device, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, n, D, device=device, dtype=dt, generator=g).requires_grad_()
    do = torch.randn(B, H, n, D, device=device, dtype=dt, generator=g)
    grads = [q, k, v]

    # -- patterncc: layout build (host), then kernels; at its default block (64) and at Flex's 128
    attn = TritonAttention(pattern, config=config)
    cfg = attn.config_for(D, dt)
    t0 = time.perf_counter()
    attn.layout(n, H, cfg.block)
    row.layout_ms = (time.perf_counter() - t0) * 1e3
    attn128 = TritonAttention(pattern, config=replace(cfg, block=FLEX_BLOCK))
    lay = attn128.layout(n, H, FLEX_BLOCK)  # the sparsity Flex runs at: FLOPs are counted on it
    heads_counted = 1 if lay.heads > 1 else H
    fwd_flops = 4.0 * B * heads_counted * D * FLEX_BLOCK**2 * lay.nnz
    row.density = lay.density
    o_pcc = attn(q, k, v)  # compile
    o_pcc.backward(do)
    contenders = []  # (who, forward, forward+backward, FLOPs): timed together at the end

    def contend(who, fwd, fwd_bwd, flops):
        fwd_bwd()  # compile (Flex's backward compiles on its first call) before anything is timed
        contenders.append((who, fwd, fwd_bwd, flops))

    contend("pcc", lambda: attn(q, k, v), lambda: attn(q, k, v).backward(do), fwd_flops)
    if extras and cfg.block != FLEX_BLOCK:
        contend("pcc@128", lambda: attn128(q, k, v), lambda: attn128(q, k, v).backward(do), fwd_flops)

    # -- patterncc with its plan (what pcc.compile runs): only when the plan reorders
    from patterncc.attention import Attention

    planned = Attention(pattern, backend="triton", config=config, dense_sdpa=False)
    t0 = time.perf_counter()
    plan = planned.impl("triton").plan(n, H)
    plan_ms = (time.perf_counter() - t0) * 1e3
    if plan.strategy == "planned":
        o_plan = planned(q, k, v)  # compile every component's kernels
        o_plan.backward(do)
        diff = (o_plan.float() - o_pcc.float()).abs().max().item()
        row.notes.append(f"plan vs natural order: max abs diff {diff:.3g}")
        contend("plan", lambda: planned(q, k, v), lambda: planned(q, k, v).backward(do), fwd_flops)
        row.notes.append(f"plan: {len(plan.components)} components, {plan.computed_blocks} blocks of "
                         f"{plan.block} vs {plan.natural_blocks} natural, built in {plan_ms:.0f} ms")

    # -- FlexAttention: create_block_mask over the generated mask_mod, and our layout's BlockMask
    if flex:
        try:
            flex_attention, create_block_mask = _flex(device)
            mask_mod = flex_interop.mask_mod(pattern, n, device)
            head_arg = H if lay.heads > 1 else None
            create_block_mask(mask_mod, None, head_arg, n, n, device=device, BLOCK_SIZE=FLEX_BLOCK)  # compile
            _sync(device)
            t0 = time.perf_counter()
            bm = create_block_mask(mask_mod, None, head_arg, n, n, device=device, BLOCK_SIZE=FLEX_BLOCK)
            _sync(device)
            row.block_mask_ms = (time.perf_counter() - t0) * 1e3
            gqa = dict(enable_gqa=True) if Hkv != H else {}
            o_flex = flex_attention(q, k, v, block_mask=bm, **gqa)
            row.max_diff = (o_flex.float() - o_pcc.float()).abs().max().item()
            contend("flex", lambda: flex_attention(q, k, v, block_mask=bm, **gqa),
                  lambda: flex_attention(q, k, v, block_mask=bm, **gqa).backward(do), fwd_flops)
            bm_layout = flex_interop.to_flex_block_mask(lay, pattern, device=device, mask_mod_fn=mask_mod)
            if extras:
                contend("flex(layout)", lambda: flex_attention(q, k, v, block_mask=bm_layout, **gqa),
                      lambda: flex_attention(q, k, v, block_mask=bm_layout, **gqa).backward(do), fwd_flops)
        except Exception as err:  # a table with a note beats no table
            row.notes.append(f"flex failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")

    # -- dense SDPA, flash backend
    if sdpa:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.nn.functional import scaled_dot_product_attention as sdpa_fn

            causal = ir.within_causal(pattern)
            extra = dict(enable_gqa=True) if Hkv != H else {}
            dense_flops = 4.0 * B * H * D * n * n * (0.5 if causal else 1.0)

            def fwd():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return sdpa_fn(q, k, v, is_causal=causal, **extra)

            contend("sdpa", fwd, lambda: fwd().backward(do), dense_flops)
            if not causal:
                row.notes.append("sdpa dense (not causal)")
        except Exception as err:
            row.notes.append(f"sdpa failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    _time_rounds(row, contenders, grads, rounds=rounds, rep=rep, device=device)
    return row


def _sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_rounds(row: Row, contenders, grads, rounds: int, rep: int, device: str) -> None:
    """Median ms over ``rounds`` of each contender's forward and forward+backward
    medians; with more than one round, the per-round flex/pcc ratios as a note.
    A contender whose timing raises (out of memory, say) leaves the row with a
    note, as a failed compile does, and the others are still timed."""
    times = {}  # "who mode" -> one median per round
    failed = set()
    for r in range(rounds):
        for who, fwd, fwd_bwd, _ in contenders[::-1] if r % 2 else contenders:
            if who in failed:
                continue
            try:
                ms_f = _bench(fwd, rep=rep, device=device)
                ms_fb = _bench(fwd_bwd, grad_to_none=grads, rep=rep, device=device)
            except Exception as err:
                failed.add(who)
                row.notes.append(f"{who} timing failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                continue
            times.setdefault(f"{who} fwd", []).append(ms_f)
            times.setdefault(f"{who} fwd+bwd", []).append(ms_fb)
    for who, _, _, flops in contenders:
        if who in failed:
            continue
        for mode, work in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
            ms = statistics.median(times[f"{who} {mode}"])
            row.ms[f"{who} {mode}"], row.tflops[f"{who} {mode}"] = ms, work / ms * 1e-9
    if rounds > 1 and "flex" not in failed and "pcc" not in failed and "flex fwd" in times:
        for mode in ("fwd", "fwd+bwd"):
            per_round = [f / p for f, p in zip(times[f"flex {mode}"], times[f"pcc {mode}"])]
            row.notes.append(f"flex/pcc {mode} per round: " + ", ".join(f"{x:.3f}" for x in per_round))


def markdown(rows: list[Row]) -> str:
    """One markdown table: median ms (TFLOP/s counted on the block-128 layout),
    and ratios (> 1: patterncc faster). ``pcc`` runs the kernels in natural
    order at their default block (64), ``pcc@128`` at Flex's block, on exactly
    Flex's sparsity; ``plan`` is what ``pcc.compile`` runs: the planner's
    components (only when it reorders)."""
    who = ("pcc", "pcc@128", "plan", "flex", "flex(layout)", "sdpa")
    head = ("| pattern | n | D | density@128 | "
            + " | ".join(f"{w} fwd" for w in who) + " | " + " | ".join(f"{w} f+b" for w in who)
            + " | flex/pcc fwd, f+b | sdpa/pcc fwd, f+b | flex/plan fwd, f+b | sdpa/plan fwd, f+b "
            "| layout ms | create_block_mask ms | max abs diff vs flex | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(row, key):
        ms = row.ms.get(key)
        if ms is None:
            return "-"
        return f"{ms:.3f} ({row.tflops[key]:.0f})"

    def ratio(row, other, mode, ours="pcc"):
        a, b = row.ms.get(f"{other} {mode}"), row.ms.get(f"{ours} {mode}")
        return f"{a / b:.2f}" if a and b else "-"

    for r in rows:
        cells = [cell(r, f"{w} {mode}") for mode in ("fwd", "fwd+bwd") for w in who]
        lines.append(
            f"| {r.pattern} | {r.n} | {r.D} | {r.density:.3f} | " + " | ".join(cells)
            + f" | {ratio(r, 'flex', 'fwd')}, {ratio(r, 'flex', 'fwd+bwd')} "
            f"| {ratio(r, 'sdpa', 'fwd')}, {ratio(r, 'sdpa', 'fwd+bwd')} "
            f"| {ratio(r, 'flex', 'fwd', 'plan')}, {ratio(r, 'flex', 'fwd+bwd', 'plan')} "
            f"| {ratio(r, 'sdpa', 'fwd', 'plan')}, {ratio(r, 'sdpa', 'fwd+bwd', 'plan')} "
            f"| {r.layout_ms:.1f} | {r.block_mask_ms:.1f} | {r.max_diff:.3g} | {'; '.join(r.notes)} |")
    return "\n".join(lines)


def run(pattern: ir.Pattern, seq_lens=(4096, 16384), heads: int = 16, kv_heads: int | None = None,
        head_dims=(64,), batch: int = 1, dtype: str = "bfloat16", name: str | None = None, **options) -> str:
    """The markdown table for one pattern over lengths and head dims (``patterncc bench``)."""
    name = name or str(pattern)
    rows = [bench_case(pattern, name, n, heads=heads, kv_heads=kv_heads, head_dim=D, batch=batch,
                       dtype=dtype, **options)
            for D in head_dims for n in seq_lens]
    return markdown(rows)
