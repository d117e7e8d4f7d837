"""Kernel experiments on one GPU: variants of the forward, per-kernel backward tiles.

    python bench/kernel_experiments.py fwd [--head-dim 64 128] [--seq-len 16384]
    python bench/kernel_experiments.py bwd [--head-dim 128] [--seq-len 16384]

``fwd``: the generated forward kernel and variants of its inner loop, each
made by editing the generated module's text (so the production template is
untouched until a variant wins), timed side by side on the same inputs and
checked against the unedited kernel's output:

- ``base``: the kernel as generated;
- ``i32addr``: per-step int32 row offsets (the backward variant of that
  name; on the current template);
- ``run``: a FULL step list that is one contiguous run (causal and banded
  patterns) read as ``first + i``: no step-index load in the loop;
- ``run+ptr``: ``run``, with K and V pointers advanced by one step per
  iteration instead of recomputed from the step index;
- ``run+ffma``: ``run``, with the softmax scale folded into the exp2's
  argument (one fused multiply-add per score);
- ``tma``, ``tma+run``: K and V of FULL steps loaded through host-built
  TMA descriptors (Hopper's bulk copy engine), PARTIAL steps as before.

``bwd``: the dK/dV and dQ kernels timed alone (not as one backward) over
tile, warp and stage candidates, so each kernel gets its own best; then the
default tiles' two kernels in sequence and on two streams (``--pairs``: other
tile sets too); ``--bwd-variants base i32addr tma``: each kernel of those
tiles with the current template, with per-step int32 row offsets (the
``_step_rows`` edit below) and with dK/dV reading Q and dO through tensor
descriptors, gradients checked against ``base``. Since session 6 the
template's backward takes int32 offsets itself (ADDR32), so ``i32addr``
differs from ``base`` in the forward only (``fwd --variants i32addr``):

    python bench/kernel_experiments.py bwd --patterns "sliding_window(1024)" --head-dim 128 \
        --no-candidates --pairs 64x128/128x64:8:3 --bwd-variants base i32addr tma

``--bwd-variants plain_ntok``: dK/dV with ``N_TOK`` not specialized, as
before session 8 (the template now lets Triton specialize it: a multiple of
16 makes each head's lse and delta row 64-byte aligned and its per-step
loads of them 8-byte cp.async, 287 -> 271 instructions a FULL step at
D = 128, 32 x 64, compiled with Triton 3.6; timed in session 8).

``bwd --band``: the same kernels walking their step lists and walking bands
(``KernelConfig.bwd_band``, session 7), gradients checked against the lists'.

The variants edit the kernel template as it was at commit c832409, before
the kernels took runs (the figures in PERFORMANCE.md); on a later template
only ``base`` means what it says. Variants that only hold for contiguous FULL lists are checked against
``base`` on every pattern they run on (a wrong variant shows as a large diff).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re

import torch
from triton.testing import do_bench

import patterncc as pcc
from patterncc.backends.triton import cache, codegen
from patterncc.backends.triton.bench import backward_tile_spec, with_backward_tiles
from patterncc.backends.triton.config import KernelConfig
from patterncc.backends.triton.runtime import SlotOrder, TritonAttention, triton_cdiv

PATTERNS = ("causal", "sliding_window(1024)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1


def _time(fn, rep: int) -> float:
    if DEVICE == "cpu":
        return float("nan")
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")

# -- the forward's inner loop: the edits each variant makes to the generated text

_FIRST = """    offs_n = tl.arange(0, BLOCK_N)
    first = tl.load(STEPS + lo, mask=lo < hi, other=0) - lo  # VARIANT: the run's first step
"""
_RUN_START = """if MASKED:
            start_n = tl.multiple_of(tl.load(STEPS + i) * BLOCK_N, BLOCK_N)
        else:
            start_n = tl.multiple_of((first + i) * BLOCK_N, BLOCK_N)"""

_PTR_LOOP = """    offs_n = tl.arange(0, BLOCK_N)
    first = tl.load(STEPS + lo, mask=lo < hi, other=0) - lo  # VARIANT: pointers advance by one step
    if not MASKED:
        k_ptrs = k_base + ((first + lo) * BLOCK_N).to(tl.int64) * stride_kn + k_tile
        v_ptrs = v_base + ((first + lo) * BLOCK_N).to(tl.int64) * stride_vn + v_tile
    else:
        k_ptrs = k_base + k_tile
        v_ptrs = v_base + v_tile
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        if MASKED:
            start_n = tl.multiple_of(tl.load(STEPS + i) * BLOCK_N, BLOCK_N)
            k_pos = start_n + offs_n
            k_ptrs, v_ptrs, k_ok = _key_step(k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, start_n, k_pos,  #
                                             N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM, K_ORDER)
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k_pos = (first + i) * BLOCK_N + offs_n
            k_ok = k_pos < N
            k = tl.load(k_ptrs)
