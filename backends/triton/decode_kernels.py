"""The query-rows kernels: a few queries against many keys (a template: not imported).

``decode.py`` appends everything below the marker line to a pattern's
generated module (``codegen.generate_source``), whose ``pattern_mask``, ``_token`` and
``_tanh`` it calls. They serve queries that sit at the *end* of their row's
keys: decoding from a KV cache (one to a few new tokens) and chunked prefill.

Shapes and conventions:

- q ``[B, H, NQ, D]``; k, v ``[B, H // GROUP, max_len, D]`` (a cache may be
  longer than a row's keys), any strides with the last one 1; or, ``PAGED``,
  pools ``[num_pages, H // GROUP, PAGE, D]`` whose pages each row reads
  through its row of ``TABLE`` (int32 ``[B, max_pages]``): key ``t`` of row
  ``b`` is slot ``t % PAGE`` of page ``TABLE[b, t // PAGE]``;
- ``LENS`` int32 ``[B]``: row ``b`` has keys ``0 .. LENS[b] - 1``, and its
  queries are the tokens ``LENS[b] - NQ .. LENS[b] - 1`` (bottom-right);
- ``LIST_PTR`` / ``LIST_IDX`` (int32): the key blocks each query tile of each
  (batch row, layout head) may touch, from the pattern's block layout at that
  row's length (``decode.py``), ascending; each program takes one slice of
  its tile's list (split-KV, "flash-decoding");
- one program serves ``HEADS`` query heads of one key/value head (the whole
  GQA group when the pattern is the same for every head): its tile's rows
  are those heads times ``TILE_Q`` query positions, so each K and V block is
  read once per group, not once per query head;
- ``O_PART`` fp32 ``[ALL_SPLITS, B, H, NQ, D]``, ``LSE_PART`` fp32
  ``[ALL_SPLITS, B, H, NQ]``: each split's (of each planned piece's)
  normalized output and natural-log log-sum-exp, merged by ``attn_rows_merge``
  into o (q's dtype) and lse, with the sinks.

Every visited block is masked by the predicate and by ``k < LENS[b]``: a
query tile's list is the union of its block rows' lists, so a block FULL
for one row need not be for the tile, and decoding is bound by reading K and
V, not by the predicate.
"""

import triton
import triton.language as tl

pattern_mask = None  # defined by the generated module above the kernels
_tanh = None  # likewise (kernels.py's score-term helper)
_token = None  # likewise (kernels.py's slot-to-token helper)

# ---- query-rows kernel: everything below this line is appended to the generated module ----


@triton.jit
def _key_tokens(slot, K_ORDER: tl.constexpr, L, S, C):
    """The token of each key slot in a planned piece's key order (kernels.py's
    ``_token``), and whether the slot is one of the order's (residue order
    has ``L * S``; the others' slots past the keys are masked by length)."""
    tok = _token(slot, K_ORDER, L, S, C)
    if K_ORDER == 1:
        return tok, slot < L * S
    else:
        return tok, slot >= 0


