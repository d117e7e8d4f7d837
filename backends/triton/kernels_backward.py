"""The backward attention kernels (a template: not imported), copied into every
generated module right after ``kernels.py``'s part, whose helpers they call:
delta, dK/dV and dQ, and the predicate's picture. Shapes and conventions as
in ``kernels.py``'s docstring.
"""

import triton
import triton.language as tl

pattern_mask = None  # defined by the generated module above the kernels
PAST_ONLY = None  # defined by the generated module's header (codegen)
_loop_rel_mode = None  # kernels.py's, copied in ahead of these
_near_steps = None  # kernels.py's, copied in ahead of these
_packed_sequence = None  # kernels.py's, copied in ahead of these
_rel_mode = None  # kernels.py's, copied in ahead of these
_score_terms = None  # kernels.py's, copied in ahead of these
_step_rows = None  # kernels.py's, copied in ahead of these
_term_scalars = None  # kernels.py's, copied in ahead of these
_token = None  # kernels.py's, copied in ahead of these

# ---- kernels: everything below this line is copied into each generated module ----

# ----------------------------------------------------------------------------
# Backward, 1 of 3: delta = rowsum(dO * O), one program per (query tile, batch * head).
# Only where no single launch reaches every query (planned runs) or an lse
# gradient enters; otherwise attn_bwd_dq writes delta (WRITE_DELTA).
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])  # (a length: a new one must not compile the kernel again)
def attn_bwd_preprocess(O, DO, DELTA,  #
                        stride_ob, stride_oh, stride_on,  #
                        stride_dob, stride_doh, stride_don,  #
                        N, H, LSE_LEN,  #
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta (fp32 [B, H, N], rows LSE_LEN apart): the term of dS = P * (dP - delta) that the softmax adds."""
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    inside = pos[:, None] < N
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + pos[:, None].to(tl.int64) * stride_on + offs_d[None, :], mask=inside, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + pos[:, None].to(tl.int64) * stride_don + offs_d[None, :], mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * LSE_LEN + pos, delta, mask=pos < N)


# ----------------------------------------------------------------------------
# Backward, 2 of 3: dK and dV, one program per (key tile, batch * key/value head)
# ----------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don,  #
                         LSE_row, DELTA_row, STEPS, lo, hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C,  #
                         BLOCK_M1: tl.constexpr, MASKED: tl.constexpr,  #
                         DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                         HEAD_DIM: tl.constexpr, Q_ORDER: tl.constexpr, RUN: tl.constexpr,  #
                         ADDR32: tl.constexpr, BAND: tl.constexpr, full_lo, full_hi,  #
                         k_tok, k_lo, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, NATURAL: tl.constexpr):
    """The query steps STEPS[lo:hi] (BLOCK_M1 query slots each) into one key
    tile's dK and dV; RUN: the steps lo .. hi - 1 themselves; BAND (with
    RUN): those steps, the ones outside full_lo .. full_hi - 1 PARTIAL (tables.band_table),
    all inside the sequence (no bounds mask; a planned order's padding slots
    still need their load mask). The score terms as in _attn_fwd_inner
    (k_tok the tile's key tokens, k_lo and k_hi its first and last slot)."""
    TERMS: tl.constexpr = SOFTCAP or ALIBI or REL_BIAS
    ALIBI_SPLIT: tl.constexpr = ALIBI and PAST_ONLY and NATURAL
    offs_m = tl.arange(0, BLOCK_M1)
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        if RUN:
            start_m = tl.multiple_of(i * BLOCK_M1, BLOCK_M1)
        else:
            start_m = tl.multiple_of(tl.load(STEPS + i) * BLOCK_M1, BLOCK_M1)
        q_pos = start_m + offs_m
        q_ptrs, do_ptrs, q_tok, q_in = _step_rows(q_base, do_base, q_tile, do_tile, stride_qn, stride_don, start_m,  #
                                                  q_pos, N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM, Q_ORDER, ADDR32)
        if MASKED or (BAND and Q_ORDER != 0):
            q = tl.load(q_ptrs, mask=q_in[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=q_in[:, None], other=0.0)
            lse2 = tl.load(LSE_row + q_tok, mask=q_in, other=0.0) * 1.44269504  # 1/ln(2)
            delta = tl.load(DELTA_row + q_tok, mask=q_in, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(LSE_row + q_tok) * 1.44269504  # 1/ln(2)
            delta = tl.load(DELTA_row + q_tok)
        # -- P^T, recomputed from the saved log-sum-exp. 16-bit inputs: dP^T = V dO^T
        #    is issued before P^T's exp2 (not after dV's product, which needs P^T),
        #    so the tensor cores work on it while the exp2 runs; fp32 tiles keep
        #    the other order (both score tiles live at once spill there)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if DOT_PRECISION != "ieee":
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if TERMS:  # -- the score terms, scale included
            rel_mode = _rel_mode(start_m - k_hi, start_m + (BLOCK_M1 - 1) - k_lo, rel_m, NATURAL)
            sT, thT = _score_terms(qkT, q_tok[None, :], k_tok[:, None], qk_scale, cap_in, cap_out, slope2, REL_h,
                                   rel_m, rel_lo, rel_hi, rel_mode, SOFTCAP, ALIBI, REL_BIAS, DOT_PRECISION != "ieee",
                                   NATURAL, 0, k_lo, ALIBI_SPLIT)
            if ALIBI_SPLIT:  # the queries' part of ALiBi's bias joins their log-sum-exp
                lse2 += slope2 * (q_tok - k_lo).to(tl.float32)
            pT = tl.math.exp2(sT - lse2[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            allowed = pattern_mask(q_pos[None, :], k_pos[:, None], off_h, N, RANDOM)
            allowed = allowed & q_in[None, :] & k_ok[:, None]
            # select, not multiply: a row with lse = -inf has pT = +inf here
            pT = tl.where(allowed, pT, 0.0)
        elif BAND:
            if (i < full_lo) | (i >= full_hi):  # a PARTIAL step of the band
                allowed = pattern_mask(q_pos[None, :], k_pos[:, None], off_h, N, RANDOM)
                pT = tl.where(allowed & q_in[None, :] & k_ok[:, None], pT, 0.0)
        # -- dV += P^T dO
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if DOT_PRECISION == "ieee":
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (dP^T - delta); dK += dS^T Q (the softmax scale comes at the end)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:  # -- back through c * tanh(s / c): its derivative is 1 - tanh^2
            dsT = dsT * (1.0 - thT * thT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


# LSE_LEN, the row length of lse and delta, is left to Triton to specialize: the host pads those rows
# to a multiple of 16 (runtime.aligned_rows), so each head's row is 64-byte aligned and the per-step
# loads of them are 8-byte rather than 4-byte copies (dK/dV -3..-7% on an H200, each kernel timed
# alone), at every length and with one compile: the token count itself is not specialized.
@triton.jit(do_not_specialize=["N", "N_TOK", "ORD_L", "ORD_S", "ORD_C"])
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DK_IN, DV_IN, RANDOM,  #
                  FULL_PTR, FULL_STEPS, PART_PTR, PART_STEPS, TILE_ORDER,  #
                  stride_qb, stride_qh, stride_qn,  #
                  stride_kb, stride_kh, stride_kn,  #
                  stride_vb, stride_vh, stride_vn,  #
                  stride_dob, stride_doh, stride_don,  #
                  stride_dkb, stride_dkh, stride_dkn,  #
                  sm_scale, N, H, GROUP, N_TOK, ORD_L, ORD_S, ORD_C, LSE_LEN,  #
                  HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,  #
                  HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                  Q_ORDER: tl.constexpr = 0, K_ORDER: tl.constexpr = 0, ADD_IN: tl.constexpr = False,  #
                  FULL_RUNS: tl.constexpr = False, ADDR32: tl.constexpr = False, BAND: tl.constexpr = False,  #
                  SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, REL_BIAS: tl.constexpr = False,  #
                  softcap=1.0, SLOPES=None, REL=None, REL_REV=None, rel_m=0,  #
                  PACKED: tl.constexpr = False, SEQS=None, ALIGN=1):
    """dK and dV of one key tile, summed over the query heads that share its
    key/value head: accumulated in registers, written once, no atomics.
    FULL_RUNS as in attn_fwd, ADDR32 as in _step_rows; BAND: FULL_STEPS is
    tables.band_table (PART_PTR and PART_STEPS unused).

    ADD_IN: add DK_IN and DV_IN (fp32, DK's strides; may be DK and DV
    themselves) before the store: a planned run sums its components'
    gradients here, with no extra pass (each token is one program's).
    Score terms as in attn_fwd (sinks need nothing here: they are in lse).

    Long for a reason: a kernel's entry point holds its whole signature (each
    tensor's strides, every constexpr) and picks its walks (FULL runs or lists,
    PARTIAL lists, a band); each walk's loop is already a helper, and a
    further split would only pass the same thirty arguments down one more layer."""
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert(BLOCK_M1 >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(BLOCK_N1 >= 16, "tl.dot needs tiles of at least 16")
    # -- this program's batch, key/value head and key tile (heaviest first)
    HKV = H // GROUP
    off_bkv = tl.program_id(1)
    off_b = off_bkv // HKV
    off_kvh = off_bkv % HKV
    layout_kvh = 0
    if HEAD_DEPENDENT:
        layout_kvh = off_kvh
    n_tiles = tl.cdiv(N, BLOCK_N1)
    tile = tl.load(TILE_ORDER + layout_kvh * n_tiles + tl.program_id(0))
    start_n = tile * BLOCK_N1
    if PACKED:  # -- as in attn_fwd
        slot0, N, N_TOK, ORD_S, tok0 = _packed_sequence(SEQS, start_n, ALIGN)
        start_n -= slot0
        LSE += tok0
        DELTA += tok0
        Q += tok0.to(tl.int64) * stride_qn
        K += tok0.to(tl.int64) * stride_kn
        V += tok0.to(tl.int64) * stride_vn
        DO += tok0.to(tl.int64) * stride_don
        DK += tok0.to(tl.int64) * stride_dkn
        DV += tok0.to(tl.int64) * stride_dkn
        DK_IN += tok0.to(tl.int64) * stride_dkn
        DV_IN += tok0.to(tl.int64) * stride_dkn
    k_pos = start_n + tl.arange(0, BLOCK_N1)
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, HEAD_DIM)
    k_tok = _token(k_pos, K_ORDER, ORD_L, ORD_S, ORD_C)
    k_ok = (k_pos < N) & (k_tok < N_TOK)
    k_in = k_ok[:, None]
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
                + k_tok[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=k_in, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
                + k_tok[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=k_in, other=0.0)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2)
    q_tile = offs_m[:, None] * stride_qn + offs_d[None, :]
    do_tile = offs_m[:, None] * stride_don + offs_d[None, :]
    NATURAL: tl.constexpr = Q_ORDER == 0 and K_ORDER == 0
    k_hi = start_n + (BLOCK_N1 - 1)
    # -- every query head that reads this key/value head (GROUP > 1: GQA, MQA)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        cap_in, cap_out, slope2, REL_h, rel_lo, rel_hi = _term_scalars(sm_scale, softcap, SLOPES, REL, REL_REV,  #
                                                                       rel_m, off_h, SOFTCAP, ALIBI, REL_BIAS, NATURAL)
        layout_h = 0
        if HEAD_DEPENDENT:
            layout_h = off_h
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        LSE_row = LSE + (off_b * H + off_h).to(tl.int64) * LSE_LEN
        DELTA_row = DELTA + (off_b * H + off_h).to(tl.int64) * LSE_LEN
        csr_col = layout_h * n_tiles + tile
        if BAND:  # -- the tile's steps as one loop, the predicate only outside its FULL range;
            #            a step reaching past the end (the band's last, if any) as a masked loop of its own
            band = FULL_STEPS + 4 * csr_col
            lo, hi = tl.load(band), tl.load(band + 3)
            inside = tl.maximum(tl.minimum(hi, N // BLOCK_M1), lo)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, FULL_STEPS, lo, inside, qk_scale, off_h, N, RANDOM,  #
                N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, Q_ORDER, True, ADDR32,  #
                True, tl.load(band + 1), tl.load(band + 2),  #
                k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, FULL_STEPS, inside, hi, qk_scale, off_h, N, RANDOM,  #
                N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM, Q_ORDER, True, ADDR32,  #
                False, 0, 0, k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
        # -- FULL steps: no predicate, no bounds mask (two runs, or the step list: as in attn_fwd)
        elif FULL_RUNS:
            runs = FULL_STEPS + 4 * csr_col
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, FULL_STEPS, tl.load(runs), tl.load(runs + 1), qk_scale, off_h, N, RANDOM,  #
                N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, Q_ORDER, True, ADDR32,  #
                False, 0, 0, k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, FULL_STEPS, tl.load(runs + 2), tl.load(runs + 3), qk_scale, off_h, N, RANDOM,  #
                N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, Q_ORDER, True, ADDR32,  #
                False, 0, 0, k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
        else:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, FULL_STEPS, tl.load(FULL_PTR + csr_col), tl.load(FULL_PTR + csr_col + 1), qk_scale,  #
                off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM,  #
                Q_ORDER, False, ADDR32, False, 0, 0,  #
                k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
        # -- PARTIAL steps: the pattern's predicate and the bounds mask
        if not BAND:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, k_pos, k_ok, q_base, do_base, q_tile, do_tile, stride_qn, stride_don, LSE_row,  #
                DELTA_row, PART_STEPS, tl.load(PART_PTR + csr_col), tl.load(PART_PTR + csr_col + 1), qk_scale,  #
                off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_M1, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM,  #
                Q_ORDER, False, ADDR32, False, 0, 0,  #
                k_tok, start_n, k_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    # -- write dK (with the softmax scale, applied once) and dV
    out = off_b.to(tl.int64) * stride_dkb + off_kvh.to(tl.int64) * stride_dkh \
        + k_tok[:, None].to(tl.int64) * stride_dkn + offs_d[None, :]
    dk = dk * sm_scale
    if ADD_IN:
        dk += tl.load(DK_IN + out, mask=k_in, other=0.0)
        dv += tl.load(DV_IN + out, mask=k_in, other=0.0)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=k_in)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_in)


# ----------------------------------------------------------------------------
# Backward, 3 of 3: dQ, one program per (query tile, batch * head)
# ----------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
                       STEPS, lo, hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C,  #
                       BLOCK_N2: tl.constexpr, MASKED: tl.constexpr,  #
                       DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                       HEAD_DIM: tl.constexpr, K_ORDER: tl.constexpr, RUN: tl.constexpr,  #
                       ADDR32: tl.constexpr, BAND: tl.constexpr, full_lo, full_hi,  #
                       q_tok, q_lo, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                       SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, NATURAL: tl.constexpr,  #
                       d_alibi, d_lo, d_hi, SCR, HIST, BLOCK_M2: tl.constexpr, SKEW: tl.constexpr,  #
                       TERM_GRADS: tl.constexpr):
    """The key steps STEPS[lo:hi] into one query tile's dQ and the terms'
    gradients (_attn_bwd_dq_loop); a run in natural order with a relative
    bias as two loops, as in _attn_fwd_inner."""
    if RUN and REL_BIAS and NATURAL and not BAND:
        na, nb = _near_steps(lo, hi, q_lo, q_lo + (BLOCK_M2 - 1), rel_m, BLOCK_N2)
        far_hi = hi - (nb - na)
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, lo, far_hi,
             qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, MASKED, DOT_PRECISION,
            NUM_STAGES, HEAD_DIM, K_ORDER, RUN, ADDR32, BAND, full_lo, full_hi, q_tok, q_lo, cap_in, cap_out,
            slope2, REL_h, rel_m, rel_lo, rel_hi, SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR, HIST,
            BLOCK_M2, SKEW, TERM_GRADS, na, nb - na, 1)
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, na,
            nb, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, MASKED, DOT_PRECISION, 1,
            HEAD_DIM, K_ORDER, RUN, ADDR32, BAND, full_lo, full_hi, q_tok, q_lo, cap_in, cap_out, slope2, REL_h,
            rel_m, rel_lo, rel_hi, SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR, HIST, BLOCK_M2,
            SKEW, TERM_GRADS, 0, 0, 2)
    else:
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_loop(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, lo,
            hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, MASKED, DOT_PRECISION, NUM_STAGES,
            HEAD_DIM, K_ORDER, RUN, ADDR32, BAND, full_lo, full_hi, q_tok, q_lo, cap_in, cap_out, slope2, REL_h,
            rel_m, rel_lo, rel_hi, SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR, HIST, BLOCK_M2,
            SKEW, TERM_GRADS, 0, 0, 0)
    return dq, d_alibi, d_lo, d_hi


@triton.jit
def _attn_bwd_dq_loop(dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
                       STEPS, lo, hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C,  #
                       BLOCK_N2: tl.constexpr, MASKED: tl.constexpr,  #
                       DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                       HEAD_DIM: tl.constexpr, K_ORDER: tl.constexpr, RUN: tl.constexpr,  #
                       ADDR32: tl.constexpr, BAND: tl.constexpr, full_lo, full_hi,  #
                       q_tok, q_lo, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                       SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, NATURAL: tl.constexpr,  #
                       d_alibi, d_lo, d_hi, SCR, HIST, BLOCK_M2: tl.constexpr, SKEW: tl.constexpr,  #
                       TERM_GRADS: tl.constexpr, skip_at, skip_len, REL_SPLIT: tl.constexpr):
    """The key steps STEPS[lo:hi] (BLOCK_N2 key slots each) into one query
    tile's dQ; RUN: the steps lo .. hi - 1 themselves; BAND as in
    _attn_bwd_dkdv_inner. The score terms as in _attn_fwd_inner, and their
    gradients from dS (the gradient of the post-term score), summed in a
    fixed order: d_alibi += sum dS * |q - k| (its negative is the slope's);
    the relative bias's buckets 1 .. 2M - 1 into this program's HIST row,
    d_lo and d_hi its buckets 0 and 2M (_rel_bias_grad). REL_SPLIT, skip_at
    and skip_len as in _attn_fwd_loop; TERM_GRADS as in attn_bwd_dq."""
    TERMS: tl.constexpr = SOFTCAP or ALIBI or REL_BIAS
    ALIBI_SPLIT: tl.constexpr = ALIBI and PAST_ONLY and NATURAL
    SLOPE_SUM: tl.constexpr = ALIBI and (TERM_GRADS & 1) != 0
    REL_SUM: tl.constexpr = REL_BIAS and (TERM_GRADS & 2) != 0
    if ALIBI_SPLIT:  # the queries' part of ALiBi's bias joins their log-sum-exp (_score_terms)
        lse2 += slope2 * (q_tok - q_lo).to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N2)
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        if RUN:
            step = i
            if REL_SPLIT == 1:
                step = i + tl.where(i >= skip_at, skip_len, 0)
            start_n = tl.multiple_of(step * BLOCK_N2, BLOCK_N2)
        else:
            start_n = tl.multiple_of(tl.load(STEPS + i) * BLOCK_N2, BLOCK_N2)
        k_pos = start_n + offs_n
        k_ptrs, v_ptrs, k_tok, k_ok = _step_rows(k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, start_n,  #
                                                 k_pos, N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM, K_ORDER, ADDR32)
        if MASKED or (BAND and K_ORDER != 0):
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        # -- P, recomputed from the saved log-sum-exp
        if TERMS:  # -- the score terms, scale included
            dist = q_tok[:, None] - k_tok[None, :]
            rel_mode = _loop_rel_mode(q_lo - start_n - (BLOCK_N2 - 1), q_lo + (BLOCK_M2 - 1) - start_n, rel_m,
                                      NATURAL, REL_SPLIT)
            qk, th = _score_terms(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), q_tok[:, None],
                                  k_tok[None, :], qk_scale, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,
                                  rel_mode, SOFTCAP, ALIBI, REL_BIAS, DOT_PRECISION != "ieee", NATURAL, REL_SPLIT,
                                  q_lo, ALIBI_SPLIT)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM)
            allowed = allowed & q_ok[:, None] & k_ok[None, :]
            # select, not multiply: a row with lse = -inf has p = +inf here
            p = tl.where(allowed, p, 0.0)
        elif BAND:
            if (i < full_lo) | (i >= full_hi):  # a PARTIAL step of the band
                allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM)
                p = tl.where(allowed & q_ok[:, None] & k_ok[None, :], p, 0.0)
            elif (SLOPE_SUM or REL_SUM) and K_ORDER != 0:  # padding slots: their dS would reach the terms' sums
                p = tl.where(k_ok[None, :], p, 0.0)
        # -- dS = P * (dP - delta); dQ += dS K (the softmax scale comes at the end)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SLOPE_SUM:
            d_alibi += tl.sum(tl.sum(ds * tl.abs(q_tok.to(tl.float32)[:, None] - k_tok.to(tl.float32)[None, :]), 1), 0)
        if REL_SUM:
            d_lo, d_hi = _rel_bias_grad(ds, dist, rel_mode, q_lo - start_n, q_tok, k_tok, k_ok, rel_m,
                                        d_lo, d_hi, SCR, HIST, BLOCK_M2, BLOCK_N2, SKEW, NATURAL, REL_SPLIT)
        if SOFTCAP:  # -- back through c * tanh(s / c): its derivative is 1 - tanh^2
            ds = ds * (1.0 - th * th)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq, d_alibi, d_lo, d_hi