"""

_FFMA = """        if MASKED:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM)
            allowed = allowed & k_ok[None, :]
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:  # VARIANT: scale folded into the exp2's argument
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
"""

_FFMA_OLD = re.compile(r"        qk = tl\.dot\(q, tl\.trans\(k\).*?p = tl\.math\.exp2\(qk - m_sub\[:, None\]\)\n", re.S)

# -- TMA: a forward whose FULL steps read K and V through tensor descriptors

_TMA_KERNEL = '''

@triton.jit
def _attn_fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, kv_row, STEPS, lo, hi, qk_scale,  #
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                        RUN: tl.constexpr):
    first = tl.load(STEPS + lo, mask=lo < hi, other=0) - lo
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        if RUN:
            start_n = (first + i) * BLOCK_N
        else:
            start_n = tl.load(STEPS + i) * BLOCK_N
        k = desc_k.load([kv_row + start_n, 0])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([kv_row + start_n, 0])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["N"])
def attn_fwd_tma(Q, desc_k, desc_v, K, V, O, LSE, RANDOM,  #
                 FULL_PTR, FULL_STEPS, PART_PTR, PART_STEPS, TILE_ORDER,  #
                 stride_qn, stride_kn, stride_vn, stride_on,  #
                 sm_scale, N, H, GROUP,  #
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                 HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                 RUN: tl.constexpr):
    """attn_fwd for contiguous [B, H, N, D] inputs, natural order; FULL steps through TMA."""
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP
    layout_h = 0
    if HEAD_DEPENDENT:
        layout_h = off_h
    n_tiles = tl.cdiv(N, BLOCK_M)
    tile = tl.load(TILE_ORDER + layout_h * n_tiles + tl.program_id(0))
    q_pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_row = (off_b * (H // GROUP) + off_kvh) * N
    q_base = Q + off_bh.to(tl.int64) * N * stride_qn
    k_base = K + kv_row.to(tl.int64) * stride_kn
    v_base = V + kv_row.to(tl.int64) * stride_vn
    q_ok = q_pos < N
    q = tl.load(q_base + q_pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504
    csr_row = layout_h * n_tiles + tile
    acc, l_i, m_i = _attn_fwd_inner_tma(
        acc, l_i, m_i, q, desc_k, desc_v, kv_row, FULL_STEPS, tl.load(FULL_PTR + csr_row),
        tl.load(FULL_PTR + csr_row + 1), qk_scale, BLOCK_N, DOT_PRECISION, NUM_STAGES, RUN)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
        PART_STEPS, tl.load(PART_PTR + csr_row), tl.load(PART_PTR + csr_row + 1), qk_scale, off_h, N, RANDOM,  #
        N, 1, 1, 1, BLOCK_N, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM, 0)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + off_bh.to(tl.int64) * N * stride_on + q_pos[:, None].to(tl.int64) * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + off_bh.to(tl.int64) * N + q_pos, lse, mask=q_ok)
'''


def _inner_function(src: str) -> tuple[int, int]:
    """Where ``_attn_fwd_inner`` starts and ends in a generated module's text."""
    start = src.index("def _attn_fwd_inner(")
    return start, src.index("@triton.jit", start)


def _edit_inner(src: str, edit) -> str:
    a, b = _inner_function(src)
    return src[:a] + edit(src[a:b]) + src[b:]