@triton.jit
def _key_offsets(k_pos, k_ok, offs_d, row_table, stride_kb, stride_kn, stride_vb, stride_vn,  #
                 PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Each key's K and V element offsets (``[BLOCK_N, HEAD_DIM]``) from its
    key/value head's base: its position in a contiguous cache; in a paged
    one, slot ``k_pos % PAGE`` of the page its row's table names."""
    if PAGED:
        page = tl.load(row_table + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
        slot = (k_pos % PAGE).to(tl.int64)
        k_off = page[:, None] * stride_kb + slot[:, None] * stride_kn + offs_d[None, :]
        v_off = page[:, None] * stride_vb + slot[:, None] * stride_vn + offs_d[None, :]
    else:
        k_off = k_pos[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        v_off = k_pos[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
    return k_off, v_off


@triton.jit(do_not_specialize=["NQ", "D", "H", "GROUP", "HEADS", "LAYOUT_HEADS", "TILES", "SPLITS", "ORD_L",
                               "ORD_C", "SPLIT0", "ALL_SPLITS", "stride_tb", "rel_m", "ROWS", "MAX_LEN"])
def attn_rows_fwd(Q, K, V, O_PART, LSE_PART, LENS, RANDOM, LIST_PTR, LIST_IDX, TABLE,  #
                  stride_qb, stride_qh, stride_qn,  #
                  stride_kb, stride_kh, stride_kn,  #
                  stride_vb, stride_vh, stride_vn, stride_tb,  #
                  sm_scale, NQ, D, H, GROUP, HEADS, LAYOUT_HEADS, TILES, SPLITS, ORD_L, ORD_C, SPLIT0, ALL_SPLITS,  #
                  softcap, SLOPES, REL, rel_m, ROWS, MAX_LEN,  #
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE_Q: tl.constexpr, BLOCK_N: tl.constexpr,  #
                  HEAD_DEPENDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, K_ORDER: tl.constexpr = 0,
                  PAGED: tl.constexpr = False, PAGE: tl.constexpr = 1, BY_ROW: tl.constexpr = False,  #
                  SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, REL_BIAS: tl.constexpr = False,
                  PAD_D: tl.constexpr = True, CLASS_RANGE: tl.constexpr = False, NUM_STAGES: tl.constexpr = 3):
    """One split of one query tile of ``HEADS`` query heads of one key/value
    head of one batch row: its normalized output and lse over the key blocks
    of its slice of the tile's list.

    Rows of the tile: row ``r`` is query head ``head0 + r // TILE_Q`` at query
    position ``tile * TILE_Q + r % TILE_Q``; ``BLOCK_M >= HEADS * TILE_Q``
    (at least 16 for tl.dot), the rest padding.

    A planned piece (``K_ORDER`` residue or columns) lists key *slot* blocks:
    its keys are read at their tokens (``_key_tokens``), so the stride or
    summary keys of a query are a few contiguous slot blocks. The predicate
    is always the piece's own, over token positions. The piece's splits are
    ``SPLIT0 .. SPLIT0 + SPLITS - 1`` of ``ALL_SPLITS`` (every piece's).

    ``BY_ROW``: the lengths were not read by the host (a CUDA graph replays
    the call at new ones), so the lists are the layout's, one per query
    block row ``r`` of ``ROWS`` (``LIST_PTR[layout_h * ROWS + r]``) at the
    cache's length ``MAX_LEN``, and a tile walks the list of each block row
    it spans (at most two), with only that row's queries: every (query,
    key) pair is visited once. Lengths are kept within ``0 .. MAX_LEN``.
    ``CLASS_RANGE`` (with BY_ROW, a residue piece, one query per row: NQ ==
    TILE_Q == 1): no lists at all; the query's keys are its residue class,
    the slots ``r * S .. r * S + S - 1``, a run of slot blocks computed from
    the row's length (a residue piece's slot lists change with every
    length, so lists could not be made ahead). The predicate masks the
    neighbouring classes' slots in the run's end blocks.

    Score terms (patterncc.scores) as in the training kernels: SOFTCAP with
    ``softcap``, ALIBI with SLOPES (fp32 [H]), REL_BIAS with REL (fp32 [H,
    2 * rel_m + 1]), at the tokens' own positions. Sinks join in the merge.

    Long for a reason: a kernel's entry point holds its whole signature (each
    tensor's strides, every constexpr) and picks its walks (FULL runs or lists,
    PARTIAL lists, a band); each walk's loop is already a helper, and a
    further split would only pass the same thirty arguments down one more layer."""
    tl.static_assert(HEAD_DIM >= 16, "tl.dot needs a head dim of at least 16")
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs tiles of at least 16")
    tile = tl.program_id(0)
    off_bg = tl.program_id(1)
    split = tl.program_id(2)
    groups = H // HEADS
    off_b = off_bg // groups
    head0 = (off_bg % groups) * HEADS
    off_kvh = head0 // GROUP
    layout_h = 0
    if HEAD_DEPENDENT:  # (then HEADS == 1)
        layout_h = head0
    n_b = tl.load(LENS + off_b)
    if BY_ROW:  # lengths the host never saw: kept within the cache
        n_b = tl.minimum(tl.maximum(n_b, 0), MAX_LEN)
    # -- this tile's rows: query heads and positions (bottom-right)
    r = tl.arange(0, BLOCK_M)
    heads = head0 + r // TILE_Q
    rows = tile * TILE_Q + r % TILE_Q
    q_tok = n_b - NQ + rows
    row_ok = (r < HEADS * TILE_Q) & (rows < NQ) & (q_tok >= 0)
    q_pos = tl.maximum(q_tok, 0)  # the predicate sees positions in 0 .. n_b - 1 only
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Head dims padded to a power of two read zeros past D. Unpadded (PAD_D false), the mask is
    # against the constant: a runtime D would leave the compiler unable to prove 16-byte runs of
    # the K and V rows, and every load would be a 2-byte scalar one, never pipelined.
    d_ok = offs_d < (D if PAD_D else HEAD_DIM)
    d_row = D if PAD_D else HEAD_DIM  # O_PART's row length
    q_ptrs = Q + off_b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh \
        + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:  # the pools' first dimension is the page: a row's base is its key/value head in page 0
        k_base = K + off_kvh.to(tl.int64) * stride_kh
        v_base = V + off_kvh.to(tl.int64) * stride_vh
    else:
        k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    row_table = TABLE + off_b.to(tl.int64) * stride_tb
    qk_scale = sm_scale * 1.44269504  # 1/ln(2): scores in log2 units, for exp2
    # -- the score terms' per-row values (heads differ along the rows)
    cap_in = sm_scale / softcap
    cap_out = softcap * 1.44269504  # 1/ln(2)
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope2 = tl.load(SLOPES + heads, mask=row_ok, other=0.0) * 1.44269504
    rel_rows = REL + heads.to(tl.int64) * (2 * rel_m + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    ord_s = tl.cdiv(n_b, ORD_L)  # a residue class's slots at this row's length
    first_tok = tl.maximum(n_b - NQ + tile * TILE_Q, 0)
    last_tok = tl.minimum(n_b - NQ + tile * TILE_Q + TILE_Q - 1, n_b - 1)
    for walk in tl.static_range(2 if BY_ROW else 1):
        # -- the key-block list this pass walks, and this split's slice of it
        if CLASS_RANGE:
            r_cls = tl.maximum(last_tok, 0) % ORD_L
            beg = (r_cls * ord_s) // BLOCK_N
            end = tl.cdiv(r_cls * ord_s + ord_s, BLOCK_N)
            end = tl.where(last_tok >= 0, end, beg)  # (a row without queries walks nothing)
            if walk > 0:  # one walk: the class holds every key the query may attend
                end = beg
            pass_ok = row_ok
        elif BY_ROW:
            block_row = first_tok // BLOCK_N + walk
            which = layout_h * ROWS + tl.minimum(block_row, ROWS - 1)
            pass_ok = row_ok & (q_pos // BLOCK_N == block_row)
            beg = tl.load(LIST_PTR + which)
            end = tl.load(LIST_PTR + which + 1)
            end = tl.where(block_row <= last_tok // BLOCK_N, end, beg)  # (last_tok < 0: a row without queries)
        else:
            which = (off_b * LAYOUT_HEADS + layout_h) * TILES + tile
            pass_ok = row_ok
            beg = tl.load(LIST_PTR + which)
            end = tl.load(LIST_PTR + which + 1)
        per_split = tl.cdiv(end - beg, SPLITS)
        lo = beg + split * per_split
        hi = tl.minimum(end, lo + per_split)
        for e in tl.range(lo, hi, num_stages=NUM_STAGES):  # the next blocks' loads in flight
            if CLASS_RANGE:
                k_slot = e * BLOCK_N + offs_n
            else:
                k_slot = tl.load(LIST_IDX + e) * BLOCK_N + offs_n
            k_pos, k_ok = _key_tokens(k_slot, K_ORDER, ORD_L, ord_s, ORD_C)
            k_ok = k_ok & (k_pos < n_b)
            k_off, v_off = _key_offsets(k_pos, k_ok, offs_d, row_table, stride_kb, stride_kn, stride_vb, stride_vn,
                                        PAGED, PAGE)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + k_off, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            # -- the score terms, in their order: softcap, alibi, relative bias
            if SOFTCAP:
                qk = _tanh(qk * cap_in, DOT_PRECISION != "ieee") * cap_out
            else:
                qk = qk * qk_scale
            dist = q_tok[:, None] - k_pos[None, :]
            if ALIBI:
                qk = qk - slope2[:, None] * tl.abs(dist).to(tl.float32)
            if REL_BIAS:
                bucket = tl.minimum(tl.maximum(dist, -rel_m), rel_m) + rel_m
                bias = tl.load(rel_rows[:, None] + bucket, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                qk = qk + bias * 1.44269504  # 1/ln(2)
            # -- the pattern, the row's length and the tile's real rows (of this pass)
            allowed = pattern_mask(q_pos[:, None], tl.minimum(k_pos, n_b - 1)[None, :], head0, n_b, RANDOM)
            allowed = allowed & k_ok[None, :] & pass_ok[:, None]
            qk = tl.where(allowed, qk, float("-inf"))
            # -- online softmax; a row that has seen no allowed key subtracts 0, not -inf
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + v_off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
    # -- this split's normalized output and natural-log lse (0 and -inf where it saw no key;
    #    select, not divide: a NaN in a V block the tile read is in acc as 0 * NaN)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # ln(2)
    part = (((SPLIT0 + split) * (tl.num_programs(1) // groups) + off_b) * H + heads).to(tl.int64) * NQ + rows
    out_ok = (r < HEADS * TILE_Q) & (rows < NQ)
    tl.store(O_PART + part[:, None] * d_row + offs_d[None, :], o, mask=out_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, lse, mask=out_ok)


@triton.jit(do_not_specialize=["NQ", "D", "H", "ALL_SPLITS"])
def attn_rows_merge(O_PART, LSE_PART, O, LSE, SINK, NQ, D, H, ALL_SPLITS,  #
                    stride_ob, stride_oh, stride_on,  #
                    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, SINKS: tl.constexpr = False,
                    PAD_D: tl.constexpr = True):
    """o (O's dtype) and lse (fp32 ``[B, H, NQ]``, contiguous) of ``BLOCK_R``
    query rows of one (batch row, head): the splits' partial results
    weighted by their share of the log-sum-exp; with SINKS, SINK[h] (fp32
    [H]) joins the denominator as a key whose value is 0. A row no split saw
    and no sink gets o = 0, lse = -inf (never NaN)."""
    off_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < NQ
    mask = row_ok[:, None] & (offs_d < (D if PAD_D else HEAD_DIM))[None, :]  # (PAD_D: as attn_rows_fwd)
    d_row = D if PAD_D else HEAD_DIM
    stride_split = (tl.num_programs(0) * NQ).to(tl.int64)  # one split's rows, all (batch row, head)s
    here = off_bh.to(tl.int64) * NQ + rows
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s in range(ALL_SPLITS):
        lse_s = tl.load(LSE_PART + s * stride_split + here, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, lse_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        w = tl.exp(lse_s - m_sub)
        o_s = tl.load(O_PART + (s * stride_split + here)[:, None] * d_row + offs_d[None, :], mask=mask, other=0.0)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    if SINKS:  # -- the sink joins the denominator against the running max, as a split would
        sink = tl.load(SINK + off_bh % H)
        m_new = tl.maximum(m_i, sink)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        l_i = l_i * alpha + tl.exp(sink - m_sub)
        acc = acc * alpha[:, None]
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
    off_b = off_bh // H
    off_h = off_bh % H
    o_ptrs = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh \
        + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + here, lse, mask=row_ok)
