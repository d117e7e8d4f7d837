"""The attention kernels that end every generated module (a template: not imported).

``codegen.generate_source`` copies everything below the marker line into a
generated module that first defines ``pattern_mask(q, k, h, N, RANDOM)``, the
pattern's predicate. Each program walks its tile's step lists from
``tables.py``: the FULL steps with no predicate and no bounds mask, then the
PARTIAL steps with both, each list one software-pipelined loop; or, for the
backward kernels where ``KernelConfig.bwd_band`` asks for it and every tile is
a band, the whole contiguous walk as one loop, the predicate behind a branch.

Shapes and conventions, for every kernel:

- q, o, dO, dQ ``[B, H, N, HEAD_DIM]``; k, v, dK, dV ``[B, H // GROUP, N, HEAD_DIM]``
  (GQA/MQA: query head ``h`` reads key/value head ``h // GROUP``), any strides
  with the last one 1 (the runtime makes it so);
- lse and delta fp32 ``[B, H, N]``, contiguous; lse in natural log, ``-inf``
  for a row with no allowed key;
- scores live in log2 units (``scale / ln(2)`` folded into one multiply) so
  that the softmax uses ``exp2``;
- the layout head is ``h`` when the pattern reads the head (``HEAD_DEPENDENT``)
  and 0 otherwise.
"""

import os

import triton
import triton.language as tl

pattern_mask = None  # defined by the generated module above the kernels
# Likewise the generated module's: no allowed pair has k > q (ir.within_causal). With ALiBi in
# natural order the kernels then split its bias (_score_terms' ALIBI_SPLIT, written out where
# used as `ALIBI and PAST_ONLY and NATURAL`: a jit function's result is no constexpr for Triton
# 3.6): |q - k| = q - k on every pair that counts (a pair the pattern forbids is dropped whatever
# its score), and a tile's positions lie within a tile of each other, so the bias costs one fused
# multiply-add per score instead of three instructions (D = 64 forward +17% with them).
PAST_ONLY = tl.constexpr(False)

# ---- kernels: everything below this line is copied into each generated module ----


# ----------------------------------------------------------------------------
# Slots and tokens: a planned component walks slots in its own token order
# ----------------------------------------------------------------------------