def variant_source(src: str, name: str) -> str:
    """The generated module's text with variant ``name``'s edits."""
    def run(body):
        body = body.replace("    offs_n = tl.arange(0, BLOCK_N)\n", _FIRST, 1)
        return body.replace("start_n = tl.multiple_of(tl.load(STEPS + i) * BLOCK_N, BLOCK_N)", _RUN_START, 1)

    def ptr(body):
        head, loop = body.split("    offs_n = tl.arange(0, BLOCK_N)\n", 1)
        # replace everything up to and including the K load of the loop
        start = loop.index("        # -- scores of this key step")
        loop = loop[start:]
        loop = re.sub(r"        if MASKED:\n            k = tl\.load\(k_ptrs, mask=k_ok\[:, None\], other=0\.0\)\n"
                      r"        else:\n            k = tl\.load\(k_ptrs\)\n", "", loop, count=1)
        loop = loop.replace("        m_i = m_new\n",
                            "        m_i = m_new\n        if not MASKED:\n"
                            "            k_ptrs += BLOCK_N * stride_kn\n            v_ptrs += BLOCK_N * stride_vn\n", 1)
        return head + _PTR_LOOP + loop

    def ffma(body):
        body = run(body)
        new, count = _FFMA_OLD.subn(_FFMA, body, count=1)
        assert count == 1, "the ffma edit did not apply"
        return new

    edits = {"base": lambda b: b, "run": run, "run+ptr": ptr, "run+ffma": ffma}
    if name == "i32addr":  # the module-wide step-address edit (bwd_variant_source)
        return bwd_variant_source(src, name)
    if name in edits:
        out = _edit_inner(src, edits[name])
    else:  # tma variants add a kernel
        out = src + _TMA_KERNEL
    assert name == "base" or out != src, f"variant {name} changed nothing"
    return out


# -- backward (and forward) step addresses: int32 offsets per step instead of a
# loop-invariant offset tile (compile-only evidence, sm_90, triton 3.9: the
# D = 128 dK/dV kernel at 64 x 128 keeps the tile's row offsets live across
# the loop and re-reads 17 spilled values per step; FlexAttention's
# backward, which recomputes int32 offsets per step, re-reads 2). Valid only
# while n * stride fits in int32, which the benchmark shapes do. The
# backward took it (ADDR32) in session 6; the edit now reaches the forward.

_I32_OLD = """        a_ptrs = a_base + start.to(tl.int64) * stride_a + a_tile
        b_ptrs = b_base + start.to(tl.int64) * stride_b + b_tile
"""
_I32_NEW = """        offs_d = tl.arange(0, HEAD_DIM)  # VARIANT: int32 offsets recomputed per step
        a_ptrs = a_base + (pos[:, None] * stride_a + offs_d[None, :])
        b_ptrs = b_base + (pos[:, None] * stride_b + offs_d[None, :])
"""


# -- dK/dV: Q and dO through tensor descriptors (TMA), natural order only
# (compile-only: no spill re-reads left in any dK/dV loop, stack 120 -> 32
# bytes at 64 x 128). Rows past the sequence read as zeros; the predicate
# and the lse/delta loads keep their bounds mask.

_TMA_STEP_OLD = """        q_ptrs, do_ptrs, q_tok, q_in = _step_rows(q_base, do_base, q_tile, do_tile, stride_qn, stride_don, start_m,  #
                                                  q_pos, N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM, Q_ORDER, ADDR32)
        if MASKED:
            q = tl.load(q_ptrs, mask=q_in[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=q_in[:, None], other=0.0)
"""
_TMA_STEP_NEW = """        q_tok = q_pos  # VARIANT: Q and dO by tensor descriptor (natural order)
        q_in = q_pos < N
        q = q_tile.load([start_m, 0])
        do = do_tile.load([start_m, 0])
        if MASKED:
"""
_TMA_FULL_OLD = """            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
"""
_TMA_DESC = """        csr_col = layout_h * n_tiles + tile
        q_desc = tl.make_tensor_descriptor(q_base, shape=[N_TOK, HEAD_DIM], strides=[stride_qn, 1],  # VARIANT
                                           block_shape=[BLOCK_M1, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(do_base, shape=[N_TOK, HEAD_DIM], strides=[stride_don, 1],
                                            block_shape=[BLOCK_M1, HEAD_DIM])
"""


def _tma_dkdv(src: str) -> str:
    inner = src.index("def _attn_bwd_dkdv_inner")
    kernel = src.index("def attn_bwd_dkdv(")
    end = src.index("def _attn_bwd_dq_inner")
    head, body, kern, tail = src[:inner], src[inner:kernel], src[kernel:end], src[end:]
    assert body.count(_TMA_STEP_OLD) == 1 and body.count(_TMA_FULL_OLD) == 1, "the tma edit did not apply"
    body = body.replace(_TMA_STEP_OLD, _TMA_STEP_NEW).replace(_TMA_FULL_OLD, "")
    csr = "        csr_col = layout_h * n_tiles + tile\n"
    assert kern.count(csr) == 1, "the tma edit did not apply"
    kern = kern.replace(csr, _TMA_DESC).replace("q_base, do_base, q_tile, do_tile,", "q_base, do_base, q_desc, do_desc,")
    return head + body + kern + tail


