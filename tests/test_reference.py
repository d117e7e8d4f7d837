"""The reference backend against computations written out here.

- dense path vs a row-by-row float64 softmax written in this file, on masks
  built by hand with numpy comparisons;
- dense path vs torch autograd through a masked attention written with
  torch ops (forward, lse and all three gradients);
- sparse path (dense_limit=0, small chunks) vs the dense path;
- GQA/MQA, n = 1, odd lengths, rows with no allowed key, torch dtypes,
  numpy in / numpy out, input validation, head-dependent patterns.

Any RuntimeWarning (inf - inf, log(0), 0/0) fails a test.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings, strategies as st

from patterncc import ir
from patterncc.backends.reference import ReferenceAttention, backward, forward
from patterncc.backends.reference import dense as dense_kernel, masks, sparse as sparse_kernel
from patterncc.errors import HeadsError
from patterncc.masks import dense_mask
from stdlib_ir import fixed, strided

pytestmark = pytest.mark.filterwarnings("error")


def where(op, left, right):
    """``where left OP right`` over ``q``, ``k``, ``h`` and int constants."""
    term = lambda x: ir.Var(x) if isinstance(x, str) else ir.Const(x)
    return ir.Where(ir.Compare(op, term(left), term(right)))


# Masks built by hand: [n, n] bool, [q, k] True when allowed.
def hand_mask(name, n):
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    return {
        "causal": k <= q,
        "strided(4)": (k <= q) & ((q - k < 4) | ((q - k) % 4 == 0)),
        "fixed(5,2)": (k <= q) & ((q // 5 == k // 5) | (k % 5 >= 3)),
        "local(3)|global(2)": (abs(q - k) < 3) | (q < 2) | (k < 2),
        "causal-local(1)": k < q,
    }[name]


HAND_PATTERNS = {
    "causal": ir.Causal(),
    "strided(4)": strided(4),
    "fixed(5,2)": fixed(5, 2),
    "local(3)|global(2)": ir.Local(3) | ir.Global(2),
    "causal-local(1)": ir.Causal() - ir.Local(1),
}


def inputs(B, H, Hkv, n, D, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, n, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, n, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, n, D)).astype(dtype)
    do = rng.standard_normal((B, H, n, D)).astype(dtype)
    return q, k, v, do


def naive_forward(head_masks, q, k, v, scale):
    """Row by row: softmax over the allowed keys only. head_masks [H or 1, n, n]."""
    B, H, n, D = q.shape
    group = H // k.shape[1]
    o = np.zeros((B, H, n, D))
    lse = np.full((B, H, n), -np.inf)
    for b in range(B):
        for h in range(H):
            m = head_masks[h if len(head_masks) > 1 else 0]
            scores = np.where(m, scale * q[b, h] @ k[b, h // group].T, -np.inf)
            for i in range(n):
                if not m[i].any():
                    continue
                row = scores[i, m[i]]
                top = row.max()
                lse[b, h, i] = top + np.log(np.exp(row - top).sum())
                o[b, h, i] = np.exp(row - lse[b, h, i]) @ v[b, h // group][m[i]]
    return o, lse


def torch_masked_attention(head_masks, q, k, v, scale):
    """Masked attention written with torch ops; differentiable, float64, GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    allowed = torch.as_tensor(np.asarray(head_masks))[None]  # (1, H or 1, n, n)
    scores = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows with no key
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - finite_lse[..., None])  # 0 where masked
    return p @ v, lse


def finite(x):
    """-inf -> 0 so that arrays with -inf compare with allclose."""
    return np.where(np.isinf(x), 0.0, x)


def assert_lse_equal(a, b, **tol):
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    np.testing.assert_allclose(finite(a), finite(b), **tol)


# ----------------------------------------------------------------------------
# Dense path vs the computations above
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HAND_PATTERNS))
@pytest.mark.parametrize("n", [1, 13, 40])
def test_dense_forward_matches_naive(name, n):
    q, k, v, _ = inputs(2, 2, 2, n, 8)
    o, lse = ReferenceAttention(HAND_PATTERNS[name])(q, k, v, return_lse=True)
    o_ref, lse_ref = naive_forward(hand_mask(name, n)[None], q, k, v, 1 / math.sqrt(8))
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-12)
    assert_lse_equal(lse, lse_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(HAND_PATTERNS))