@triton.jit
def _rel_bias_grad(ds, dist, rel_mode, d0, q_tok, k_tok, k_ok, rel_m, d_lo, d_hi, SCR, HIST,  #
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKEW: tl.constexpr, NATURAL: tl.constexpr,  #
                   REL_SPLIT: tl.constexpr):
    """One step's dS [BLOCK_M, BLOCK_N] into the relative bias's gradient,
    deterministically (no atomics: this program alone owns its HIST row and
    its SCR scratch, and adds in a fixed order). Buckets 0 and 2M (q - k <=
    -M, >= M) go to the scalars d_lo and d_hi; the others, one per q - k,
    into HIST[q - k + M].

    A tile wholly in one tail (rel_mode 1 or 2) is one sum. In natural order
    q - k = d0 + i - j is constant along each diagonal: dS goes to SCR and
    comes back skewed (column t of the gather is diagonal i - j = t -
    BLOCK_N + 1), so one reduction gives every diagonal's sum, each a
    distinct bucket. In a planned order each query row's keys are distinct
    tokens, so a row's buckets are distinct: the rows go in one at a time.
    REL_SPLIT as in _score_terms."""
    if REL_SPLIT == 1:
        tile = tl.sum(tl.sum(ds, 1), 0)
        d_hi += tl.where(rel_mode == 1, tile, 0.0)
        d_lo += tl.where(rel_mode == 1, 0.0, tile)
    elif REL_SPLIT != 2 and rel_mode == 1:
        d_hi += tl.sum(tl.sum(ds, 1), 0)
    elif REL_SPLIT != 2 and rel_mode == 2:
        d_lo += tl.sum(tl.sum(ds, 1), 0)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        tl.store(SCR + offs_m[:, None] * BLOCK_N + offs_n[None, :], ds)
        tl.debug_barrier()  # the scratch is read back by other threads than wrote it
        if NATURAL:
            t = tl.arange(0, SKEW)
            j = offs_m[:, None] - t[None, :] + (BLOCK_N - 1)
            diag = tl.sum(tl.load(SCR + offs_m[:, None] * BLOCK_N + j, mask=(j >= 0) & (j < BLOCK_N), other=0.0), 0)
            dd = d0 + t - (BLOCK_N - 1)
            hi = dd >= rel_m
            lo = (dd <= -rel_m) & ~hi
            inner = (~hi) & (~lo) & (t < BLOCK_M + BLOCK_N - 1)
            h = tl.load(HIST + dd + rel_m, mask=inner, other=0.0)
            tl.store(HIST + dd + rel_m, h + diag, mask=inner)
            d_hi += tl.sum(tl.where(hi, diag, 0.0), 0)
            d_lo += tl.sum(tl.where(lo, diag, 0.0), 0)
        else:
            hi = dist >= rel_m
            lo = (dist <= -rel_m) & ~hi
            d_hi += tl.sum(tl.sum(tl.where(hi, ds, 0.0), 1), 0)
            d_lo += tl.sum(tl.sum(tl.where(lo, ds, 0.0), 1), 0)
            for r in range(0, BLOCK_M):
                row = tl.load(SCR + r * BLOCK_N + offs_n)
                dd = tl.sum(tl.where(offs_m == r, q_tok, 0), 0) - k_tok
                inner = (dd > -rel_m) & (dd < rel_m) & k_ok
                h = tl.load(HIST + dd + rel_m, mask=inner, other=0.0)
                tl.store(HIST + dd + rel_m, h + row, mask=inner)
                tl.debug_barrier()  # the next row may add to these buckets from other threads
        tl.debug_barrier()  # before the next step's scratch overwrites this one
    return d_lo, d_hi