# -- dK/dV: dP^T after dV's product (the order before session 6: the tensor
# cores wait while P^T's exp2 runs; 16-bit inputs now issue dP^T first)

_LATE_DP = (('        if DOT_PRECISION != "ieee":\n            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)\n',
             ""),
            ('        if DOT_PRECISION == "ieee":\n            dpT',
             '        if True:  # VARIANT: dP^T after dV, whatever the dtype\n            dpT'))


def bwd_variant_source(src: str, name: str) -> str:
    """The generated module's text with backward variant ``name``'s edits
    (``tma``: natural-order launches only; the caller sets Triton's allocator)."""
    if name == "base":
        return src
    if name == "tma":
        return _tma_dkdv(src)
    if name == "plain_ntok":  # N_TOK not specialized in dK/dV: lse and delta rows of unknown alignment
        old = '@triton.jit(do_not_specialize=["N", "ORD_L", "ORD_S", "ORD_C"])\ndef attn_bwd_dkdv('
        assert src.count(old) == 1, "the plain_ntok edit did not apply"
        return src.replace(old, '@triton.jit(do_not_specialize=["N", "N_TOK", "ORD_L", "ORD_S", "ORD_C"])\ndef attn_bwd_dkdv(')
    if name == "late_dp":
        for old, new in _LATE_DP:
            assert src.count(old) == 1, "the late_dp edit did not apply"
            src = src.replace(old, new)
        return src
    assert name == "i32addr", f"unknown backward variant {name!r}"
    assert src.count(_I32_OLD) == 1, "the i32addr edit did not apply"
    return src.replace(_I32_OLD, _I32_NEW)


def load_variant(src: str):
    key = hashlib.sha256(src.encode()).hexdigest()
    return cache.load_module(key, lambda: src)


def fwd_experiment(pattern: str, n: int, head_dim: int, heads: int, rep: int, variants) -> list[str]:
    pat = pcc.parse(pattern)
    dt = torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=dt, generator=g) for _ in range(3))
    attn = TritonAttention(pat)
    run = attn.prepare(n, heads, heads, head_dim, dt, q.device)
    src = codegen.generate_source(pat, run.config)
    scale = head_dim ** -0.5
    base_o, _ = run.forward(q, k, v, scale)
    lines = []
    for name in variants:
        try:
            module = load_variant(variant_source(src, name))
            if name.startswith("tma"):
                fn = _tma_launcher(module, run, q, k, v, scale, run_mode=name == "tma+run")
            else:
                vrun = dataclasses.replace(run, module=module)
                fn = lambda: vrun.forward(q, k, v, scale)  # noqa: E731
            o = fn()[0]
            diff = (o.float() - base_o.float()).abs().max().item()
            ms = _time(fn, rep)
            lines.append(f"| {pattern} | {n} | {head_dim} | {name} | {ms:.3f} | {diff:.2g} |")
        except Exception as err:  # a variant that does not compile is a result too
            lines.append(f"| {pattern} | {n} | {head_dim} | {name} | failed: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:100] if str(err) else ''} | |")
        print(lines[-1], flush=True)
    return lines


def _tma_launcher(module, run, q, k, v, scale, run_mode: bool):
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, n, D = q.shape
    cfg, t = run.config, run.tables
    k2, v2 = k.reshape(-1, D), v.reshape(-1, D)
    desc_k = TensorDescriptor.from_tensor(k2, [cfg.block_n, D])
    desc_v = TensorDescriptor.from_tensor(v2, [cfg.block_n, D])
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))

    def fn():
        o = torch.empty_like(q)
        lse = torch.empty((B, H, n), dtype=torch.float32, device=q.device)
        module.attn_fwd_tma[(triton_cdiv(n, cfg.block_m), B * H)](
            q, desc_k, desc_v, k, v, o, lse, t.random, *t.fwd, q.stride(2), k.stride(2), v.stride(2), o.stride(2),
            scale, n, H, H // run.Hkv, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            HEAD_DEPENDENT=t.layout_heads > 1, DOT_PRECISION="tf32", NUM_STAGES=cfg.fwd_stages, RUN=run_mode,
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
        return o, lse
    return fn


# -- backward: each kernel alone over candidates

DKDV_CANDIDATES = {  # (block_m1, block_n1, warps, stages)
    64: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 3)],
    128: [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2),
          (64, 64, 8, 2), (16, 128, 8, 2), (64, 128, 8, 1),
          # not yet timed: no spills with 8 warps (248 registers; 4 warps spill 232 bytes), and
          # one stage (48 KiB of shared memory against 98), from `bench_triton.py --resources`
          (32, 64, 8, 2), (32, 64, 4, 1)],
}
DQ_CANDIDATES = {  # (block_m2, block_n2, warps, stages)
    64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2),
          (128, 32, 4, 2), (64, 128, 8, 2), (128, 64, 8, 1),
          # not yet timed: 64 x 64 with 4 warps takes 161 KiB of shared memory at 2 stages (one
          # program per SM), 64 KiB at one stage; 64 x 32 at one stage 48 KiB
          (64, 64, 4, 1), (64, 32, 4, 1)],
}