@pytest.mark.parametrize("Hkv", [1, 2, 4])
def test_dense_matches_torch_autograd(name, Hkv):
    n, D, scale = 23, 16, 0.3
    q, k, v, do = inputs(2, 4, Hkv, n, D, seed=1)
    dlse = np.random.default_rng(2).standard_normal((2, 4, n))
    mask = hand_mask(name, n)[None]

    # torch autograd through the masked attention written with torch ops
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    to, tlse = torch_masked_attention(mask, tq, tk, tv, scale)
    loss = (to * torch.tensor(do)).sum() + (torch.where(torch.isfinite(tlse), tlse, 0) * torch.tensor(dlse)).sum()
    grads_ref = torch.autograd.grad(loss, (tq, tk, tv))

    attn = ReferenceAttention(HAND_PATTERNS[name])
    o, lse = attn.forward(q, k, v, scale)
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert_lse_equal(lse, tlse.detach().numpy(), rtol=1e-12, atol=1e-12)
    grads = attn.backward(q, k, v, o, lse, do, scale, dlse=dlse)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)

    # and the same gradients through the torch entry point of the backend itself
    rq, rk, rv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    ro, rlse = attn(rq, rk, rv, scale=scale, return_lse=True)
    loss = (ro * torch.tensor(do)).sum() + (torch.where(torch.isfinite(rlse), rlse, 0) * torch.tensor(dlse)).sum()
    for got, want in zip(torch.autograd.grad(loss, (rq, rk, rv)), grads_ref):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_gradcheck():
    q, k, v, _ = inputs(1, 2, 1, 9, 4, seed=3)
    attn = ReferenceAttention(strided(3))
    args = tuple(torch.tensor(x, requires_grad=True) for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: attn(*a, return_lse=True), args)


def test_n_equals_one():
    q, k, v, do = inputs(3, 4, 2, 1, 5)
    for dense_limit in (4096, 0):
        attn = ReferenceAttention(ir.Causal(), dense_limit=dense_limit)
        o, lse = attn.forward(q, k, v, scale=0.5)
        kv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
        np.testing.assert_allclose(o, kv[1], rtol=0, atol=1e-15)  # the only key gets weight 1
        np.testing.assert_allclose(lse, 0.5 * np.sum(q * kv[0], axis=-1), rtol=1e-14)
        dq, dk, dv = attn.backward(q, k, v, o, lse, do, scale=0.5)
        np.testing.assert_allclose(dq, 0, atol=1e-15)  # softmax over one key is constant
        np.testing.assert_allclose(dv, do.reshape(3, 2, 2, 1, 5).sum(axis=2), rtol=1e-14)


# ----------------------------------------------------------------------------
# Sparse path vs dense path
# ----------------------------------------------------------------------------

SPARSE_PATTERNS = [
    strided(4),
    strided(7),
    fixed(6, 2),
    ir.Causal() & (ir.Local(5) | ir.Sink(3)),
    ir.Local(4) | ir.Global(3),
    ir.Local(3) | ir.Global(2) | ir.Random(2, 8, 7),
    ir.Dilated(3, 4),
    ir.Causal() - ir.Local(1),
    ~ir.Causal(),
    ir.All(),
    ir.Causal() & where("<", "k", 10),
]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """A few pairs per chunk, so chunks split the rows every which way."""
    monkeypatch.setattr(sparse_kernel, "MAX_CHUNK_PAIRS", 7)