@triton.jit(do_not_specialize=["N", "N_TOK", "ORD_L", "ORD_S", "ORD_C"])
def attn_bwd_dq(Q, K, V, DO, O, LSE, DELTA, DQ, DQ_IN, RANDOM,  #
                FULL_PTR, FULL_STEPS, PART_PTR, PART_STEPS, TILE_ORDER,  #
                stride_qb, stride_qh, stride_qn,  #
                stride_kb, stride_kh, stride_kn,  #
                stride_vb, stride_vh, stride_vn,  #
                stride_dob, stride_doh, stride_don,  #
                stride_ob, stride_oh, stride_on,  #
                stride_dqb, stride_dqh, stride_dqn,  #
                sm_scale, N, H, GROUP, N_TOK, ORD_L, ORD_S, ORD_C, LSE_LEN,  #
                HEAD_DIM: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,  #
                HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                Q_ORDER: tl.constexpr = 0, K_ORDER: tl.constexpr = 0, ADD_IN: tl.constexpr = False,  #
                FULL_RUNS: tl.constexpr = False, WRITE_DELTA: tl.constexpr = False, ADDR32: tl.constexpr = False,  #
                BAND: tl.constexpr = False,  #
                SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, REL_BIAS: tl.constexpr = False,  #
                softcap=1.0, SLOPES=None, REL=None, REL_REV=None, rel_m=0, PART=None, SCR=None, HIST=None,  #
                SKEW: tl.constexpr = 16, TERM_GRADS: tl.constexpr = 3, PACKED: tl.constexpr = False, SEQS=None,  #
                ALIGN=1):
    """dQ of one query tile of one head (ADD_IN: plus DQ_IN, as in attn_bwd_dkdv;
    FULL_RUNS as in attn_fwd, ADDR32 as in _step_rows, BAND as in attn_bwd_dkdv).

    WRITE_DELTA: compute this tile's delta from O and dO (already loaded for
    dQ) and write it to DELTA, instead of reading it there: a launch whose
    dQ programs reach every query then spares the backward its delta pass (a
    read of O and dO of its own), and dK/dV runs after it.

    Score terms as in attn_fwd. With ALIBI or REL_BIAS the program also
    writes its share of their gradients, each program its own rows, summed
    by the host in a fixed order: PART[p] (fp32 [3]) = (sum dS * |q - k|,
    dS in bucket 0, dS in bucket 2M) and HIST[p] (fp32 [2M + 1], zeroed by
    the host) the other buckets, with SCR[p] (fp32 [BLOCK_M2 * BLOCK_N2])
    as scratch; p = (batch * H + head) * tiles + tile. SKEW: the next power
    of two >= BLOCK_M2 + BLOCK_N2 - 1. TERM_GRADS: which of those sums to
    take (bit 1 the slopes', bit 2 the relative bias's): a term whose tensor
    wants no gradient (fixed ALiBi slopes, as BLOOM's and MPT's are) costs
    its scores only, not a reduction of dS per score.

    Long for a reason: a kernel's entry point holds its whole signature (each
    tensor's strides, every constexpr) and picks its walks (FULL runs or lists,
    PARTIAL lists, a band); each walk's loop is already a helper, and a
    further split would only pass the same thirty arguments down one more layer."""
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert(BLOCK_M2 >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(BLOCK_N2 >= 16, "tl.dot needs tiles of at least 16")
    # -- this program's batch, head and query tile (heaviest first)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP
    layout_h = 0
    if HEAD_DEPENDENT:
        layout_h = off_h
    n_tiles = tl.cdiv(N, BLOCK_M2)
    tile = tl.load(TILE_ORDER + layout_h * n_tiles + tl.program_id(0))
    start_m = tile * BLOCK_M2
    lse_row = off_bh.to(tl.int64) * LSE_LEN  # lse's and delta's row of this batch and head
    if PACKED:  # -- as in attn_fwd
        slot0, N, N_TOK, ORD_S, tok0 = _packed_sequence(SEQS, start_m, ALIGN)
        start_m -= slot0
        lse_row += tok0
        Q += tok0.to(tl.int64) * stride_qn
        K += tok0.to(tl.int64) * stride_kn
        V += tok0.to(tl.int64) * stride_vn
        DO += tok0.to(tl.int64) * stride_don
        O += tok0.to(tl.int64) * stride_on
        DQ += tok0.to(tl.int64) * stride_dqn
        DQ_IN += tok0.to(tl.int64) * stride_dqn
    q_pos = start_m + tl.arange(0, BLOCK_M2)
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tok = _token(q_pos, Q_ORDER, ORD_L, ORD_S, ORD_C)
    q_ok = (q_pos < N) & (q_tok < N_TOK)
    q_in = q_ok[:, None]
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + q_tok[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=q_in, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + q_tok[:, None].to(tl.int64) * stride_don + offs_d[None, :], mask=q_in, other=0.0)
    lse2 = tl.load(LSE + lse_row + q_tok, mask=q_ok, other=0.0) * 1.44269504  # 1/ln(2)
    if WRITE_DELTA:
        o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                    + q_tok[:, None].to(tl.int64) * stride_on + offs_d[None, :], mask=q_in, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + lse_row + q_tok, delta, mask=q_ok)
    else:
        delta = tl.load(DELTA + lse_row + q_tok, mask=q_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2)
    NATURAL: tl.constexpr = Q_ORDER == 0 and K_ORDER == 0
    cap_in, cap_out, slope2, REL_h, rel_lo, rel_hi = _term_scalars(sm_scale, softcap, SLOPES, REL, REL_REV, rel_m,  #
                                                                   off_h, SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    prog = off_bh.to(tl.int64) * n_tiles + tile
    SCR_p = SCR + prog * (BLOCK_M2 * BLOCK_N2)
    HIST_p = HIST + prog * (2 * rel_m + 1)
    d_alibi = tl.full([], 0.0, tl.float32)
    d_lo = tl.full([], 0.0, tl.float32)
    d_hi = tl.full([], 0.0, tl.float32)
    csr_row = layout_h * n_tiles + tile
    if BAND:  # -- the tile's steps as one loop, the predicate only outside its FULL range;
        #            a step reaching past the end (the band's last, if any) as a masked loop of its own
        band = FULL_STEPS + 4 * csr_row
        lo, hi = tl.load(band), tl.load(band + 3)
        inside = tl.maximum(tl.minimum(hi, N // BLOCK_N2), lo)
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, lo, inside, qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True, ADDR32,  #
            True, tl.load(band + 1), tl.load(band + 2),  #
            q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, inside, hi, qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True, ADDR32,  #
            False, 0, 0, q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
    # -- FULL steps: no predicate, no bounds mask (two runs, or the step list: as in attn_fwd)
    elif FULL_RUNS:
        runs = FULL_STEPS + 4 * csr_row
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(runs), tl.load(runs + 1), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True, ADDR32,  #
            False, 0, 0, q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(runs + 2), tl.load(runs + 3), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True, ADDR32,  #
            False, 0, 0, q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
    else:
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(FULL_PTR + csr_row), tl.load(FULL_PTR + csr_row + 1), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, False, ADDR32,  #
            False, 0, 0, q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
    # -- PARTIAL steps: the pattern's predicate and the bounds mask
    if not BAND:
        dq, d_alibi, d_lo, d_hi = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, q_pos, q_ok, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            PART_STEPS, tl.load(PART_PTR + csr_row), tl.load(PART_PTR + csr_row + 1), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N2, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, False, ADDR32,  #
            False, 0, 0, q_tok, start_m, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, d_alibi, d_lo, d_hi, SCR_p, HIST_p, BLOCK_M2, SKEW, TERM_GRADS)
    # -- write dQ, with the softmax scale applied once
    out = off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh \
        + q_tok[:, None].to(tl.int64) * stride_dqn + offs_d[None, :]
    # a row with no allowed key (lse = -inf) has dQ = 0, whatever 0 * NaN its tile's steps summed
    dq = tl.where((lse2 == float("-inf"))[:, None], 0.0, dq * sm_scale)
    if ADD_IN:
        dq += tl.load(DQ_IN + out, mask=q_in, other=0.0)
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=q_in)
    if (ALIBI and (TERM_GRADS & 1)) or (REL_BIAS and (TERM_GRADS & 2)):  # -- this program's gradient shares
        tl.store(PART + prog * 3, d_alibi)
        tl.store(PART + prog * 3 + 1, d_lo)
        tl.store(PART + prog * 3 + 2, d_hi)


# ----------------------------------------------------------------------------
# The predicate as a picture: int8 [H, N, N], for tests and debugging
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def pattern_mask_picture(OUT, RANDOM, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[h, q, k] = 1 where the pattern lets q attend to k in head h (grid: q tiles, k tiles, heads)."""
    off_h = tl.program_id(2)
    q_pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (q_pos[:, None] < N) & (k_pos[None, :] < N)
    allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM) & inside
    out = OUT + off_h.to(tl.int64) * N * N + q_pos[:, None].to(tl.int64) * N + k_pos[None, :]
    tl.store(out, allowed.to(tl.int8), mask=inside)