def bwd_experiment(pattern: str, n: int, head_dim: int, heads: int, rep: int, candidates: bool = True,
                   pairs=(), variants=(), band: bool = False) -> list[str]:
    """Each backward kernel over the candidates (``candidates``), then the
    default tiles' two kernels in sequence and side by side, and the same
    for each of ``pairs`` ((block_m1, block_n1, block_m2, block_n2, warps,
    stages)); with ``variants`` (``base``, ``i32addr``), each kernel of the
    default tiles and of the pairs once per variant of the module's text;
    with ``band``, each of them walking step lists and walking bands."""
    pat = pcc.parse(pattern)
    dt = torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=dt, generator=g) for _ in range(4))
    base = TritonAttention(pat).config_for(head_dim, dt)
    scale = head_dim ** -0.5
    run0 = TritonAttention(pat, config=base).prepare(n, heads, heads, head_dim, dt, q.device)
    o, lse = run0.forward(q, k, v, scale)
    delta = run0.delta(o, do)
    ref = {}
    lines = []

    def config(**tiles):
        fields = dataclasses.asdict(base)
        fields.update(tiles)
        return KernelConfig(**fields)

    lists = (("dkdv", DKDV_CANDIDATES[head_dim]), ("dq", DQ_CANDIDATES[head_dim])) if candidates else ()
    for kind, tried in lists:
        for m, nn, w, s in tried:
            tiles = (dict(block_m1=m, block_n1=nn, bwd_warps=w, bwd_stages=s) if kind == "dkdv"
                     else dict(block_m2=m, block_n2=nn, bwd_warps=w, bwd_stages=s))
            try:
                run = TritonAttention(pat, config=config(**tiles)).prepare(n, heads, heads, head_dim, dt, q.device)
                if kind == "dkdv":
                    dk, dv = torch.empty_like(k), torch.empty_like(v)
                    fn = lambda: run.dkdv(q, k, v, lse, do, delta, scale, SlotOrder(), dk, dv)  # noqa: E731
                    fn()
                    out = torch.cat([dk, dv])
                else:
                    dq = torch.empty_like(q)
                    fn = lambda: run.dq(q, k, v, lse, do, delta, scale, SlotOrder(), dq)  # noqa: E731
                    fn()
                    out = dq.clone()
                diff = (out.float() - ref.setdefault(kind, out).float()).abs().max().item()
                ms = _time(fn, rep)
                lines.append(f"| {pattern} | {n} | {head_dim} | {kind} | {m}x{nn}, {w}, {s} | {ms:.3f} | {diff:.2g} |")
            except Exception as err:
                lines.append(f"| {pattern} | {n} | {head_dim} | {kind} | {m}x{nn}, {w}, {s} | failed: "
                             f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''} | |")
            print(lines[-1], flush=True)
    default = TritonAttention(pat).prepare(n, heads, heads, head_dim, dt, q.device)  # tiles by the layout's walk
    runs = [default] + [TritonAttention(pat, config=with_backward_tiles(base, pair))
                        .prepare(n, heads, heads, head_dim, dt, q.device) for pair in pairs]
    for run in runs:
        lines += _overlap(run, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep)
    for run in runs if variants else ():
        lines += _variants(run, variants, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep)
    for run in runs if band else ():
        lines += _band(pat, run, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep)
    return lines


def _band(pat, run, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep) -> list[str]:
    """dK/dV and dQ of ``run``'s tiles walking their step lists and walking
    bands (``KernelConfig.bwd_band``: one loop per tile, the predicate
    behind a branch), gradients checked against the lists'."""
    H, Hkv = q.shape[1], k.shape[1]
    cases = []
    for band in (False, True):
        config = dataclasses.replace(run.config, bwd_band=band)
        brun = TritonAttention(pat, config=config).prepare(n, H, Hkv, head_dim, q.dtype, q.device)
        cases.append((f"walk {brun.tables.dkdv_walk} / {brun.tables.dq_walk}", brun))
    return _compare(cases, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep)