def assert_paths_agree(pattern, q, k, v, do, scale=None):
    dense, sparse = ReferenceAttention(pattern), ReferenceAttention(pattern, dense_limit=0)
    assert dense.masks(q.shape[2], q.shape[1])[0] is dense_kernel
    assert sparse.masks(q.shape[2], q.shape[1])[0] is sparse_kernel
    o, lse = dense.forward(q, k, v, scale)
    o_s, lse_s = sparse.forward(q, k, v, scale)
    np.testing.assert_allclose(o_s, o, rtol=1e-12, atol=1e-13)
    assert_lse_equal(lse_s, lse, rtol=1e-12, atol=1e-13)
    dlse = np.cos(np.arange(lse.size)).reshape(lse.shape)
    for got, want in zip(sparse.backward(q, k, v, o_s, lse_s, do, scale, dlse), dense.backward(q, k, v, o, lse, do, scale, dlse)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("pattern", SPARSE_PATTERNS, ids=str)
@pytest.mark.parametrize("n", [1, 19, 64])
def test_sparse_matches_dense(pattern, n, tiny_chunks):
    assert_paths_agree(pattern, *inputs(2, 2, 1, n, 8, seed=n))


def test_sparse_default_chunks_long_rows():
    assert_paths_agree(ir.All(), *inputs(1, 1, 1, 300, 4))


@pytest.mark.parametrize("limit", [1, 3, 10, 10**6])
def test_chunks_cover_every_pair_once(limit):
    csr = masks.sparse_masks(ir.Causal() - ir.Local(2) | where("==", "q", 7), 29, 1)[0]
    parts = list(sparse_kernel.chunks(csr, limit))
    rows = np.concatenate([c.rows for c in parts])
    cols = np.concatenate([c.cols for c in parts])
    want_rows, want_cols = csr.nonzero()
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)
    for c in parts:
        assert c.indptr[-1] <= limit or c.stop - c.start == 1


def test_sparse_masks_match_dense_mask():
    pattern = ir.Cycle((strided(3), fixed(4, 1), ir.Local(2) | ir.Random(1, 4, 3)))
    want = dense_mask(pattern, 33, 5)
    # the builder in use (layout.sparse_mask once it exists) and the stand-in
    for got in (masks.sparse_masks(pattern, 33, 5), masks._sparse_mask_by_rows(pattern, 33, 5)):
        assert len(got) == 5
        for h in range(5):
            np.testing.assert_array_equal(got[h].toarray(), want[h])


def test_sparse_masks_from_a_builder_are_canonical(monkeypatch):
    """Whatever CSR the layout module hands over (unsorted indices, explicit
    zeros, one object for several heads) is normalized without editing it."""
    given_mask = sp.csr_matrix(
        (np.array([1.0, 0.0, 2.0, 3.0]), np.array([2, 0, 1, 0]), np.array([0, 2, 3, 4])), shape=(3, 3)
    )
    monkeypatch.setattr(masks, "_layout_sparse_mask", lambda p, n, heads: [given_mask] * heads)
    pattern = ir.Cycle((ir.All(), ir.Causal()))
    got = masks.sparse_masks(pattern, 3, 2)
    assert got[0] is got[1]
    want = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(got[0].toarray(), want)
    assert got[0].has_sorted_indices and got[0].nnz == 3 and got[0].dtype == bool
    assert given_mask.nnz == 4 and given_mask.data[1] == 0.0  # untouched

    q, k, v, _ = inputs(1, 2, 1, 3, 4)
    o, lse = ReferenceAttention(pattern, dense_limit=0).forward(q, k, v)
    o_ref, lse_ref = naive_forward(np.stack([want, want]), q, k, v, 0.5)
    np.testing.assert_allclose(o, o_ref, rtol=1e-13)


def test_heads_with_one_pattern_share_one_mask():
    pattern = ir.Cycle((ir.Causal(), ir.Local(2)))
    for build in (masks.dense_masks, masks.sparse_masks):
        got = build(pattern, 8, 64)
        assert len(got) == 64 and len({id(m) for m in got}) == 2
    assert len(masks.dense_masks(ir.Causal(), 8, 64)) == 1


def primitives():
    small = st.integers(1, 6)
    return st.one_of(
        st.just(ir.Causal()),
        small.map(ir.Local),
        small.map(ir.Stride),
        small.map(ir.Block),
        st.integers(0, 4).map(ir.Sink),
        st.integers(0, 3).map(ir.Global),
        st.tuples(small, small).map(lambda lc: ir.Summary(max(lc), min(lc))),
    )


patterns = st.recursive(
    primitives(),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda ab: ab[0] | ab[1]),
        st.tuples(inner, inner).map(lambda ab: ab[0] & ab[1]),
        st.tuples(inner, inner).map(lambda ab: ab[0] - ab[1]),
        inner.map(lambda a: ~a),
    ),
    max_leaves=4,
)


