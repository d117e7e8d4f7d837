"""Queries shorter than keys, KV caches and generation, against the float64 reference.

The reference defines the meaning (queries are the last ``n_q`` of the
keys' positions; with ``cache_seqlens`` row ``b`` uses its first
``cache_seqlens[b]`` positions): it is checked against the full-length
reference's last rows and gradients. The Triton query-rows kernel and the
padded training path are checked against the reference on drawn patterns,
lengths, offsets, splits and dtypes (interpreter on the CPU, the card with
CUDA); generation with the cache against recomputing the whole sequence.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import patterncc as pcc
from patterncc import ir
from patterncc.testing import patterns

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 3e-2), torch.bfloat16: (3e-2, 1.5e-1)}  # o, grads


from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)


def tensors(B, H, Hkv, n_q, n_k, D, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
               for shape in ((B, H, n_q, D), (B, Hkv, n_k, D), (B, Hkv, n_k, D)))
    return q, k, v


def _grads(attn, q, k, v, do, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, lse = attn(*leaves, return_lse=True, **kwargs)
    (o.to(do.dtype) * do).sum().backward()
    return o.detach(), lse.detach(), [x.grad for x in leaves]


SMALL_PATTERNS = ["causal", "strided(8)", "fixed(8, 2)", "sliding_window(13)", "bigbird(4, 3, 1, 8, 7)",
                  "cycle(causal, local(5))", "causal & local(isqrt(n))", "causal - sink(20)",
                  "causal & (where (q - k) % 3 != 1)"]


# ----------------------------------------------------------------------------
# The reference: the definition
# ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pat=patterns(heads=2), n_k=st.integers(1, 40), data=st.data())
def test_reference_short_queries_are_the_last_rows(pat, n_k, data):
    """o, lse and every gradient of n_q queries equal the last n_q rows of the
    full-length call (whose other rows get a zero output gradient)."""
    n_q = data.draw(st.integers(1, n_k))
    ref = pcc.compile(pat, backend="reference", dense_limit=data.draw(st.sampled_from([0, 4096])))
    q, k, v = tensors(1, 2, 1, n_k, n_k, 8, seed=data.draw(st.integers(0, 99)))
    do = torch.randn(1, 2, n_q, 8, dtype=torch.float64)
    full_do = torch.cat([torch.zeros(1, 2, n_k - n_q, 8, dtype=torch.float64), do], dim=2)
    o, lse, (dq, dk, dv) = _grads(ref, q, k, v, full_do)
    o2, lse2, (dq2, dk2, dv2) = _grads(ref, q[:, :, n_k - n_q:], k, v, do)
    torch.testing.assert_close(o2, o[:, :, n_k - n_q:], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse2, lse[:, :, n_k - n_q:], rtol=0, atol=1e-12)
    torch.testing.assert_close(dq2, dq[:, :, n_k - n_q:], rtol=0, atol=1e-12)
    torch.testing.assert_close(dk2, dk, rtol=0, atol=1e-12)
    torch.testing.assert_close(dv2, dv, rtol=0, atol=1e-12)


def test_reference_cache_rows_are_calls_of_their_own():
    ref = pcc.compile("strided(8)", backend="reference")
    q, k, v = tensors(3, 2, 2, 3, 50, 8)
    lens = torch.tensor([50, 3, 21], dtype=torch.int32)
    o, lse = ref(q, k, v, return_lse=True, cache_seqlens=lens)
    for b, n in enumerate(lens.tolist()):
        ob, lseb = ref(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], return_lse=True)
        assert torch.equal(o[b:b + 1], ob) and torch.equal(lse[b:b + 1], lseb)
    # numpy in, numpy out
    o_np = ref(q.numpy(), k.numpy(), v.numpy(), cache_seqlens=[50, 3, 21])
    np.testing.assert_array_equal(o_np, o.numpy())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("lens, match", [
    ([50, 2], "each length counts the row's 3 new queries"),
    ([51, 4], "fits its cache"),
    ([50], "one length per batch row"),
    ("50", "cache_seqlens must be"),
])
def test_bad_cache_seqlens_are_named(backend, lens, match):
    attn = pcc.compile("causal", backend=backend)
    q, k, v = tensors(2, 2, 2, 3, 50, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        attn(q, k, v, cache_seqlens=lens)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_more_queries_than_keys_is_an_error(backend):
    q, k, v = tensors(1, 2, 2, 9, 8, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="n_q <= n_k"):
        pcc.compile("causal", backend=backend)(q, k, v)


# ----------------------------------------------------------------------------
# The Triton backend against the reference
# ----------------------------------------------------------------------------


def term_tensors(H, softcap=None, alibi=False, sinks=False, rel_m=None, seed=0, device=DEVICE):
    """The score terms of a call as keyword arguments: random fp32 tensors, sinks around the scores' size."""
    gen = torch.Generator().manual_seed(seed + 1000)
    made = {}
    if softcap is not None:
        made["softcap"] = softcap
    if alibi:
        made["alibi_slopes"] = torch.rand(H, generator=gen).to(device)
    if sinks:
        made["sinks"] = torch.randn(H, generator=gen).to(device)
    if rel_m is not None:
        made["rel_bias"] = torch.randn(H, 2 * rel_m + 1, generator=gen).to(device)
    return made