@triton.jit
def _token(slot, ORDER: tl.constexpr, L, S, C):
    """The token position of kernel slot ``slot`` in the order of a planned component,
    the kernels' one copy of ``patterncc.orders`` (ORDER its ``code``; L, S, C
    its ``kernel_args``): 0 natural, 1 residue(L) with S = ceil(n / L) slots
    per class, 2 the gathered columns of summary(L, C)."""
    if ORDER == 1:
        return (slot % S) * L + slot // S
    elif ORDER == 2:
        return (slot // C) * L + (L - C) + slot % C
    else:
        return slot


@triton.jit
def _packed_sequence(SEQS, slot, ALIGN):
    """The sequence of a packed batch that slot ``slot`` belongs to (every
    ALIGN slots belong to one: the host starts each sequence on a multiple
    of ALIGN, a multiple of every tile and step): its first slot, its slots
    (the kernels' N), its tokens (N_TOK), its residue class size (ORD_S) and
    its first token, from row ``slot // ALIGN`` of SEQS (int32 [chunks, 5])."""
    row = SEQS + (slot // ALIGN) * 5
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _step_rows(a_base, b_base, a_tile, b_tile, stride_a, stride_b, start, pos,  #
               N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM: tl.constexpr, ORDER: tl.constexpr,  #
               ADDR32: tl.constexpr = False):
    """One step of slots ``pos`` (from ``start``) on the walked axis: pointers
    to its rows of two tensors (K and V, or Q and dO), the slots' tokens, and
    which slots hold a token. ADDR32 (natural order, set by the host where
    every row offset fits in int32): the step's offsets are recomputed in
    int32 from ``pos``, so no 64-bit offset tile stays live across the loop
    (the dK/dV loop re-read 17 spilled values per step without it at D = 128,
    counted in its sm_90 code; ``bench/bench_triton.py --resources`` counts a kernel's spills)."""
    if ORDER == 0 and ADDR32:  # natural order, int32 offsets
        offs_d = tl.arange(0, HEAD_DIM)
        a_ptrs = a_base + (pos[:, None] * stride_a + offs_d[None, :])
        b_ptrs = b_base + (pos[:, None] * stride_b + offs_d[None, :])
        tok = pos
        ok = pos < N
    elif ORDER == 0:  # natural order: one contiguous step
        a_ptrs = a_base + start.to(tl.int64) * stride_a + a_tile
        b_ptrs = b_base + start.to(tl.int64) * stride_b + b_tile
        tok = pos
        ok = pos < N
    else:  # a planned order: each slot's row at its token position
        tok = _token(pos, ORDER, ORD_L, ORD_S, ORD_C)
        offs_d = tl.arange(0, HEAD_DIM)
        a_ptrs = a_base + tok[:, None].to(tl.int64) * stride_a + offs_d[None, :]
        b_ptrs = b_base + tok[:, None].to(tl.int64) * stride_b + offs_d[None, :]
        ok = (pos < N) & (tok < N_TOK)
    return a_ptrs, b_ptrs, tok, ok


# ----------------------------------------------------------------------------
# Score terms (patterncc.scores): softcap, ALiBi, relative bias; each behind a
# constexpr flag, so kernels without them compile as if they did not exist
# ----------------------------------------------------------------------------

# The GPU's tanh instruction for _tanh; the interpreter (numpy on the CPU) cannot run PTX.
_PTX_TANH = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")
# Copies of each end of the relative bias table in its reversed form (_rel_gather): a tile's
# q - k spans at most BLOCK_M + BLOCK_N - 2 positions, and tiles are at most 128 x 128.
_REL_PAD = tl.constexpr(256)


@triton.jit
def _tanh(x, APPROX: tl.constexpr = False):
    """tanh in fp32. APPROX (16-bit inputs) on the GPU: the hardware's
    tanh.approx.f32, one special-function instruction (relative error about
    2^-11, finer than a bf16 input's rounding of the score itself). Otherwise
    (fp32 inputs, or the interpreter, which cannot run PTX): (1 - e) / (1 + e)
    with e = exp(-2|x|) in (0, 1], then x's sign. e never overflows, so no
    inf / inf for large |x| (tanh -> +-1 exactly), and the absolute error is a
    few ulp of 1 everywhere: the softcapped score c * tanh(s / c) is off by
    about c * 1e-7, below what fp32 scores carry anyway. The exact form costs
    an exp2 and an IEEE division per score, which is why 16-bit inputs, whose
    forward at D = 64 is already bound by the exp2 unit, take the single
    instruction."""
    if APPROX and _PTX_TANH:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # 2/ln(2)
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
    return t


@triton.jit
def _score_terms(qk, q_at, k_at, qk_scale, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi, rel_mode,  #
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, FAST_TANH: tl.constexpr,  #
                 NATURAL: tl.constexpr, REL_SPLIT: tl.constexpr = 0, a_ref=0, ALIBI_SPLIT: tl.constexpr = False):
    """The scores, in log2 units, of the raw products ``qk = q.k`` with the
    terms applied in their order; q_at and k_at: the tile's query and key
    token positions (int32), one a column and the other a row (``[M, 1]`` and
    ``[1, N]``, or the transpose), so q_at - k_at is the tile's q - k.
    Also ``tanh(scale * qk / c)`` for the backward's chain rule (qk itself
    without SOFTCAP). cap_in = scale / c, cap_out = c / ln(2), slope2 =
    slope / ln(2); FAST_TANH: _tanh's APPROX.

    ALiBi's |q - k| is taken in fp32 from the positions converted once per
    row and column (exact below 2^24 tokens): a subtraction and a fused
    multiply-add per score, where converting each score's int32 distance
    would take the conversion unit, as slow as exp2's. ALIBI_SPLIT (every
    allowed pair has k <= q, in natural order: PAST_ONLY): the bias
    -slope (q - k) is slope (k - a_ref) - slope (q - a_ref); only the key's
    part is added here, which folds into the scale's multiply as one fused
    multiply-add, and the caller subtracts the query's part once per row,
    from its running max or its log-sum-exp. a_ref is a position of the
    tile (its first query or key), so neither part grows with the position
    itself and both keep the precision of slope * |q - k|.

    The relative bias: REL_h is this head's row of the table (_term_scalars).
    rel_mode 1 (2): every pair of the tile lies at q - k >= rel_m (<= -rel_m),
    so the bias is the scalar rel_hi (rel_lo, both / ln(2)) and no table is
    gathered. REL_SPLIT (_near_steps): 1, every tile is one of those two;
    2, none is (the table is gathered); 0, either. In natural order a
    gathered tile reads the reversed, padded table (_rel_gather), whose index
    runs along the key axis: one address per row and constant offsets, where
    the clamped index needs a 64-bit address per score (the D = 64 forward
    spilled 1 KiB for it)."""
    if SOFTCAP:
        th = _tanh(qk * cap_in, FAST_TANH)
        s = th * cap_out
    else:
        th = qk
        s = qk * qk_scale
    if ALIBI and ALIBI_SPLIT:
        s = s + slope2 * (k_at - a_ref).to(tl.float32)
    elif ALIBI:
        s = s - slope2 * tl.abs(q_at.to(tl.float32) - k_at.to(tl.float32))
    if REL_BIAS:
        if REL_SPLIT == 1:
            s = s + tl.where(rel_mode == 1, rel_hi, rel_lo)
        elif REL_SPLIT == 2:
            s = s + _rel_gather(REL_h, q_at, k_at, rel_m, NATURAL)
        elif rel_mode == 1:
            s = s + rel_hi
        elif rel_mode == 2:
            s = s + rel_lo
        else:
            s = s + _rel_gather(REL_h, q_at, k_at, rel_m, NATURAL)
    return s, th


@triton.jit
def _rel_gather(REL_h, q_at, k_at, rel_m, NATURAL: tl.constexpr):
    """The relative bias of a tile, / ln(2). Natural order: REL_h is the
    head's row of the reversed table padded by _REL_PAD copies of each end
    (launch._KernelTerms.rel_rev), so entry rel_m + _REL_PAD - (q - k) is
    t[clamp(q - k, -rel_m, rel_m) + rel_m] for every pair of a tile that
    comes within rel_m of the diagonal (its q - k spans less than _REL_PAD
    more). Otherwise REL_h is the table's own row, indexed clamped."""
    if NATURAL:
        bias = tl.load(REL_h + ((rel_m + _REL_PAD) - q_at) + k_at)
    else:
        bias = tl.load(REL_h + (tl.minimum(tl.maximum(q_at - k_at, -rel_m), rel_m) + rel_m))
    return bias * 1.44269504  # 1/ln(2)


@triton.jit
def _rel_mode(d_min, d_max, rel_m, NATURAL: tl.constexpr):
    """_score_terms' rel_mode of a tile whose q - k lies in d_min .. d_max
    (known only in natural order; 0, the gather, otherwise)."""
    if NATURAL:
        return tl.where(d_min >= rel_m, 1, tl.where(d_max <= -rel_m, 2, 0))
    else:
        return 0


@triton.jit
def _loop_rel_mode(d_min, d_max, rel_m, NATURAL: tl.constexpr, REL_SPLIT: tl.constexpr):
    """_rel_mode inside a loop of _near_steps' split (REL_SPLIT 1: far, 2: near)."""
    if REL_SPLIT == 1:
        return tl.where(d_min >= rel_m, 1, 2)
    elif REL_SPLIT == 2:
        return 0
    else:
        return _rel_mode(d_min, d_max, rel_m, NATURAL)


@triton.jit
def _near_steps(lo, hi, t_lo, t_hi, rel_m, STEP: tl.constexpr):
    """The steps na .. nb - 1 of lo .. hi - 1 (natural order, STEP positions
    each) that hold a pair of the tile t_lo .. t_hi with |q - k| < rel_m:
    the others lie wholly in a tail of the relative bias (_score_terms'
    rel_mode 1 or 2). A run with a bias walks the two kinds in two loops,
    the far ones adding one scalar, the near ones gathering the table: one
    loop that may gather keeps the gather's 64-bit pointer tile live
    throughout, and spilled (sm_90: 176 bytes in the D = 64 forward). The
    near loop runs unpipelined (one stage): pipelined, its gathered fp32
    tile took shared memory per stage (64 KiB more in the D = 64 forward),
    for the few steps near the diagonal."""
    x = t_lo - (STEP - 1) - rel_m  # steps s <= x // STEP have q - k >= rel_m
    s_a = tl.where(x >= 0, x // STEP + 1, 0)
    s_b = (t_hi + rel_m + STEP - 1) // STEP  # steps s >= s_b have q - k <= -rel_m
    na = tl.minimum(tl.maximum(s_a, lo), hi)
    nb = tl.maximum(tl.minimum(s_b, hi), na)
    return na, nb


@triton.jit
def _term_scalars(sm_scale, softcap, SLOPES, REL, REL_REV, rel_m, off_h, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  REL_BIAS: tl.constexpr, NATURAL: tl.constexpr):
    """Per-head scalars of _score_terms: cap_in, cap_out, slope2, REL_h (the
    head's row of REL_REV in natural order, of REL otherwise: _rel_gather),
    rel_lo, rel_hi."""
    cap_in = sm_scale / softcap
    cap_out = softcap * 1.44269504  # 1/ln(2)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_h) * 1.44269504
    if NATURAL:
        REL_h = REL_REV + off_h.to(tl.int64) * (2 * rel_m + 1 + 2 * _REL_PAD)
    else:
        REL_h = REL + off_h.to(tl.int64) * (2 * rel_m + 1)
    rel_lo = 0.0
    rel_hi = 0.0
    if REL_BIAS:
        rel_lo = tl.load(REL + off_h.to(tl.int64) * (2 * rel_m + 1)) * 1.44269504
        rel_hi = tl.load(REL + off_h.to(tl.int64) * (2 * rel_m + 1) + 2 * rel_m) * 1.44269504
    return cap_in, cap_out, slope2, REL_h, rel_lo, rel_hi


# ----------------------------------------------------------------------------
# Forward: one program per (query tile, batch * head)
# ----------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
                    STEPS, lo, hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C,  #
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,  #
                    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                    HEAD_DIM: tl.constexpr, K_ORDER: tl.constexpr, RUN: tl.constexpr,  #
                    SCALE_NONNEG: tl.constexpr,  #
                    q_tok, q_lo, q_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, NATURAL: tl.constexpr):
    """The key steps STEPS[lo:hi] into one query tile's softmax state
    (_attn_fwd_loop); a run in natural order with a relative bias as two
    loops, its far steps and its near ones (_near_steps)."""
    if RUN and REL_BIAS and NATURAL:
        na, nb = _near_steps(lo, hi, q_lo, q_hi, rel_m, BLOCK_N)
        far_hi = hi - (nb - na)
        acc, l_i, m_i = _attn_fwd_loop(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, lo, far_hi,
            qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, MASKED, DOT_PRECISION, NUM_STAGES,
            HEAD_DIM, K_ORDER, RUN, SCALE_NONNEG, q_tok, q_lo, q_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo,
            rel_hi, SOFTCAP, ALIBI, REL_BIAS, NATURAL, na, nb - na, 1)
        acc, l_i, m_i = _attn_fwd_loop(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, na, nb, qk_scale,
            off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, MASKED, DOT_PRECISION, 1, HEAD_DIM,
            K_ORDER, RUN, SCALE_NONNEG, q_tok, q_lo, q_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, 0, 0, 2)
    else:
        acc, l_i, m_i = _attn_fwd_loop(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, STEPS, lo, hi, qk_scale,
            off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, MASKED, DOT_PRECISION, NUM_STAGES, HEAD_DIM,
            K_ORDER, RUN, SCALE_NONNEG, q_tok, q_lo, q_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,
            SOFTCAP, ALIBI, REL_BIAS, NATURAL, 0, 0, 0)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_loop(acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
                    STEPS, lo, hi, qk_scale, off_h, N, RANDOM, N_TOK, ORD_L, ORD_S, ORD_C,  #
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,  #
                    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
                    HEAD_DIM: tl.constexpr, K_ORDER: tl.constexpr, RUN: tl.constexpr,  #
                    SCALE_NONNEG: tl.constexpr,  #
                    q_tok, q_lo, q_hi, cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL_BIAS: tl.constexpr, NATURAL: tl.constexpr,  #
                   skip_at, skip_len, REL_SPLIT: tl.constexpr):
    """The key steps STEPS[lo:hi] (BLOCK_N key slots each) into one query tile's
    softmax state; RUN: the steps lo .. hi - 1 themselves (STEPS unused).
    The score terms as in _score_terms: q_tok the tile's query tokens, q_lo
    and q_hi its first and last slot; REL_SPLIT 1 (a run's far steps): step
    i is i + skip_len from skip_at on, 2 its near ones (_near_steps)."""
    TERMS: tl.constexpr = SOFTCAP or ALIBI or REL_BIAS
    ALIBI_SPLIT: tl.constexpr = ALIBI and PAST_ONLY and NATURAL
    if ALIBI_SPLIT:  # the queries' part of ALiBi's bias, slope (q - q_lo), taken from each row's max
        q_bias = slope2 * (q_tok - q_lo).to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for i in tl.range(lo, hi, num_stages=NUM_STAGES):
        if RUN:
            step = i
            if REL_SPLIT == 1:
                step = i + tl.where(i >= skip_at, skip_len, 0)
            start_n = tl.multiple_of(step * BLOCK_N, BLOCK_N)
        else:
            start_n = tl.multiple_of(tl.load(STEPS + i) * BLOCK_N, BLOCK_N)
        k_pos = start_n + offs_n
        k_ptrs, v_ptrs, k_tok, k_ok = _step_rows(k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, start_n,  #
                                                 k_pos, N, N_TOK, ORD_L, ORD_S, ORD_C, HEAD_DIM, K_ORDER)
        # -- scores of this key step, in log2 units
        if MASKED:
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if TERMS:  # -- the score terms, scale included
            rel_mode = _loop_rel_mode(q_lo - start_n - (BLOCK_N - 1), q_hi - start_n, rel_m, NATURAL, REL_SPLIT)
            qk, _ = _score_terms(qk, q_tok[:, None], k_tok[None, :], qk_scale, cap_in, cap_out, slope2, REL_h,
                                 rel_m, rel_lo, rel_hi, rel_mode, SOFTCAP, ALIBI, REL_BIAS, DOT_PRECISION != "ieee",
                                 NATURAL, REL_SPLIT, q_lo, ALIBI_SPLIT)
        if MASKED:
            if not TERMS:
                qk = qk * qk_scale
            allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM)
            allowed = allowed & k_ok[None, :]
            qk = tl.where(allowed, qk, float("-inf"))
            # -- update m_i, the running max; a row that has seen no allowed key
            #    keeps m_i = -inf and subtracts 0 instead, so exp2 gives 0, not NaN
            row_max = tl.max(qk, 1)
            if ALIBI_SPLIT:
                row_max -= q_bias
            m_new = tl.maximum(m_i, row_max)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            if ALIBI_SPLIT:
                p = tl.math.exp2(qk - (m_sub + q_bias)[:, None])
            else:
                p = tl.math.exp2(qk - m_sub[:, None])
        elif SCALE_NONNEG and not TERMS:
            # -- every score is finite here, and the max commutes with a scale
            #    >= 0: the scale goes into exp2's argument as one fused multiply-add
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        elif ALIBI_SPLIT:
            m_new = tl.maximum(m_i, tl.max(qk, 1) - q_bias)
            m_sub = m_new
            p = tl.math.exp2(qk - (m_sub + q_bias)[:, None])
        else:
            if not TERMS:
                qk = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
            p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- update the output accumulator
        if MASKED:
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _merge_rows(o1, lse1, o0_ptrs, lse0_ptrs, rows_in, rows_ok):
    """(o1, lse1) merged by log-sum-exp with the (o0, lse0) stored at the
    pointers: o = (e^(lse0 - m) o0 + e^(lse1 - m) o1) / s, lse = m + log s;
    a row neither reaches (both -inf) stays o = 0, lse = -inf."""
    lse0 = tl.load(lse0_ptrs, mask=rows_ok, other=float("-inf"))
    o0 = tl.load(o0_ptrs, mask=rows_in, other=0.0).to(tl.float32)
    m = tl.maximum(lse0, lse1)
    m = tl.where(m == float("-inf"), 0.0, m)  # subtract 0, not -inf
    w0 = tl.exp(lse0 - m)
    w1 = tl.exp(lse1 - m)
    s = w0 + w1
    s_safe = tl.where(s > 0.0, s, 1.0)
    o = (w0[:, None] * o0 + w1[:, None] * o1) / s_safe[:, None]
    return o, tl.where(s > 0.0, m + tl.log(s_safe), float("-inf"))


@triton.jit(do_not_specialize=["N", "N_TOK", "ORD_L", "ORD_S", "ORD_C"])
def attn_fwd(Q, K, V, O, LSE, O_IN, LSE_IN, RANDOM,  #
             FULL_PTR, FULL_STEPS, PART_PTR, PART_STEPS, TILE_ORDER,  #
             stride_qb, stride_qh, stride_qn,  #
             stride_kb, stride_kh, stride_kn,  #
             stride_vb, stride_vh, stride_vn,  #
             stride_ob, stride_oh, stride_on,  #
             sm_scale, N, H, GROUP, N_TOK, ORD_L, ORD_S, ORD_C,  #
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
             HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,  #
             Q_ORDER: tl.constexpr = 0, K_ORDER: tl.constexpr = 0, FULL_RUNS: tl.constexpr = False,  #
             SCALE_NONNEG: tl.constexpr = True, MERGE_IN: tl.constexpr = False,  #
             SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, REL_BIAS: tl.constexpr = False,  #
             SINKS: tl.constexpr = False, softcap=1.0, SLOPES=None, SINK=None, REL=None, REL_REV=None, rel_m=0,  #
             PACKED: tl.constexpr = False, SEQS=None, ALIGN=1):
    """o (q's dtype) and lse (fp32, natural log) of one query tile of one head.

    N counts the kernel's slots, N_TOK the tokens; a planned component's
    slots map to tokens by ``_token`` (Q_ORDER, K_ORDER; natural: the same).
    o and lse are indexed by token. FULL_RUNS: FULL_STEPS holds each tile's
    two runs of consecutive steps (``tables.run_table``), not a step list.
    SCALE_NONNEG: sm_scale >= 0 (the FULL steps then fold it into exp2).
    MERGE_IN: merge the result with the (O_IN, LSE_IN) of the planned
    components before it (fp32, O's and LSE's strides; may be O and LSE
    themselves) before the store, so that a plan needs no merge pass (each
    token is one program's).

    Score terms (patterncc.scores): SOFTCAP with ``softcap``, ALIBI with
    SLOPES (fp32 [H]), REL_BIAS with REL (fp32 [H, 2 * rel_m + 1]), all at
    the tokens' own positions; SINKS: SINK[h] (fp32 [H]) joins each row's
    denominator in the epilogue (a plan sets it on one launch only).

    Long for a reason: a kernel's entry point holds its whole signature (each
    tensor's strides, every constexpr) and picks its walks (FULL runs or lists,
    PARTIAL lists, a band); each walk's loop is already a helper, and a
    further split would only pass the same thirty arguments down one more layer."""
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs tiles of at least 16")
    # -- this program's batch, head and query tile (the host orders tiles heaviest first)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_kvh = off_h // GROUP
    layout_h = 0
    if HEAD_DEPENDENT:
        layout_h = off_h
    n_tiles = tl.cdiv(N, BLOCK_M)
    tile = tl.load(TILE_ORDER + layout_h * n_tiles + tl.program_id(0))
    start_m = tile * BLOCK_M
    lse_row = off_bh.to(tl.int64) * N_TOK  # lse's row of this batch and head
    if PACKED:  # -- positions, N and N_TOK of this tile's sequence; its tokens from its first one on
        slot0, N, N_TOK, ORD_S, tok0 = _packed_sequence(SEQS, start_m, ALIGN)
        start_m -= slot0
        lse_row += tok0
        Q += tok0.to(tl.int64) * stride_qn
        K += tok0.to(tl.int64) * stride_kn
        V += tok0.to(tl.int64) * stride_vn
        O += tok0.to(tl.int64) * stride_on
        O_IN += tok0.to(tl.int64) * stride_on
    q_pos = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # -- base pointers of this batch and head, in 64 bits: B * H * N * HEAD_DIM may pass 2**31
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    q_tok = _token(q_pos, Q_ORDER, ORD_L, ORD_S, ORD_C)
    q_ok = (q_pos < N) & (q_tok < N_TOK)
    q_in = q_ok[:, None]
    q = tl.load(q_base + q_tok[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=q_in, other=0.0)
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]
    # -- online softmax state, fp32
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/ln(2): exp(x) == exp2(x / ln(2))
    NATURAL: tl.constexpr = Q_ORDER == 0 and K_ORDER == 0
    cap_in, cap_out, slope2, REL_h, rel_lo, rel_hi = _term_scalars(sm_scale, softcap, SLOPES, REL, REL_REV, rel_m,  #
                                                                   off_h, SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    csr_row = layout_h * n_tiles + tile
    # -- FULL steps: every pair allowed, no predicate, no bounds mask; as two
    #    runs of consecutive steps, each its own loop (no step index loaded
    #    per step), or as a step list
    if FULL_RUNS:
        runs = FULL_STEPS + 4 * csr_row
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(runs), tl.load(runs + 1), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True,  #
            SCALE_NONNEG,  #
            q_tok, start_m, start_m + (BLOCK_M - 1), cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(runs + 2), tl.load(runs + 3), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, True,  #
            SCALE_NONNEG,  #
            q_tok, start_m, start_m + (BLOCK_M - 1), cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    else:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
            FULL_STEPS, tl.load(FULL_PTR + csr_row), tl.load(FULL_PTR + csr_row + 1), qk_scale, off_h, N, RANDOM,  #
            N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, False, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, False,  #
            SCALE_NONNEG,  #
            q_tok, start_m, start_m + (BLOCK_M - 1), cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
            SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    # -- PARTIAL steps: the pattern's predicate and the bounds mask
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_pos, k_base, v_base, k_tile, v_tile, stride_kn, stride_vn,  #
        PART_STEPS, tl.load(PART_PTR + csr_row), tl.load(PART_PTR + csr_row + 1), qk_scale, off_h, N, RANDOM,  #
        N_TOK, ORD_L, ORD_S, ORD_C, BLOCK_N, True, DOT_PRECISION, NUM_STAGES, HEAD_DIM, K_ORDER, False,  #
            SCALE_NONNEG,  #
        q_tok, start_m, start_m + (BLOCK_M - 1), cap_in, cap_out, slope2, REL_h, rel_m, rel_lo, rel_hi,  #
        SOFTCAP, ALIBI, REL_BIAS, NATURAL)
    if SINKS:  # -- the sink joins the denominator: exp2 of it against the running max, as a key would
        sink2 = tl.load(SINK + off_h) * 1.44269504  # 1/ln(2)
        m_s = tl.maximum(m_i, sink2)
        m_sub = tl.where(m_s == float("-inf"), 0.0, m_s)
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_sub)
        acc = acc * alpha[:, None]
        m_i = m_s
    # -- epilogue: a row with no allowed key has l_i == 0: o = 0, lse = -inf
    #    (select, not divide: a NaN in a V tile the row's tile visited is in acc as 0 * NaN)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    o_off = off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh \
        + q_tok[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    lse_off = lse_row + q_tok
    if MERGE_IN:
        acc, lse = _merge_rows(acc, lse, O_IN + o_off, LSE_IN + lse_off, q_in, q_ok)
    tl.store(O + o_off, acc.to(O.dtype.element_ty), mask=q_in)
    tl.store(LSE + lse_off, lse, mask=q_ok)