@settings(max_examples=40, deadline=None)
@given(pattern=patterns, n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_sparse_matches_dense_property(pattern, n, seed):
    assert_paths_agree(pattern, *inputs(1, 2, 1, n, 4, seed=seed), scale=0.7)


# ----------------------------------------------------------------------------
# Rows with no allowed key
# ----------------------------------------------------------------------------

EMPTY_ROW_PATTERNS = {
    "causal-local(1)": (ir.Causal() - ir.Local(1), [0]),
    "sink(0)": (ir.Sink(0), "all"),
    "none": (ir.Empty(), "all"),
    "causal & where q >= 5": (ir.Causal() & where(">=", "q", 5), [0, 1, 2, 3, 4]),
}


@pytest.mark.parametrize("name", sorted(EMPTY_ROW_PATTERNS))
@pytest.mark.parametrize("dense_limit", [4096, 0])
def test_rows_without_keys(name, dense_limit):
    pattern, empty = EMPTY_ROW_PATTERNS[name]
    n = 11
    empty = list(range(n)) if empty == "all" else empty
    q, k, v, do = inputs(2, 2, 1, n, 4)
    attn = ReferenceAttention(pattern, dense_limit=dense_limit)
    o, lse = attn(q, k, v, return_lse=True)
    assert np.all(o[:, :, empty] == 0)
    assert np.all(np.isneginf(lse[:, :, empty]))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert np.isfinite(np.delete(lse, empty, axis=2)).all()
    dq, dk, dv = attn.backward(q, k, v, o, lse, do, dlse=np.ones_like(lse))
    assert np.all(dq[:, :, empty] == 0)
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    if len(empty) == n:
        assert not dk.any() and not dv.any()

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    to, tlse = attn(tq, tk, tv, return_lse=True)
    (to.sum() + torch.where(torch.isfinite(tlse), tlse, 0).sum()).backward()
    assert torch.all(tq.grad[:, :, empty] == 0)
    for t in (to, tq.grad, tk.grad, tv.grad):
        assert torch.isfinite(t).all()


def test_empty_rows_match_naive():
    pattern = ir.Causal() & where(">=", "q", 5) & (ir.Local(3) | ir.Stride(4))
    q, k, v, _ = inputs(1, 3, 3, 17, 4)
    mask = dense_mask(pattern, 17)
    o_ref, lse_ref = naive_forward(mask, q, k, v, 0.5)
    for dense_limit in (4096, 0):
        o, lse = ReferenceAttention(pattern, dense_limit=dense_limit).forward(q, k, v, 0.5)
        np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-13)
        assert_lse_equal(lse, lse_ref, rtol=1e-12)


# ----------------------------------------------------------------------------
# Heads: GQA / MQA and head-dependent patterns
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("dense_limit", [4096, 0])
def test_gqa_uses_kv_head_h_div_group(H, Hkv, dense_limit):
    n = 21
    q, k, v, do = inputs(2, H, Hkv, n, 8, seed=H + Hkv)
    attn = ReferenceAttention(strided(4), dense_limit=dense_limit)
    o, lse = attn.forward(q, k, v)
    # The same attention with kv heads copied out to H heads by hand.
    group = H // Hkv
    k_full, v_full = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    o_full, lse_full = attn.forward(q, k_full, v_full)
    np.testing.assert_allclose(o, o_full, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, lse_full, rtol=1e-13)
    dq, dk, dv = attn.backward(q, k, v, o, lse, do)
    dq_full, dk_full, dv_full = attn.backward(q, k_full, v_full, o_full, lse_full, do)
    np.testing.assert_allclose(dq, dq_full, rtol=1e-12, atol=1e-14)
    # a kv head's gradient sums over the query heads that share it
    np.testing.assert_allclose(dk, dk_full.reshape(2, Hkv, group, n, 8).sum(axis=2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dv, dv_full.reshape(2, Hkv, group, n, 8).sum(axis=2), rtol=1e-12, atol=1e-14)


HEAD_PATTERNS = [
    ir.Cycle((ir.Causal(), strided(3), ir.Local(2) | ir.Sink(1))),
    ir.Heads((ir.HeadRange(0, 2, ir.Causal()), ir.HeadRange(2, 6, ir.Local(3) & ~ir.Stride(2)))),
    ir.Causal() & where("<=", "k", "h"),  # head h sees keys 0..h only
]


@pytest.mark.parametrize("pattern", HEAD_PATTERNS, ids=str)
@pytest.mark.parametrize("Hkv", [6, 2])
def test_head_dependent_patterns(pattern, Hkv, tiny_chunks):
    H, n = 6, 19
    q, k, v, do = inputs(1, H, Hkv, n, 4, seed=5)
    head_masks = dense_mask(pattern, n, H)
    assert head_masks.shape == (H, n, n)
    assert len({m.tobytes() for m in head_masks}) > 1  # the heads really differ
    o_ref, lse_ref = naive_forward(head_masks, q, k, v, 0.5)
    o, lse = ReferenceAttention(pattern).forward(q, k, v, 0.5)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-13)
    assert_lse_equal(lse, lse_ref, rtol=1e-12)
    assert_paths_agree(pattern, q, k, v, do, 0.5)


