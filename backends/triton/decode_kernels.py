"""The query-rows kernel: a few queries against many keys (a template: not imported).

``decode.py`` appends everything below the marker line to a pattern's
generated module (``codegen.generate_source``), whose ``pattern_mask`` it
calls. It serves queries that sit at the *end* of their row's keys: decoding
from a KV cache (one to a few new tokens) and chunked prefill.

Shapes and conventions:

- q ``[B, H, NQ, D]``; k, v ``[B, H // GROUP, max_len, D]`` (a cache may be
  longer than a row's keys), any strides with the last one 1;
- ``LENS`` int32 ``[B]``: row ``b`` has keys ``0 .. LENS[b] - 1``, and its
  queries are the tokens ``LENS[b] - NQ .. LENS[b] - 1`` (bottom-right);
- ``LIST_PTR`` / ``LIST_IDX`` (int32): the key blocks each query tile of each
  (batch row, layout head) may touch, from the pattern's block layout at that
  row's length (``decode.py``), ascending; each program takes one slice of
  its tile's list (split-KV, "flash-decoding");
- ``O_PART`` fp32 ``[ALL_SPLITS, B, H, NQ, D]``, ``LSE_PART`` fp32
  ``[ALL_SPLITS, B, H, NQ]``: each split's (of each planned piece's)
  normalized output and natural-log log-sum-exp, merged on the host side by
  log-sum-exp.

Every visited block is masked by the predicate and by ``k < LENS[b]``: a
query tile's list is the union of its block rows' lists, so a block FULL
for one row need not be for the tile, and decoding is bound by reading K and
V, not by the predicate.
"""

import triton
import triton.language as tl

pattern_mask = None  # defined by the generated module above the kernels

# ---- query-rows kernel: everything below this line is appended to the generated module ----


@triton.jit
def _key_tokens(slot, K_ORDER: tl.constexpr, L, S, C):
    """The token of each key slot in a planned piece's key order
    (patterncc.planner.TokenOrder): 0 natural, 1 residue(L) with S slots per
    class, 2 the gathered columns of summary(L, C); and whether the slot holds one."""
    if K_ORDER == 1:
        return (slot % S) * L + slot // S, slot < L * S
    elif K_ORDER == 2:
        return (slot // C) * L + (L - C) + slot % C, slot >= 0
    else:
        return slot, slot >= 0


@triton.jit(do_not_specialize=["NQ", "D", "H", "GROUP", "LAYOUT_HEADS", "TILES", "SPLITS", "ORD_L", "ORD_C",
                               "SPLIT0", "ALL_SPLITS"])
def attn_rows_fwd(Q, K, V, O_PART, LSE_PART, LENS, RANDOM, LIST_PTR, LIST_IDX,  #
                  stride_qb, stride_qh, stride_qn,  #
                  stride_kb, stride_kh, stride_kn,  #
                  stride_vb, stride_vh, stride_vn,  #
                  sm_scale, NQ, D, H, GROUP, LAYOUT_HEADS, TILES, SPLITS, ORD_L, ORD_C, SPLIT0, ALL_SPLITS,  #
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                  HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, K_ORDER: tl.constexpr = 0,
                  NUM_STAGES: tl.constexpr = 3):
    """One split of one query tile of one (batch row, head): its normalized
    output and lse over the key blocks of its slice of the tile's list.

    A planned piece (``K_ORDER`` residue or columns) lists key *slot* blocks:
    its keys are read at their tokens (``_key_tokens``), so the stride or
    summary keys of a query are a few contiguous slot blocks. The predicate
    is always the piece's own, over token positions. The piece's splits are
    ``SPLIT0 .. SPLIT0 + SPLITS - 1`` of ``ALL_SPLITS`` (every piece's)."""
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs tiles of at least 16")
    tile = tl.program_id(0)
    off_bh = tl.program_id(1)
    split = tl.program_id(2)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP
    layout_h = 0
    if HEAD_DEPENDENT:
        layout_h = off_h
    n_b = tl.load(LENS + off_b)
    # -- this tile's query rows and their token positions (bottom-right)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_tok = n_b - NQ + rows
    row_ok = (rows < NQ) & (q_tok >= 0)
    q_pos = tl.maximum(q_tok, 0)  # the predicate sees positions in 0 .. n_b - 1 only
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D  # head dims padded to a power of two read zeros past D
    # -- this split's slice of the tile's key-block list
    which = (off_b * LAYOUT_HEADS + layout_h) * TILES + tile
    beg = tl.load(LIST_PTR + which)
    end = tl.load(LIST_PTR + which + 1)
    per_split = tl.cdiv(end - beg, SPLITS)
    lo = beg + split * per_split
    hi = tl.minimum(end, lo + per_split)
    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh \
        + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.44269504  # 1/ln(2): scores in log2 units, for exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    ord_s = tl.cdiv(n_b, ORD_L)  # a residue class's slots at this row's length
    for e in tl.range(lo, hi, num_stages=NUM_STAGES):  # the next blocks' loads in flight
        k_slot = tl.load(LIST_IDX + e) * BLOCK_N + offs_n
        k_pos, k_ok = _key_tokens(k_slot, K_ORDER, ORD_L, ord_s, ORD_C)
        k_ok = k_ok & (k_pos < n_b)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_pos[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # -- the pattern, the row's length and the tile's real rows
        allowed = pattern_mask(q_pos[:, None], tl.minimum(k_pos, n_b - 1)[None, :], off_h, n_b, RANDOM)
        allowed = allowed & k_ok[None, :] & row_ok[:, None]
        qk = tl.where(allowed, qk, float("-inf"))
        # -- online softmax; a row that has seen no allowed key subtracts 0, not -inf
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + k_pos[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    # -- this split's normalized output and natural-log lse (0 and -inf where it saw no key)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # ln(2)
    part = (((SPLIT0 + split) * (tl.num_programs(1) // H) + off_b) * H + off_h).to(tl.int64) * NQ
    o_ptrs = O_PART + (part + rows[:, None]) * D + offs_d[None, :]
    tl.store(o_ptrs, o, mask=(rows < NQ)[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part + rows, lse, mask=rows < NQ)