def paged(k, v, page, seed=0, spare=3):
    """The caches ``[B, Hkv, max_len, D]`` as page pools ``[num_pages, Hkv, page, D]`` in a random page
    order (with ``spare`` pages nobody reads, filled with NaN) and int32 tables ``[B, max_pages]``."""
    B, Hkv, max_len, D = k.shape
    pages = -(-max_len // page)
    pad = pages * page - max_len
    k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("nan")) for x in (k, v))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * pages + spare, generator=gen)
    k_pool = torch.full((B * pages + spare, Hkv, page, D), float("nan"), dtype=k.dtype, device=k.device)
    v_pool = k_pool.clone()
    table = order[:B * pages].view(B, pages).to(torch.int32)
    for b in range(B):
        for j in range(pages):
            k_pool[table[b, j]] = k[b, :, j * page:(j + 1) * page]
            v_pool[table[b, j]] = v[b, :, j * page:(j + 1) * page]
    return k_pool, v_pool, table.to(k.device)


def _check_rows(src, lens, n_q, *, H=4, Hkv=2, D=16, dtype=torch.float32, splits=None, max_len=None, seed=0,
                terms=None, page=None):
    """The query-rows kernel (``RowsAttention``) against the reference's cache call: o, lse, rows with no key;
    ``terms``: score-term keyword arguments; ``page``: the caches as pools read through a permuted table."""
    from patterncc.backends.triton.decode import RowsAttention

    pat = pcc.parse(src)
    B = len(lens)
    terms = terms or {}
    q, k, v = tensors(B, H, Hkv, n_q, max_len or max(lens), D, dtype=dtype, seed=seed, device=DEVICE)
    rows = RowsAttention(pat, block=16, splits=splits)
    if page is None:
        o, lse = rows(q, k, v, lens, **terms)
    else:
        k_pool, v_pool, table = paged(k, v, page, seed=seed)
        o, lse = rows(q, k_pool, v_pool, lens, block_table=table, **terms)
    from patterncc.backends.reference import ReferenceAttention

    ref_terms = {name: (x.double().cpu() if isinstance(x, torch.Tensor) else x) for name, x in terms.items()}
    ro, rlse = ReferenceAttention(pat)(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                       return_lse=True, cache_seqlens=lens, **ref_terms)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isfinite(lse).cpu(), torch.isfinite(rlse)), "rows with no key differ"
    assert not o.isnan().any()
    atol = TOL[dtype][0]
    torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=atol)
    finite = torch.isfinite(rlse)
    torch.testing.assert_close(lse.double().cpu()[finite], rlse[finite], rtol=0, atol=2e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("src", SMALL_PATTERNS)
def test_rows_kernel_standard_cases(src):
    _check_rows(src, [70, 33], 1, splits=2)  # decoding: one query, rows of different lengths
    _check_rows(src, [70, 40], 20, splits=3, D=24)  # chunked prefill: a tile over two block rows, D padded


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pat=patterns(heads=2), data=st.data())
def test_rows_kernel_drawn(pat, data):
    n_q = data.draw(st.integers(1, 20))
    lens = data.draw(st.lists(st.integers(n_q, 60), min_size=1, max_size=3))
    _check_rows(ir.source(pat), lens, n_q, H=2, Hkv=data.draw(st.sampled_from([1, 2])),
                splits=data.draw(st.integers(1, 3)), max_len=max(lens) + data.draw(st.integers(0, 5)),
                seed=data.draw(st.integers(0, 99)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rows_kernel_16_bit(dtype):
    _check_rows("sliding_window(13)", [40, 17], 4, dtype=dtype, splits=2)


def test_rows_kernel_length_one_and_empty_rows():
    _check_rows("causal", [1, 5], 1)
    # every query of `none` and of rows that attend only later keys: o = 0, lse = -inf
    _check_rows("none", [20, 9], 3, splits=2)
    _check_rows("causal & (where k > 10)", [30, 9], 4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
def test_a_batch_of_no_rows(backend, grad):
    """B = 0 with a cache (host or device lengths) and with a paged one: every backend gives the empty
    outputs of their shapes, as it does without a cache, and zero gradients of the caches' and the
    terms' shapes (no output depends on them). Every other empty dimension is refused by name."""
    attn = pcc.compile("sliding_window(13) with softcap(3)", backend=backend, block=16)
    q, k, v = (x.requires_grad_(grad) for x in tensors(0, 4, 2, 2, 20, 16, dtype=torch.float32, device=DEVICE))
    sinks = torch.randn(4, device=DEVICE, requires_grad=grad)
    pool = torch.randn(3, 2, 16, 16, device=DEVICE, requires_grad=grad)
    table = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    for kv, lens in (((k, v), []), ((k, v), torch.zeros(0, dtype=torch.int32, device=DEVICE)),
                     ((pool, pool), torch.zeros(0, dtype=torch.int32, device=DEVICE))):
        paged = dict(block_table=table) if kv[0] is pool else {}
        o, lse = attn(q, *kv, cache_seqlens=lens, return_lse=True, sinks=sinks, **paged)
        assert o.shape == (0, 4, 2, 16) and lse.shape == (0, 4, 2)
        if grad:
            leaves = (q, kv[0], sinks) if paged else (q, k, v, sinks)
            for leaf, g in zip(leaves, torch.autograd.grad(o.sum() + lse.sum(), leaves)):
                assert g.shape == leaf.shape and not g.any()
    with pytest.raises(ValueError, match="must be >= 1"):
        attn(*tensors(1, 4, 2, 0, 20, 16, dtype=torch.float32, device=DEVICE), cache_seqlens=[5])


@pytest.mark.parametrize("src", ["causal", "strided(8)", "fixed(8, 2)", "cycle(causal, local(5))"])
@pytest.mark.parametrize("Hkv, n_q", [(4, 3), (2, 8), (1, 5)], ids=["group1", "group2", "group4"])
def test_rows_kernel_gqa_groups(src, Hkv, n_q):
    """GQA 1:1, 2:1 and 4:1 with 1 and 3 to 8 queries a row: a program serves its group's heads (the
    cycle pattern differs per head: one head a program there), rows of different lengths."""
    _check_rows(src, [37, 1, 64], 1, H=4, Hkv=Hkv, splits=2)
    _check_rows(src, [45, n_q], n_q, H=4, Hkv=Hkv, splits=2, seed=n_q)


def test_rows_kernel_reads_each_kv_block_once_per_group():
    """A program per (batch row, key/value head, split), not per query head, where the pattern is the
    same for every head; per query head where it is not."""
    from patterncc.backends.triton.decode import RowsAttention

    rows = RowsAttention(pcc.parse("sliding_window(40)"), block=16, splits=2)
    step = rows._step([100, 60], 100, 1, 32, 8, 128, torch.bfloat16, torch.device(DEVICE))
    (launch,) = step.launches
    assert launch.grid == (1, 2 * 8, 2) and launch.heads == 4 and launch.block_m == 16
    step = rows._step([100, 60], 100, 8, 32, 8, 128, torch.bfloat16, torch.device(DEVICE))
    assert step.launches[0].grid == (1, 2 * 8, 2) and step.launches[0].block_m == 32
    per_head = RowsAttention(pcc.parse("cycle(causal, local(5))"), block=16, splits=1)
    step = per_head._step([100, 60], 100, 1, 32, 8, 128, torch.bfloat16, torch.device(DEVICE))
    assert step.launches[0].grid == (1, 2 * 32, 1) and step.launches[0].heads == 1


TERMS = [dict(softcap=2.5), dict(alibi=True), dict(sinks=True), dict(rel_m=6),
         dict(softcap=3.0, alibi=True, sinks=True, rel_m=4)]


@pytest.mark.parametrize("src, which", [("causal", which) for which in TERMS] + [
    (src, TERMS[-1]) for src in ("strided(8)", "fixed(8, 2)", "sliding_window(13)", "cycle(causal, local(5))")],
    ids=lambda x: "+".join(x) if isinstance(x, dict) else x)
def test_rows_kernel_score_terms(src, which):
    """Softcap, alibi, sinks and the relative bias in the query-rows kernel, alone and together,
    with GQA and split rows; the planned pieces of strided(8) each apply them at token positions."""
    _check_rows(src, [70, 33], 1, splits=2, terms=term_tensors(4, **which))
    _check_rows(src, [41, 20], 6, Hkv=1, splits=3, terms=term_tensors(4, **which, seed=1), seed=1)


def test_rows_kernel_sinks_on_rows_without_keys():
    """A row with no allowed key and a sink: o = 0 and lse = the sink, split or not."""
    from patterncc.backends.triton.decode import RowsAttention

    terms = term_tensors(4, sinks=True)
    _check_rows("causal & (where k > 10)", [30, 9], 4, splits=2, terms=terms)
    q, k, v = tensors(2, 4, 2, 3, 20, 16, dtype=torch.float32, device=DEVICE)
    o, lse = RowsAttention(pcc.parse("none"), block=16, splits=2)(q, k, v, [20, 9], **terms)
    assert torch.equal(o, torch.zeros_like(o))
    torch.testing.assert_close(lse, terms["sinks"].view(1, 4, 1).expand(2, 4, 3), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rows_kernel_terms_16_bit(dtype):
    _check_rows("sliding_window(13)", [40, 17], 4, dtype=dtype, splits=2,
                terms=term_tensors(4, softcap=5.0, alibi=True, sinks=True, rel_m=3))


def test_rows_kernel_terms_through_the_public_call():
    """``attn(...)`` without gradients takes the query-rows kernel with the pattern's own terms
    (``with softcap, alibi``) and the call's; it agrees with the padded training kernels."""
    attn = pcc.compile("strided(8) with softcap(4), alibi", backend="triton", block=16)
    q, k, v = tensors(2, 4, 2, 3, 40, 16, dtype=torch.float32, device=DEVICE)
    terms = term_tensors(4, sinks=True, rel_m=5)
    lens = torch.tensor([40, 23], dtype=torch.int32)
    with torch.no_grad():
        rows = attn(q, k, v, return_lse=True, cache_seqlens=lens, **terms)
    padded = attn(q.requires_grad_(), k, v, return_lse=True, cache_seqlens=lens, **terms)
    ref = pcc.compile("strided(8) with softcap(4), alibi", backend="reference")(
        *(x.detach().double().cpu() for x in (q, k, v)), return_lse=True, cache_seqlens=lens,
        **{name: x.double().cpu() for name, x in terms.items()})
    for got in (rows, padded):
        torch.testing.assert_close(got[0].detach().double().cpu(), ref[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[1].detach().double().cpu(), ref[1], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------
# Lengths on the device: nothing read back, so a CUDA graph can capture the call
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("src", ["causal", "strided(8)", "fixed(8, 2)", "sliding_window(13)",
                                 "cycle(causal, local(5))", "causal - sink(20)"])
@pytest.mark.parametrize("n_q", [1, 16])
def test_device_lengths_walk_the_rows_lists(src, n_q):
    """Lengths as a tensor on q's device: every block row's list at the cache's length, a tile walking
    the (one or two) rows it spans; exact against the reference, terms included."""
    from patterncc.backends.triton.decode import RowsAttention

    pat = pcc.parse(src)
    q, k, v = tensors(3, 4, 2, n_q, 64, 16, dtype=torch.float32, seed=n_q, device=DEVICE)
    terms = term_tensors(4, alibi=True, sinks=True, seed=n_q)
    lens = [64, n_q, 37]
    rows = RowsAttention(pat, block=16, splits=2)
    o, lse = rows(q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE), **terms)
    assert rows.row_step(64, 3, n_q, 4, 2, 16, torch.float32, torch.device(DEVICE)).by_row
    from patterncc.backends.reference import ReferenceAttention

    ro, rlse = ReferenceAttention(pat)(*(x.double().cpu() for x in (q, k, v)), return_lse=True, cache_seqlens=lens,
                                       **{name: x.double().cpu() for name, x in terms.items()})
    torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double().cpu(), rlse, rtol=0, atol=2e-5)


@pytest.mark.parametrize("src", ["strided(8)", "strided(5)", "strided(16) with alibi", "strided(3)"])
def test_device_lengths_walk_a_residue_class_without_lists(src):
    """Decoding a strided pattern with device lengths: its residue piece has no lists (they would change
    with every length); the kernel walks the query's class, a run of slot blocks that straddles the
    neighbouring classes' slots (l not dividing the block, rows shorter than l, a row of length 1),
    exact against the reference."""
    from patterncc.backends.reference import ReferenceAttention
    from patterncc.backends.triton.decode import RowsAttention

    attn = pcc.compile(src)
    pat = attn.mask_pattern
    q, k, v = tensors(5, 4, 2, 1, 70, 16, dtype=torch.float32, seed=3, device=DEVICE)
    terms = term_tensors(4, alibi=True, sinks=True, seed=3) if "alibi" in src else {}
    lens = [70, 1, 37, 2, 64]
    rows = RowsAttention(pat, block=16, splits=3)
    o, lse = rows(q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE), **terms)
    step = rows.row_step(70, 5, 1, 4, 2, 16, torch.float32, torch.device(DEVICE))
    assert [launch.class_range for launch in step.launches] == [False, True]
    ro, rlse = ReferenceAttention(pat)(*(x.double().cpu() for x in (q, k, v)), return_lse=True, cache_seqlens=lens,
                                       **{name: x.double().cpu() for name, x in terms.items()})
    torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double().cpu(), rlse, rtol=0, atol=2e-5)


def test_residue_classes_walked_only_where_they_pay():
    """Class walks for one query per row where each head's class is mostly allowed; else natural order.
    strided(128) at 1M tokens fits the row lists this way (natural order would need 134M entries)."""
    from patterncc.backends.triton.decode import RowsAttention

    def ranged(src, nq, max_len=64):
        step = RowsAttention(pcc.parse(src), block=16).row_step(max_len, 1, nq, 4, 2, 16, torch.float32,
                                                                torch.device(DEVICE))
        return None if step is None else [launch.class_range for launch in step.launches]

    assert ranged("strided(8)", 1) == [False, True]
    assert ranged("strided(8)", 16) == [False]  # several queries a row: natural order
    assert ranged("cycle(strided(8), causal)", 1) == [False]  # a head whose class holds nothing it attends
    assert ranged("strided(128)", 1, 1 << 20) == [False, True]


def test_split_kv_gives_every_program_one_slice_length():
    """Splits as a 132-SM card would get them (no card needed: the count is
    arithmetic): at most two programs per SM, slices of at least 8 blocks, a
    planned call's long piece split while its short band piece is not."""
    from patterncc.backends.triton import decode

    attn = decode.RowsAttention(pcc.parse("causal"))
    card = torch.device("cuda", 0)
    attn._sms[card] = 132
    sms = decode._PROGRAMS_PER_SM * 132
    # one piece, 8 programs (B = 1, 8 KV heads) over 16,384 blocks: 33 splits of 496 blocks
    assert attn._splits([8], [16384], card) == [sms // 8]
    # a short list is not cut below the minimum slice: 64 blocks -> 8 slices of 8
    assert attn._splits([8], [64], card) == [64 // decode._MIN_SPLIT_BLOCKS]
    # many programs already: no split
    assert attn._splits([4096], [16384], card) == [1]
    # a long piece beside a band of 3 blocks: the band stays whole, the long one takes the programs
    long_piece, band = attn._splits([64, 64], [4100, 3], card)
    assert band == 1 and 64 * long_piece <= sms < 64 * (long_piece + 1) + 64
    # no program reads more than twice the call's slice, whatever its piece, and no more programs than wanted
    rows, longest = [8, 8, 8], [4000, 1000, 250]
    splits = attn._splits(rows, longest, card)
    call_slice = sum(r * l for r, l in zip(rows, longest)) / sms
    assert splits == [25, 6, 1]
    assert all(l / s < 2 * call_slice for l, s in zip(longest, splits))
    assert sum(r * s for r, s in zip(rows, splits)) <= sms
    # a forced factor and a CPU device
    assert decode.RowsAttention(pcc.parse("causal"), splits=5)._splits([8, 8], [10, 10], card) == [5, 5]
    assert attn._splits([8, 8], [100, 100], torch.device("cpu")) == [1, 1]


@pytest.mark.parametrize("src, n_q, per_length_lists", [
    ("sliding_window(13)", 1, False), ("strided(8)", 1, False), ("fixed(8, 2)", 3, False),
    ("strided(8)", 4, True),  # several queries a row: the class walk does not apply, natural order would read more
    ("cycle(strided(8), causal)", 1, True),  # a head whose class is mostly not allowed
])
def test_host_lengths_take_the_cache_step_where_it_reads_no_more(src, n_q, per_length_lists, monkeypatch):
    """Lengths as host ints, a generation loop's new length every call: the cache's per-row step (built
    once) where it walks what the planned lists would, so no list is built per token; the lists where
    it would walk a planned pattern in natural order. Exact against the reference at every length."""
    from patterncc.backends.reference import ReferenceAttention
    from patterncc.backends.triton import decode

    pat = pcc.parse(src)
    rows = decode.RowsAttention(pat, block=16, splits=2)
    built = []
    step_of = decode.RowsAttention._step_of
    monkeypatch.setattr(decode.RowsAttention, "_step_of", lambda self, lens, *a: built.append(lens) or
                        step_of(self, lens, *a))
    q, k, v = tensors(2, 4, 2, n_q, 70, 16, dtype=torch.float32, seed=n_q, device=DEVICE)
    for n in (n_q, 17, 40, 41, 70):  # (70 fills the cache: its step is the one built before)
        lens = [n, max(n_q, n - 9)]
        o, lse = rows(q, k, v, lens)
        ro, rlse = ReferenceAttention(pat)(*(x.double().cpu() for x in (q, k, v)), return_lse=True,
                                           cache_seqlens=lens)
        torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
        finite = torch.isfinite(rlse)
        assert torch.equal(torch.isfinite(lse).cpu(), finite)
        torch.testing.assert_close(lse.double().cpu()[finite], rlse[finite], rtol=0, atol=2e-5)
    assert len(built) == (5 if per_length_lists else 0)


def test_host_lengths_of_a_growing_cache_keep_their_lists(monkeypatch):
    """A cache that grows with its lengths (as transformers' DynamicCache does: every call a new cache
    length, full) keeps the lists of each call's lengths: the cache's per-row tables would be built for
    the whole cache every token. Exact against the reference."""
    from patterncc.backends.reference import ReferenceAttention
    from patterncc.backends.triton import decode

    pat = pcc.parse("sliding_window(13)")
    rows = decode.RowsAttention(pat, block=16, splits=2)
    monkeypatch.setattr(decode.RowsAttention, "_row_tables", lambda *a: pytest.fail("a growing cache's tables"))
    q, k, v = tensors(2, 4, 2, 1, 70, 16, dtype=torch.float32, seed=5, device=DEVICE)
    for n in (1, 17, 40, 41, 70):
        lens = [n, max(1, n - 9)]
        kn, vn = k[:, :, :n], v[:, :, :n]
        o, lse = rows(q, kn, vn, lens)
        ro, rlse = ReferenceAttention(pat)(*(x.double().cpu() for x in (q, kn, vn)), return_lse=True,
                                           cache_seqlens=lens)
        torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse.double().cpu(), rlse, rtol=0, atol=2e-5)


def test_host_lengths_judge_a_long_cache_before_building_its_tables(monkeypatch):
    """A 1M-token cache: causal's and fixed's per-row tables would pass the limit (estimated from three
    block rows at 268M and 67M entries, the longest row times the rows, against 16.8M) and are judged so
    with nothing built; sliding_window's (1.06M) and strided's (49K) fit."""
    from patterncc.backends.triton import decode

    monkeypatch.setattr(decode.RowsAttention, "_row_tables", lambda *a: pytest.fail("tables built to be judged"))
    n = 1 << 20
    for src, pays in [("causal", False), ("fixed(128, 32)", False), ("sliding_window(4096)", True),
                      ("strided(128)", True)]:
        rows = decode.RowsAttention(pcc.compile(src).mask_pattern)
        assert rows._rows_pay(n, 1, 32) is pays, src
        entries = rows._row_entries(n, 32)
        assert (entries <= decode.ROW_LIST_LIMIT) is pays, (src, entries)


def test_device_lengths_through_the_public_call():
    """``attn(..., cache_seqlens=tensor on q's device)`` takes the row lists and gives the host lengths'
    answer; a pattern that depends on the length, or lists over the limit, read the lengths instead."""
    from patterncc.backends.triton import decode

    q, k, v = tensors(2, 4, 1, 2, 48, 16, dtype=torch.float32, device=DEVICE)
    lens = torch.tensor([48, 20], dtype=torch.int32, device=DEVICE)
    for src in ("strided(8)", "causal & local(isqrt(n))", "bigbird(4, 3, 1, 8, 7)"):
        attn = pcc.compile(src, backend="triton", block=16)
        with torch.no_grad():
            o, lse = attn(q, k, v, return_lse=True, cache_seqlens=lens)
            o2, lse2 = attn(q, k, v, return_lse=True, cache_seqlens=lens.tolist())
        torch.testing.assert_close(o, o2, rtol=0, atol=2e-5)
        torch.testing.assert_close(lse, lse2, rtol=0, atol=2e-5)
    rows = decode.RowsAttention(pcc.parse("causal"), block=16)
    assert rows.row_step(48, 2, 2, 4, 1, 16, torch.float32, torch.device(DEVICE)) is not None
    assert decode.RowsAttention(pcc.parse("causal & local(isqrt(n))"), block=16).row_step(
        48, 2, 2, 4, 1, 16, torch.float32, torch.device(DEVICE)) is None
    saved = decode.ROW_LIST_LIMIT
    try:
        decode.ROW_LIST_LIMIT = 5  # causal at 48 tokens, blocks of 16: 1 + 2 + 3 entries
        assert decode.RowsAttention(pcc.parse("causal"), block=16).row_step(
            48, 2, 2, 4, 1, 16, torch.float32, torch.device(DEVICE)) is None
    finally:
        decode.ROW_LIST_LIMIT = saved
    with pytest.raises(ValueError, match="int32 tensor"):
        with torch.no_grad():
            pcc.compile("causal", backend="triton")(q, k, v, cache_seqlens=lens.long())


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("src", ["sliding_window(100)", "strided(128)"])  # strided: its class walked, no lists
def test_device_lengths_capture_in_a_cuda_graph(src):
    """A decode step captured once and replayed at new lengths equals the eager call at each."""
    attn = pcc.compile(src, backend="triton")
    q, k, v = tensors(2, 8, 2, 1, 4096, 64, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([4096, 1000], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        attn(q, k, v, cache_seqlens=lens)  # warm: kernels compiled, lists on the device
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attn(q, k, v, cache_seqlens=lens)
        for new in ([4000, 17], [1, 4096], [2500, 2501]):
            lens.copy_(torch.tensor(new, dtype=torch.int32))
            graph.replay()
            # (the host-lengths call splits its lists differently: bf16 rounding apart)
            torch.testing.assert_close(out, attn(q, k, v, cache_seqlens=new), rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------
# Paged caches
# ----------------------------------------------------------------------------


def test_reference_paged_cache_is_the_cache_it_stands_for():
    """The definition: pools read through a table equal the contiguous cache, numpy and torch, with
    gradients reaching the pools' pages (and none the unread ones)."""
    ref = pcc.compile("strided(8)", backend="reference")
    q, k, v = tensors(3, 4, 2, 2, 45, 8)
    lens = [45, 2, 30]
    k_pool, v_pool, table = paged(k, v, 16, seed=5)
    o, lse = ref(q, k, v, return_lse=True, cache_seqlens=lens)
    table[1, 1:] = -1  # entries past a row's pages are never read
    po, plse = ref(q, k_pool, v_pool, return_lse=True, cache_seqlens=lens, block_table=table)
    assert torch.equal(o, po) and torch.equal(lse, plse)
    o_np = ref(q.numpy(), k_pool.numpy(), v_pool.numpy(), cache_seqlens=lens, block_table=table.numpy())
    np.testing.assert_array_equal(o_np, o.numpy())
    k_leaf = k_pool.nan_to_num().requires_grad_()
    ref(q, k_leaf, v_pool.nan_to_num(), cache_seqlens=lens, block_table=table).sum().backward()
    unread = sorted(set(range(k_pool.shape[0])) - {int(x) for b, n in enumerate(lens) for x in table[b, :-(-n // 16)]})
    assert unread and torch.equal(k_leaf.grad[unread], torch.zeros_like(k_leaf.grad[unread]))


@pytest.mark.parametrize("src, page", [("causal", 16), ("causal", 32), ("strided(8)", 16), ("strided(8)", 32),
                                       ("fixed(8, 2)", 16), ("sliding_window(13)", 16),
                                       ("bigbird(4, 3, 1, 8, 7)", 16), ("causal & local(isqrt(n))", 32)])
def test_rows_kernel_paged(src, page):
    """The query-rows kernel through random page permutations, pages of one and two key steps."""
    _check_rows(src, [70, 33, 1], 1, splits=2, page=page, seed=page)
    _check_rows(src, [50, 8], 8, Hkv=1, splits=3, page=page, seed=page + 1, terms=term_tensors(4, sinks=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rows_kernel_paged_16_bit(dtype):
    _check_rows("causal", [40, 17], 2, dtype=dtype, splits=2, page=16)


def test_paged_public_call_and_gradients():
    """``attn(q, k_pool, v_pool, cache_seqlens=, block_table=)`` on both backends, forward and, through the
    contiguous cache it stands for, gradients to q and the pools."""
    q, k, v = tensors(2, 4, 2, 3, 40, 16, dtype=torch.float32, device=DEVICE)
    k_pool, v_pool, table = paged(k, v, 16, seed=2)
    k_pool, v_pool = k_pool.nan_to_num(), v_pool.nan_to_num()
    lens = torch.tensor([40, 21], dtype=torch.int32)
    tri = pcc.compile("fixed(8, 2)", backend="triton", block=16)
    ref = pcc.compile("fixed(8, 2)", backend="reference")
    with torch.no_grad():
        o = tri(q, k_pool, v_pool, cache_seqlens=lens, block_table=table)
    do = torch.randn_like(q)
    got = _grads(tri, q, k_pool, v_pool, do, cache_seqlens=lens, block_table=table)
    want = _grads(ref, *(x.double().cpu() for x in (q, k_pool, v_pool)), do.double().cpu(), cache_seqlens=lens,
                  block_table=table.cpu())
    torch.testing.assert_close(o.double().cpu(), want[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=0, atol=2e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g.double().cpu(), w, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_paged_calls_are_named(backend):
    attn = pcc.compile("causal", backend=backend)
    q, k, v = tensors(2, 4, 2, 3, 40, 16, dtype=torch.float32, device=DEVICE)
    k_pool, v_pool, table = paged(k, v, 16)
    lens = [40, 20]
    cases = [
        (dict(block_table=table), "block_table needs cache_seqlens"),
        (dict(cache_seqlens=lens, block_table=table[:1]), r"shaped \[B, max_pages\] with B = 2"),
        (dict(cache_seqlens=lens, block_table=table.float()), "block_table must be a 2-D int"),
        (dict(cache_seqlens=[49, 20], block_table=table), "fits its cache"),
    ]
    bad = table.clone()
    bad[1, 1] = k_pool.shape[0]
    cases.append((dict(cache_seqlens=lens, block_table=bad), r"block_table\[1\] names page"))
    for kwargs, match in cases:
        kw = {name: x for name, x in kwargs.items()}
        if "cache_seqlens" not in kw:
            with pytest.raises(ValueError, match=match):
                attn(q, k_pool, v_pool, **kw)
            continue
        with pytest.raises((ValueError, TypeError), match=match):
            attn(q, k_pool, v_pool, **kw)
    with pytest.raises(ValueError, match="page pools"):
        attn(q, k_pool[..., :8], v_pool[..., :8], cache_seqlens=lens, block_table=table)
    bad[1, 1] = 0  # an in-place fix is seen (the table's version changed)
    attn(q, k_pool, v_pool, cache_seqlens=lens, block_table=bad)
    if backend == "triton":
        with pytest.raises(TypeError, match="int32 tensor"):
            attn(q, k_pool, v_pool, cache_seqlens=lens, block_table=table.long())


@pytest.mark.parametrize("src", ["causal", "strided(8)", "fixed(8, 2)", "cycle(causal, local(5))"])
@pytest.mark.parametrize("cached", [False, True], ids=["n_q<n_k", "cache"])
def test_gradients_of_short_queries(src, cached):
    """With gradients the Triton backend runs its training kernels on padded
    queries: o, lse, dq, dk, dv against the reference."""
    B, H, Hkv, n_q, n_k, D = 2, 4, 2, 5, 45, 16
    q, k, v = tensors(B, H, Hkv, n_q, n_k, D, dtype=torch.float32, seed=3, device=DEVICE)
    do = torch.randn(B, H, n_q, D, device=DEVICE)
    kwargs = {"cache_seqlens": torch.tensor([n_k, 30], dtype=torch.int32)} if cached else {}
    tri = pcc.compile(src, backend="triton", block=16)
    ref = pcc.compile(src, backend="reference")
    o, lse, grads = _grads(tri, q, k, v, do, **kwargs)
    ro, rlse, rgrads = _grads(ref, *(x.double().cpu() for x in (q, k, v)), do.double().cpu(), **kwargs)
    torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-4)


def test_forward_without_gradients_matches_the_padded_path():
    """The two Triton paths (query rows, padded training kernels) agree."""
    attn = pcc.compile("strided(8)", backend="triton", block=16)
    q, k, v = tensors(1, 2, 2, 6, 40, 16, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        rows = attn(q, k, v, return_lse=True)
    padded = attn(q.requires_grad_(), k, v, return_lse=True)
    torch.testing.assert_close(rows[0], padded[0].detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(rows[1], padded[1].detach(), rtol=0, atol=2e-5)


def test_rows_lists_read_only_the_allowed_blocks():
    """A sliding window's decode step reads the window's blocks, not the cache."""
    from patterncc.backends.triton.decode import RowsAttention

    rows = RowsAttention(pcc.parse("sliding_window(64)"), block=16)
    ptr, idx = rows.lists(100_000, 1, 1, 16)
    # the last block row's queries (99984 .. 99999) reach back to key 99921: blocks 6245 .. 6249
    assert idx.tolist() == list(range((100_000 - 16 - 63) // 16, 100_000 // 16))
    strided = RowsAttention(pcc.parse("causal & local(32)"), block=16)
    ptr, idx = strided.lists(1_000_000, 1, 1, 16)
    assert len(idx) <= 3


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("patterns_, mode", [(["causal & local(8)", "causal & stride(8)"], "interleaved"),
                                             (None, "interleaved"),
                                             (["causal & local(8)", "strided(4)"], "multihead")])
def test_generation_with_the_cache_equals_recomputing(backend, patterns_, mode):
    from patterncc.nn import SparseTransformer

    torch.manual_seed(0)
    model = SparseTransformer(40, 32, 2, 4, patterns_, mode=mode, max_len=48, backend=backend, kv_heads=2)
    model = model.to(DEVICE).eval()
    idx = torch.randint(0, 40, (2, 9), device=DEVICE)
    steps = 20 if backend == "reference" or GPU else 6  # the interpreter recomputes slowly
    with_cache = model.generate(idx, steps, temperature=0)
    recomputed = model.generate(idx, steps, temperature=0, use_cache=False)
    assert torch.equal(with_cache, recomputed)
    # and the logits themselves: a cached step against the full sequence's last row
    cache = model.new_cache(2)
    model(with_cache[:, :-1], cache)
    step = model(with_cache[:, -1:], cache)[:, -1]
    full = model(with_cache)[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)


def test_generation_arguments():
    from patterncc.nn import SparseTransformer

    model = SparseTransformer(40, 16, 1, 2, ["causal & local(4)"], max_len=16, backend="reference")
    idx = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed max_len"):
        model.generate(idx, 7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(idx, -1)
    torch.manual_seed(1)
    out = model.generate(idx, 6, temperature=0.8, top_k=3)
    assert out.shape == (1, 16) and torch.equal(out[:, :10], idx)


def test_planned_decoding_reads_a_fraction_of_the_keys():
    """strided(128) at 1M tokens: the planned pieces read the local band and
    one residue class (about 128 + 8192 keys), natural order half of all blocks;
    both give the reference's answer on a small case."""
    from patterncc.backends.triton.decode import RowsAttention

    planned = RowsAttention(pcc.parse("strided(128)"))
    n = 1 << 20
    blocks = sum(len(planned.lists(n, 1, 1, 16, p)[1]) for p in planned.pieces(n, 1))
    assert blocks <= 3 + (n // 128) // 64 + 1
    natural = RowsAttention(pcc.parse("strided(128)"), planned=False)
    assert len(natural.lists(n, 1, 1, 16)[1]) >= n // 128  # a stride key in every other block of 64
    q, k, v = tensors(2, 2, 1, 3, 90, 16, dtype=torch.float32, device=DEVICE)
    for rows in (RowsAttention(pcc.parse("strided(8)"), block=16, splits=2),
                 RowsAttention(pcc.parse("strided(8)"), block=16, planned=False)):
        o, lse = rows(q, k, v, [90, 57])
        ro = pcc.compile("strided(8)", backend="reference")(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                            cache_seqlens=[90, 57])
        torch.testing.assert_close(o.double().cpu(), ro, rtol=0, atol=2e-5)