def test_heads_must_cover_all_heads():
    pattern = ir.Heads((ir.HeadRange(0, 2, ir.Causal()), ir.HeadRange(2, 4, ir.Local(2))))
    q, k, v, _ = inputs(1, 6, 6, 8, 4)
    for dense_limit in (4096, 0):
        with pytest.raises(HeadsError, match="heads"):
            ReferenceAttention(pattern, dense_limit=dense_limit)(q, k, v)


# ----------------------------------------------------------------------------
# numpy and torch in and out
# ----------------------------------------------------------------------------


def test_numpy_in_numpy_float64_out():
    q, k, v, _ = inputs(1, 2, 2, 9, 4, dtype=np.float32)
    attn = ReferenceAttention(strided(3))
    o = attn(q, k, v)
    assert type(o) is np.ndarray and o.dtype == np.float64 and o.shape == q.shape
    o2, lse = attn(q, k, v, return_lse=True)
    assert lse.dtype == np.float64 and lse.shape == (1, 2, 9)
    np.testing.assert_array_equal(o, o2)
    o64 = attn(*(x.astype(np.float64) for x in (q, k, v)))
    np.testing.assert_array_equal(o, o64)  # float32 values are exact in float64


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_torch_dtypes_roundtrip(dtype, tol):
    q, k, v, do = inputs(1, 4, 2, 13, 8, seed=7)
    attn = ReferenceAttention(strided(4))
    tq, tk, tv = (torch.tensor(x, dtype=dtype, requires_grad=True) for x in (q, k, v))
    to, tlse = attn(tq, tk, tv, return_lse=True)
    assert to.dtype == dtype and tlse.dtype == dtype and to.device == tq.device
    assert to.shape == tq.shape and tlse.shape == (1, 4, 13)
    to.backward(torch.tensor(do, dtype=dtype))
    for t in (tq, tk, tv):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape

    # the values are the float64 result of the rounded inputs, rounded once
    q64, k64, v64 = (t.detach().double().numpy() for t in (tq, tk, tv))
    o, lse = attn.forward(q64, k64, v64)
    grads = attn.backward(q64, k64, v64, o, lse, torch.tensor(do, dtype=dtype).double().numpy())
    np.testing.assert_allclose(to.detach().double().numpy(), o, rtol=tol, atol=tol)
    np.testing.assert_allclose(tlse.detach().double().numpy(), lse, rtol=tol, atol=tol)
    for t, g in zip((tq, tk, tv), grads):
        np.testing.assert_allclose(t.grad.double().numpy(), g, rtol=tol, atol=tol)


def test_torch_without_grad_returns_plain_tensors():
    q, k, v, _ = inputs(1, 1, 1, 5, 4)
    o = ReferenceAttention(ir.Causal())(*(torch.tensor(x, dtype=torch.float32) for x in (q, k, v)))
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float32 and not o.requires_grad


def test_module_functions_match_the_class():
    q, k, v, do = inputs(2, 2, 1, 15, 4)
    attn = ReferenceAttention(fixed(4, 1))
    o, lse = forward(fixed(4, 1), q, k, v)
    np.testing.assert_array_equal(o, attn(q, k, v))
    for a, b in zip(backward(fixed(4, 1), q, k, v, o, lse, do), attn.backward(q, k, v, o, lse, do)):
        np.testing.assert_array_equal(a, b)


def test_scale_defaults_to_inverse_sqrt_d():
    q, k, v, _ = inputs(1, 1, 1, 6, 9)
    attn = ReferenceAttention(ir.Causal())
    np.testing.assert_array_equal(attn(q, k, v), attn(q, k, v, scale=1 / 3))