def _variants(run, variants, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep) -> list[str]:
    """dK/dV and dQ of ``run``'s tiles with each variant's module, checked
    against the first variant's gradients."""
    src = codegen.generate_source(pcc.parse(pattern), run.config)
    if "tma" in variants:  # device-side descriptors need a scratch allocator
        import triton

        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))
    cases = [(name, dataclasses.replace(run, module=load_variant(bwd_variant_source(src, name)))) for name in variants]
    return _compare(cases, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep)


def _compare(cases, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep) -> list[str]:
    """dK/dV and dQ of each ``(label, run)``, timed, gradients checked against the first's."""
    lines, first = [], None
    for label, run in cases:
        dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
        dkdv = lambda: run.dkdv(q, k, v, lse, do, delta, scale, SlotOrder(), dk, dv)  # noqa: E731
        dqf = lambda: run.dq(q, k, v, lse, do, delta, scale, SlotOrder(), dq)  # noqa: E731
        dkdv(), dqf()
        grads = torch.cat([dk.flatten(), dv.flatten(), dq.flatten()]).float()
        first = grads if first is None else first
        diff = (grads - first).abs().max().item()
        ms_kv, ms_q = _time(dkdv, rep), _time(dqf, rep)
        lines.append(f"| {pattern} | {n} | {head_dim} | {label}: dkdv + dq | {run.config.describe()} | "
                     f"{ms_kv:.3f} + {ms_q:.3f} = {ms_kv + ms_q:.3f} | {diff:.2g} |")
        print(lines[-1], flush=True)
    return lines


def _overlap(run, q, k, v, lse, do, delta, scale, pattern, n, head_dim, rep) -> list[str]:
    """The default tiles' dK/dV and dQ launches one after the other (as the
    backward runs them) and on two streams (dQ beside dK/dV): what a single
    launch holding both kinds of program (FlexAttention's) could gain from
    filling the first launch's last wave with the second's programs."""
    dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
    side = torch.cuda.Stream() if DEVICE == "cuda" else None

    def serial():
        run.dkdv(q, k, v, lse, do, delta, scale, SlotOrder(), dk, dv)
        run.dq(q, k, v, lse, do, delta, scale, SlotOrder(), dq)

    def paired():
        if side is None:
            return serial()
        side.wait_stream(torch.cuda.current_stream())
        run.dkdv(q, k, v, lse, do, delta, scale, SlotOrder(), dk, dv)
        with torch.cuda.stream(side):
            run.dq(q, k, v, lse, do, delta, scale, SlotOrder(), dq)
        torch.cuda.current_stream().wait_stream(side)

    lines = []
    for name, fn in (("dkdv then dq", serial), ("dkdv beside dq (two streams)", paired)):
        fn()
        lines.append(f"| {pattern} | {n} | {head_dim} | {name} | {run.config.describe()} | {_time(fn, rep):.3f} | |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("fwd", "bwd"))
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=["base", "run", "run+ptr", "run+ffma", "tma", "tma+run"])
    ap.add_argument("--no-candidates", action="store_true", help="bwd: leave out the per-kernel candidates")
    ap.add_argument("--bwd-variants", nargs="*", default=[], choices=("base", "i32addr", "tma", "late_dp", "plain_ntok"),
                    help="bwd: time each kernel of the default tiles and the pairs with these module variants")
    ap.add_argument("--band", action="store_true",
                    help="bwd: time the default tiles and the pairs walking step lists and walking bands")
    ap.add_argument("--pairs", nargs="*", default=[], type=backward_tile_spec, metavar="M1xN1/M2xN2:W:S",
                    help="bwd: backward tile sets to time in sequence and side by side too")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (dry run)'}", flush=True)
    if args.what == "fwd":
        print("| pattern | n | D | variant | fwd ms | max diff vs base |\n|---|---|---|---|---|---|", flush=True)
    else:
        print("| pattern | n | D | kernel | tiles, warps, stages | ms | max diff vs first |\n|---|---|---|---|---|---|---|",
              flush=True)
    for pattern in args.patterns:
        for n in args.seq_len:
            for d in args.head_dim:
                if args.what == "fwd":
                    fwd_experiment(pattern, n, d, args.heads, args.rep, args.variants)
                else:
                    bwd_experiment(pattern, n, d, args.heads, args.rep, not args.no_candidates, args.pairs,
                                   args.bwd_variants, args.band)


if __name__ == "__main__":
    main()