def test_masks_cached_per_length_and_heads():
    attn = ReferenceAttention(ir.Causal(), dense_limit=10)
    first = attn.masks(8, 2)
    assert attn.masks(8, 2) is first
    assert attn.masks(12, 2)[0] is sparse_kernel
    for n in range(20, 40):
        attn.masks(n, 1)
    assert attn.masks(8, 2) is not first  # evicted, least recently used


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------

B, H, n, D = 1, 4, 6, 8
GOOD = dict(q=np.zeros((B, H, n, D)), k=np.zeros((B, 2, n, D)), v=np.zeros((B, 2, n, D)))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=np.zeros((H, n, D))), ValueError, "q must be 4-D"),
        (dict(k=np.zeros((B, 2, n))), ValueError, "k must be 4-D"),
        (dict(v=np.zeros((B, 2, n, D + 1))), ValueError, "v must have k's shape"),
        (dict(k=np.zeros((2, 2, n, D)), v=np.zeros((2, 2, n, D))), ValueError, "batch size"),
        # queries may be fewer than keys (the last positions), never more
        (dict(k=np.zeros((B, 2, n - 1, D)), v=np.zeros((B, 2, n - 1, D))), ValueError, "n_q <= n_k"),
        (dict(k=np.zeros((B, 2, n, 4)), v=np.zeros((B, 2, n, 4))), ValueError, "head dim"),
        (dict(k=np.zeros((B, 3, n, D)), v=np.zeros((B, 3, n, D))), ValueError, "multiple of"),
        (dict(k=np.zeros((B, 0, n, D)), v=np.zeros((B, 0, n, D))), ValueError, "at least one head"),
        (
            dict(q=np.zeros((B, H, 0, D)), k=np.zeros((B, 2, 0, D)), v=np.zeros((B, 2, 0, D))),
            ValueError, "sequence length n",
        ),
        (dict(q=np.zeros((B, H, n, D), dtype=np.int64)), TypeError, "q must have a floating-point dtype"),
        (dict(v=np.zeros((B, 2, n, D), dtype=complex)), TypeError, "v must have a floating-point dtype"),
        (dict(k=[[[[0.0]]]]), TypeError, "k must be a numpy array"),
        (dict(k=torch.zeros((B, 2, n, D))), TypeError, "q must be a torch tensor"),
        (dict(scale=math.inf), ValueError, "scale must be finite"),
        (dict(scale=math.nan), ValueError, "scale must be finite"),
        (dict(scale="0.5"), TypeError, "scale must be a real number"),
    ],
)
def test_bad_inputs(change, error, match):
    args = {**GOOD, **change}
    with pytest.raises(error, match=match):
        ReferenceAttention(ir.Causal())(**args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(k=torch.zeros((B, 2, n, D), dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(q=torch.zeros((B, H, n, D), dtype=torch.int32)), TypeError, "q must have a floating-point"),
        (dict(v=torch.zeros((B, 2, n + 1, D))), ValueError, "v must have k's shape"),
        (dict(v=np.zeros((B, 2, n, D))), TypeError, "v must be a torch tensor"),
        (dict(scale=-math.inf), ValueError, "scale must be finite"),
    ],
)
def test_bad_torch_inputs(change, error, match):
    args = dict(q=torch.zeros((B, H, n, D)), k=torch.zeros((B, 2, n, D)), v=torch.zeros((B, 2, n, D)))
    with pytest.raises(error, match=match):
        ReferenceAttention(ir.Causal())(**{**args, **change})


def test_bad_backward_inputs():
    q, k, v, do = inputs(1, 2, 1, 5, 4)
    attn = ReferenceAttention(ir.Causal())
    o, lse = attn.forward(q, k, v)
    with pytest.raises(ValueError, match="do must have q's shape"):
        attn.backward(q, k, v, o, lse, do[:, :1])
    with pytest.raises(ValueError, match="lse must have shape"):
        attn.backward(q, k, v, o, lse[..., None], do)
    with pytest.raises(ValueError, match="dlse must have shape"):
        attn.backward(q, k, v, o, lse, do, dlse=lse[0])


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="pattern must be"):
        ReferenceAttention("causal")
    with pytest.raises(ValueError, match="dense_limit"):
        ReferenceAttention(ir.Causal(), dense_limit=-1)
