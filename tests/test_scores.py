"""Score terms (softcap, alibi, sinks, relative bias) in the reference backend.

The reference is checked against a naive float64 formula written here with
torch ops and differentiated by torch autograd (output, lse and the
gradients of q, k, v and of every term tensor), on both of its paths (dense,
and sparse with tiny chunks), and by finite differences (``gradcheck``).
``BACKENDS`` lists the backends the public-API tests run; the Triton backend
joins it where it takes the terms.

Any RuntimeWarning (inf - inf, log(0), 0/0) fails a test.
"""

import math

import numpy as np
import pytest
import torch

import patterncc as pcc
from patterncc import ir
from patterncc.backends.reference import ReferenceAttention, sparse as sparse_kernel
from patterncc.masks import dense_mask
from patterncc.scores import ScoreTerms, alibi_slopes
from stdlib_ir import strided

pytestmark = pytest.mark.filterwarnings("error")

BACKENDS = ["reference", "triton"]

# (name, softcap, alibi, sinks, rel_bias): every term alone, then together.
TERM_SETS = [
    ("softcap", 0.7, False, False, None),
    ("alibi", None, True, False, None),
    ("sinks", None, False, True, None),
    ("rel_bias", None, False, False, 3),
    ("all", 0.9, True, True, 2),
]

PATTERNS = {
    "causal": ir.Causal(),
    "strided(3)": strided(3),
    "local(3)|global(2)": ir.Local(3) | ir.Global(2),
    "causal-local(1)": ir.Causal() - ir.Local(1),  # row 0 has no key
}


def inputs(B, H, Hkv, n, D, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) for shape in ((B, H, n, D), (B, Hkv, n, D), (B, Hkv, n, D), (B, H, n, D)))


def term_tensors(H, alibi, sinks, max_distance, seed=0):
    """Random float64 term tensors (None where absent), sinks around the scores' size."""
    rng = np.random.default_rng(seed + 100)
    return (
        torch.tensor(rng.uniform(0.05, 0.6, H)) if alibi else None,
        torch.tensor(rng.standard_normal(H)) if sinks else None,
        torch.tensor(rng.standard_normal((H, 2 * max_distance + 1))) if max_distance is not None else None,
    )


def naive_attention(mask, q, k, v, scale, softcap=None, slopes=None, sinks=None, bias=None):
    """The exact formulas, with torch ops (differentiable): mask [H or 1, n, n] bool."""
    B, H, n, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)  # (B, H, n, n)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # q - k
    if slopes is not None:
        s = s - slopes[:, None, None] * diff.abs()
    if bias is not None:
        M = (bias.shape[1] - 1) // 2
        s = s + bias[:, diff.clamp(-M, M) + M]
    s = s.masked_fill(~torch.as_tensor(mask), -math.inf)
    with_sink = s if sinks is None else torch.cat([s, sinks[None, :, None, None].expand(B, H, n, 1)], dim=-1)
    lse = torch.logsumexp(with_sink, dim=-1)  # (B, H, n)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - finite[..., None])
    return p @ v, lse


def loss_of(o, lse, do, dlse):
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (o * torch.as_tensor(do)).sum() + (finite * torch.as_tensor(dlse)).sum()


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(sparse_kernel, "MAX_CHUNK_PAIRS", 7)


@pytest.mark.parametrize("terms", TERM_SETS, ids=lambda t: t[0])
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("dense_limit", [4096, 0], ids=["dense", "sparse"])
def test_reference_matches_autograd_of_the_formula(terms, name, dense_limit, tiny_chunks):
    _, softcap, alibi, sinks, max_distance = terms
    B, H, Hkv, n, D, scale = 2, 4, 2, 13, 8, 0.6
    pattern = PATTERNS[name]
    q, k, v, do = inputs(B, H, Hkv, n, D, seed=len(name))
    dlse = np.random.default_rng(5).standard_normal((B, H, n))
    tensors = term_tensors(H, alibi, sinks, max_distance)

    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    term_leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    o_ref, lse_ref = naive_attention(dense_mask(pattern, n), *leaves, scale, softcap, *term_leaves)
    wrt = leaves + [t for t in term_leaves if t is not None]
    grads_ref = torch.autograd.grad(loss_of(o_ref, lse_ref, do, dlse), wrt)

    attn = ReferenceAttention(pattern, dense_limit=dense_limit)
    leaves2 = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    term_leaves2 = [None if t is None else t.clone().requires_grad_() for t in tensors]
    slopes, sink_t, bias = term_leaves2
    o, lse = attn(*leaves2, scale=scale, return_lse=True, softcap=softcap, alibi_slopes=slopes, sinks=sink_t,
                  rel_bias=bias)
    np.testing.assert_allclose(o.detach().numpy(), o_ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(lse.detach().numpy()), np.isfinite(lse_ref.detach().numpy()))
    np.testing.assert_allclose(lse.detach().numpy(), lse_ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss_of(o, lse, do, dlse), leaves2 + [t for t in term_leaves2 if t is not None])
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-11)


def test_numpy_backward_returns_the_term_gradients():
    q, k, v, do = inputs(1, 2, 1, 9, 4, seed=3)
    slopes, sinks, bias = (t.numpy() for t in term_tensors(2, True, True, 2))
    attn = ReferenceAttention(strided(3))
    terms = ScoreTerms(0.8, slopes, sinks, bias)
    o, lse = attn.forward(q, k, v, 0.5, terms)
    dq, dk, dv, (d_slopes, d_sinks, d_bias) = attn.backward(q, k, v, o, lse, do, 0.5, terms=terms)
    assert d_slopes.shape == (2,) and d_sinks.shape == (2,) and d_bias.shape == (2, 5)
    assert len(attn.backward(q, k, v, o, lse, do, 0.5)) == 3
    no_tensors = attn.backward(q, k, v, o, lse, do, 0.5, terms=ScoreTerms(0.8))
    assert no_tensors[3] == (None, None, None)


def test_gradcheck_every_term():
    """Finite differences of the reference's torch entry point, all terms at once."""
    q, k, v, _ = inputs(1, 2, 1, 7, 3, seed=4)
    slopes, sinks, bias = term_tensors(2, True, True, 2)
    attn = ReferenceAttention(ir.Causal() - ir.Local(1))  # row 0 has no key: lse = sink there
    args = tuple(torch.tensor(x, requires_grad=True) for x in (q, k, v)) + tuple(
        t.clone().requires_grad_() for t in (slopes, sinks, bias)
    )

    def run(q, k, v, slopes, sinks, bias):
        return attn(q, k, v, return_lse=True, softcap=1.3, alibi_slopes=slopes, sinks=sinks, rel_bias=bias)

    assert torch.autograd.gradcheck(run, args)


@pytest.mark.parametrize("dense_limit", [4096, 0])
def test_rows_without_a_key_with_sinks(dense_limit):
    q, k, v, do = inputs(1, 2, 2, 6, 4)
    sinks = torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True)
    attn = ReferenceAttention(ir.Causal() - ir.Local(1), dense_limit=dense_limit)
    tq = torch.tensor(q, requires_grad=True)
    o, lse = attn(tq, torch.tensor(k), torch.tensor(v), return_lse=True, sinks=sinks)
    assert torch.all(o[:, :, 0] == 0)
    np.testing.assert_array_equal(lse[0, :, 0].detach().numpy(), [0.5, -2.0])
    assert torch.isfinite(lse).all()
    (lse[:, :, 0].sum()).backward()
    np.testing.assert_allclose(sinks.grad.numpy(), [1.0, 1.0])  # d lse / d t = exp(t - lse) = 1
    assert torch.all(tq.grad == 0)


def test_sink_bounds_the_weights():
    """With a sink the weights of a row sum to 1 - exp(t - lse) < 1."""
    q, k, v, _ = inputs(1, 1, 1, 5, 4)
    attn = ReferenceAttention(ir.Causal())
    ones = np.ones_like(v)
    o, lse = attn.forward(q, k, ones, 1.0, ScoreTerms(sinks=np.array([0.3])))
    np.testing.assert_allclose(o[0, 0, :, 0], 1 - np.exp(0.3 - lse[0, 0]), rtol=1e-14)


def test_pattern_terms_are_defaults_of_the_reference():
    q, k, v, _ = inputs(1, 4, 4, 9, 4)
    plain = ReferenceAttention(ir.Causal())
    scored = ReferenceAttention(ir.Causal().scored(softcap=2.0, alibi=True))
    want = plain.forward(q, k, v, None, ScoreTerms(2.0, np.float32(alibi_slopes(4)).astype(np.float64)))
    for got, ref in zip(scored.forward(q, k, v), want):
        np.testing.assert_array_equal(got, ref)
    # the call's softcap and slopes replace the pattern's
    mine = ScoreTerms(3.0, np.array([0.1, 0.2, 0.3, 0.4]))
    for got, ref in zip(scored.forward(q, k, v, None, mine), plain.forward(q, k, v, None, mine)):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_term_gradients_have_the_tensors_dtype(dtype):
    q, k, v, do = inputs(1, 2, 1, 5, 4)
    tensors = [t.to(dtype).requires_grad_() for t in term_tensors(2, True, True, 1)]
    o = ReferenceAttention(ir.Causal())(*(torch.tensor(x, dtype=torch.float16) for x in (q, k, v)),
                                         alibi_slopes=tensors[0], sinks=tensors[1], rel_bias=tensors[2])
    o.float().sum().backward()
    for t in tensors:
        assert t.grad.dtype == dtype and t.grad.shape == t.shape


# ----------------------------------------------------------------------------
# Standard ALiBi slopes
# ----------------------------------------------------------------------------


def bloom_slopes(n):
    """BLOOM's / the ALiBi paper's own code, transcribed."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + bloom_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 40, 64])
def test_alibi_slopes_are_the_standard_ones(heads):
    np.testing.assert_allclose(alibi_slopes(heads), bloom_slopes(heads), rtol=1e-14)
    if heads & (heads - 1) == 0:
        np.testing.assert_allclose(alibi_slopes(heads), [2 ** (-8 * (h + 1) / heads) for h in range(heads)],
                                   rtol=1e-15)


def test_alibi_slopes_refuses_bad_heads():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="heads"):
            alibi_slopes(bad)


# ----------------------------------------------------------------------------
# Validation of the terms
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(softcap=0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="50"), TypeError, "softcap must be a number"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be shaped \[H\] with H = 2"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks must be floating-point"),
    (dict(alibi_slopes=[0.5, 0.25]), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(rel_bias=torch.zeros(2, 4)), ValueError, r"rel_bias must be shaped \[H, 2 \* max_distance \+ 1\]"),
    (dict(rel_bias=torch.zeros(2)), ValueError, "rel_bias"),
])
def test_bad_terms_raise_clear_errors(kwargs, error, match):
    q, k, v, _ = inputs(1, 2, 1, 4, 3)
    attn = ReferenceAttention(ir.Causal())
    with pytest.raises(error, match=match):
        attn(*(torch.tensor(x) for x in (q, k, v)), **kwargs)


def test_bad_numpy_terms_raise_clear_errors():
    q, k, v, _ = inputs(1, 2, 1, 4, 3)
    attn = ReferenceAttention(ir.Causal())
    with pytest.raises(ValueError, match=r"sinks must be shaped \[H\] with H = 2"):
        attn(q, k, v, sinks=np.zeros(3))
    with pytest.raises(TypeError, match="rel_bias must have a floating-point dtype"):
        attn(q, k, v, rel_bias=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="softcap"):
        attn(q, k, v, softcap=-2)


# ----------------------------------------------------------------------------
# The language: `with softcap(c), alibi`
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, body, softcap, alibi", [
    ("causal with softcap(50)", "causal", 50.0, False),
    ("causal with alibi", "causal", None, True),
    ("sliding_window(4096) with softcap(30.5), alibi", "causal & local(4096)", 30.5, True),
    ("causal & (local(8) | sink(2)) with alibi, softcap(0.25)", "causal & (local(8) | sink(2))", 0.25, True),
    ("where q - k < 3 with softcap(2)", "where q - k < 3", 2.0, False),
    ("pattern g(c = 50) = sliding_window(64) with softcap(c)\ng(c = 20)", "causal & local(64)", 20.0, False),
    ("pattern gemma2_local = sliding_window(4096)\n    with softcap(50)", "causal & local(4096)", 50.0, False),
    ("pattern g = causal with softcap(5)\ng with alibi", "causal", 5.0, True),
])
def test_parse_terms(text, body, softcap, alibi):
    p = pcc.parse(text)
    assert isinstance(p, ir.Scored)
    assert ir.split_terms(p) == (pcc.parse(body), ir.Terms(softcap, alibi))
    assert pcc.parse(str(p)) == p  # prints back to source that means the same


def test_load_a_file_with_terms(tmp_path):
    path = tmp_path / "gemma.pat"
    path.write_text("pattern gemma2_local(w = 4096) = sliding_window(w) with softcap(50)\n")
    p = pcc.load(path, w=128)
    assert p == ir.Scored(pcc.parse("sliding_window(128)"), ir.Terms(50.0))


@pytest.mark.parametrize("text, error, match, column", [
    ("causal with softcap(0)", pcc.PatternValueError, r"softcap\(c\) needs c > 0, got c=0", 21),
    ("causal with softcap(-1)", pcc.PatternValueError, r"needs c > 0, got c=-1", 21),
    ("causal with softcap(0.0)", pcc.PatternValueError, "needs c > 0", 21),
    ("causal with softcup(3)", pcc.UnknownNameError, "unknown score term `softcup`", 13),
    ("3 with alibi", pcc.PatternValueError, "`with` adds score terms to a pattern", 1),
    ("q < k with alibi", pcc.PatternValueError, "its left side is a comparison", 1),
    ("heads { 0..2 => causal with alibi }", pcc.PatternSyntaxError, "`with` cannot be inside brackets", 24),
    ("(causal with alibi) | local(3)", pcc.PatternSyntaxError, "`with` cannot be inside brackets", 9),
    ("causal with alibi, alibi", pcc.PatternValueError, "`alibi` is given twice", 20),
    ("causal with alibi(2)", pcc.ArityError, "`alibi` takes no arguments", 13),
    ("causal with softcap", pcc.ArityError, "`softcap` takes exactly one argument", 13),
    ("causal with softcap(n)", pcc.PatternValueError, "cannot depend on `n`", 21),
    ("local(3.5)", pcc.PatternSyntaxError, "found `3.5`", 7),
    ("causal with", pcc.PatternSyntaxError, "expected a name", 12),
])
def test_term_errors_are_located(text, error, match, column):
    with pytest.raises(error, match=match) as info:
        pcc.parse(text)
    assert (info.value.line, info.value.column) == (1, column)


@pytest.mark.parametrize("use, where", [("g | local(3)", "`|`"), ("~g", "`~`"), ("causal - g", "`-`"),
                                        ("heads { 0..1 => g }", "`heads`"), ("cycle(g, causal)", "`cycle`")])
def test_a_scored_definition_cannot_be_combined(use, where):
    with pytest.raises(pcc.PatternValueError, match=f"`g` has score terms .* cannot be a part of {where}") as info:
        pcc.parse(f"pattern g = causal with alibi\n{use}")
    assert info.value.line == 2


def test_python_terms():
    p = ir.Causal().scored(softcap=30)
    assert p == pcc.parse("causal with softcap(30)")
    assert p.scored(alibi=True) == pcc.parse("causal with softcap(30), alibi")
    assert ir.Causal().scored() == ir.Causal()
    for combine in (lambda: p | ir.Local(3), lambda: ir.Local(3) & p, lambda: ~p, lambda: ir.Local(3) - p):
        with pytest.raises(TypeError, match="score terms"):
            combine()
    with pytest.raises(ValueError, match="already has softcap"):
        p.scored(softcap=2)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        ir.Causal().scored(softcap=0)
    assert str(ir.Local(2).scored(softcap=1e-5)) == "local(2) with softcap(0.00001)"
    for c in (1e-5, 3e9, 1e20, 0.1, 30.5, 50):
        p = ir.Causal().scored(softcap=c)
        assert pcc.parse(str(p)) == p


def test_terms_change_no_mask_layout_or_plan():
    plain, scored = pcc.parse("strided(8)"), pcc.parse("strided(8) with softcap(20), alibi")
    np.testing.assert_array_equal(pcc.mask(scored, 40, heads=2), pcc.mask(plain, 40, heads=2))
    assert pcc.layout(scored, 200, 16).to_dense().tolist() == pcc.layout(plain, 200, 16).to_dense().tolist()
    assert pcc.plan(scored, 200, 16).describe() == pcc.plan(plain, 200, 16).describe()
    for got, want in zip(pcc.sparse_mask(scored, 50), pcc.sparse_mask(plain, 50)):
        assert (got != want).nnz == 0


# ----------------------------------------------------------------------------
# The public API: compile(pat, softcap=...), attn(..., sinks=, rel_bias=, alibi_slopes=)
# ----------------------------------------------------------------------------

# Inputs and tolerance per backend (the Triton kernels run float32 here; the
# tolerance is relative to the largest value of each tensor).
DTYPE = {"reference": torch.float64, "triton": torch.float32}
TOLERANCE = {"reference": 1e-12, "triton": 1e-4}


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def on(backend, x):
    return torch.as_tensor(x).to(device_for(backend), DTYPE[backend])


def call_inputs(backend, B=1, H=4, Hkv=2, n=21, D=16, seed=0):
    return tuple(on(backend, x) for x in inputs(B, H, Hkv, n, D, seed)[:3])


def f64(x):
    return x.detach().to("cpu", torch.float64)


def assert_close(got, want, tol):
    got, want = f64(got).numpy(), f64(want).numpy()
    largest = np.abs(want[np.isfinite(want)]).max(initial=1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * largest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_alibi_uses_the_standard_slopes(backend):
    q, k, v = call_inputs(backend)
    mask = dense_mask(pcc.parse("sliding_window(7)"), 21)
    o, lse = pcc.compile("sliding_window(7) with alibi", backend=backend)(q, k, v, return_lse=True)
    slopes = torch.tensor(alibi_slopes(4), dtype=torch.float32).double()  # float32, as the API makes them
    o_ref, lse_ref = naive_attention(mask, f64(q), f64(k), f64(v), 0.25, slopes=slopes)
    assert_close(o, o_ref, TOLERANCE[backend])
    assert_close(lse, lse_ref, TOLERANCE[backend])
    # the call's slopes replace the standard ones; given without `with alibi` they turn alibi on
    mine = torch.tensor([0.5, 0.1, 0.0, 1.0], dtype=torch.float64)
    o_ref = naive_attention(mask, f64(q), f64(k), f64(v), 0.25, slopes=mine)[0]
    for text in ("sliding_window(7) with alibi", "sliding_window(7)"):
        o = pcc.compile(text, backend=backend)(q, k, v, alibi_slopes=on(backend, mine))
        assert_close(o, o_ref, TOLERANCE[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_softcap_adds_or_replaces_the_patterns(backend):
    q, k, v = call_inputs(backend, seed=2)
    q = 6 * q  # scores large enough for the cap to matter
    mask = dense_mask(pcc.parse("strided(4)"), 21)
    want = naive_attention(mask, f64(q), f64(k), f64(v), 0.25, softcap=1.5)[0]
    for attn in (pcc.compile("strided(4)", backend=backend, softcap=1.5),
                 pcc.compile("strided(4) with softcap(1.5)", backend=backend),
                 pcc.compile("strided(4) with softcap(50)", backend=backend, softcap=1.5)):
        assert_close(attn(q, k, v), want, TOLERANCE[backend])
    assert pcc.compile("strided(4) with alibi", softcap=2).pattern == pcc.parse("strided(4) with softcap(2), alibi")
    uncapped = pcc.compile("strided(4)", backend=backend)(q, k, v)
    assert (f64(uncapped) - want).abs().max() > 1e-2  # the cap changes the result


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_terms_with_gradients(backend):
    q, k, v = (x.clone().requires_grad_() for x in call_inputs(backend, seed=3))
    slopes, sinks, bias = (on(backend, t).requires_grad_() for t in term_tensors(4, True, True, 3))
    pat = "causal & (local(5) | sink(2)) - local(1)"  # row 0 has no key
    o, lse = pcc.compile(pat + " with softcap(2)", backend=backend)(
        q, k, v, return_lse=True, alibi_slopes=slopes, sinks=sinks, rel_bias=bias)
    leaves = [f64(x).requires_grad_() for x in (q, k, v, slopes, sinks, bias)]
    o_ref, lse_ref = naive_attention(dense_mask(pcc.parse(pat), 21), *leaves[:3], 0.25, 2.0, *leaves[3:])
    tol = TOLERANCE[backend]
    assert_close(o, o_ref, tol)
    assert_close(lse, lse_ref, tol)
    do = np.random.default_rng(9).standard_normal(o.shape)
    grads = torch.autograd.grad((o * on(backend, do)).sum() + lse.sum(), (q, k, v, slopes, sinks, bias))
    grads_ref = torch.autograd.grad((o_ref * torch.tensor(do)).sum() + lse_ref.sum(), leaves)
    for got, want, leaf in zip(grads, grads_ref, (q, k, v, slopes, sinks, bias)):
        assert got.dtype == leaf.dtype and got.device == leaf.device
        assert_close(got, want, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must be shaped \[H\] with H = 4"),
    (dict(rel_bias=torch.zeros(4, 6)), ValueError, r"rel_bias must be shaped"),
    (dict(alibi_slopes=torch.zeros(4, dtype=torch.int32)), TypeError, "alibi_slopes must be floating-point"),
    (dict(sinks=np.zeros(4)), TypeError, "sinks must be a torch.Tensor"),
])
def test_public_call_refuses_bad_terms(backend, kwargs, error, match):
    q, k, v = call_inputs(backend)
    kwargs = {name: t.to(q.device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    with pytest.raises(error, match=match):
        pcc.compile("causal", backend=backend)(q, k, v, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: CUDA and the CPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_public_call_refuses_terms_on_another_device(backend):
    q, k, v = (x.cuda() for x in call_inputs(backend))
    with pytest.raises(ValueError, match="sinks is on cpu but q is on cuda"):
        pcc.compile("causal", backend=backend)(q, k, v, sinks=torch.zeros(4))


def test_compile_refuses_a_bad_softcap():
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        pcc.compile("causal", softcap=0)
    with pytest.raises(TypeError, match="softcap must be a number"):
        pcc.compile("causal", softcap="30")


def test_numpy_inputs_through_the_public_api():
    q, k, v = (x.numpy() for x in call_inputs("reference"))
    o = pcc.compile("causal with alibi", backend="reference")(q, k, v, sinks=np.array([0.1, 0.2, 0.3, 0.4]))
    want = ReferenceAttention(ir.Causal())(q, k, v, alibi_slopes=np.float32(alibi_slopes(4)).astype(np.float64),
                                           sinks=np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(o, want, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------------
# patterncc.nn
# ----------------------------------------------------------------------------


def test_nn_attention_with_every_term():
    from patterncc.nn import SparseSelfAttention

    torch.manual_seed(0)
    layer = SparseSelfAttention(16, 4, "strided(3) with alibi", kv_heads=2, backend="reference", softcap=2.5,
                                sinks=True, rel_bias_distance=2).double()
    assert layer.sinks.shape == (4,) and layer.rel_bias.shape == (4, 5)
    assert {"sinks", "rel_bias"} <= {name for name, _ in layer.named_parameters()}
    with torch.no_grad():
        layer.sinks.normal_()
        layer.rel_bias.normal_()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    out = layer(x)

    # the same layer, written out with the formula
    q, k, v = layer.qkv(x).split([16, 8, 8], dim=-1)
    q, k, v = (t.view(2, 11, -1, 4).transpose(1, 2) for t in (q, k, v))
    slopes = torch.tensor(alibi_slopes(4), dtype=torch.float32).double()
    o = naive_attention(dense_mask(strided(3), 11), q, k, v, 0.5, 2.5, slopes, layer.sinks, layer.rel_bias)[0]
    want = layer.proj(o.transpose(1, 2).reshape(2, 11, 16))
    np.testing.assert_allclose(out.detach().numpy(), want.detach().numpy(), rtol=1e-10, atol=1e-12)

    grads = torch.autograd.grad(out.square().sum(), (layer.sinks, layer.rel_bias))
    grads_ref = torch.autograd.grad(want.square().sum(), (layer.sinks, layer.rel_bias))
    for got, ref in zip(grads, grads_ref):
        assert got.abs().max() > 0
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9, atol=1e-12)
    assert "softcap=2.5, sinks=True, rel_bias_distance=2" in repr(layer)


def test_nn_model_trains_its_terms():
    from patterncc.nn import SparseTransformer

    torch.manual_seed(1)
    lm = SparseTransformer(32, 16, 2, 2, ["sliding_window(4) with alibi", "causal"], max_len=16,
                           backend="reference", softcap=30, sinks=True, rel_bias_distance=3)
    idx = torch.randint(0, 32, (2, 13))
    lm.loss(idx[:, :-1], idx[:, 1:]).backward()
    for block in lm.blocks:
        assert block.attn.sinks.grad.abs().max() > 0 and block.attn.rel_bias.grad.abs().max() > 0
    assert isinstance(lm.layer_patterns[0], ir.Scored) and lm.blocks[0].attn.softcap == 30.0


def test_nn_refuses_terms_it_cannot_apply():
    from patterncc.nn import SparseSelfAttention, SparseTransformer

    with pytest.raises(ValueError, match="score terms need a pattern"):
        SparseSelfAttention(16, 2, None, sinks=True)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        SparseSelfAttention(16, 2, "causal", softcap=-1)
    with pytest.raises(ValueError, match="rel_bias_distance must be an integer >= 0"):
        SparseSelfAttention(16, 2, "causal", rel_bias_distance=-1)
    for mode in ("merged", "multihead"):
        with pytest.raises(ValueError, match=f"{mode} mode combines the patterns, but .* has score terms"):
            SparseTransformer(32, 16, 2, 2, ["causal with alibi", "sliding_window(4)"], mode=mode, max_len=16)


# ----------------------------------------------------------------------------
# The testing kit with terms
# ----------------------------------------------------------------------------

from hypothesis import HealthCheck, find, given, settings, strategies as st  # noqa: E402

from patterncc import testing  # noqa: E402


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text", ["strided(4) with softcap(2.5), alibi", "causal - local(1)", "local(3) | global(2)"])
def test_check_pattern_with_terms(backend, text):
    report = testing.check_pattern(pcc.parse(text), backends=[backend], examples=8, seed=1, terms=True)
    assert report.ok, report
    assert [(r.check, r.status) for r in report.results] == [
        ("layout", "passed"), ("kernel", "passed"), ("packed", "passed")]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_drawn_patterns_and_terms_match_the_kits_dense_formula(data):
    pat = data.draw(testing.patterns(max_depth=2, max_leaves=3, terms=True))
    case = data.draw(testing.attention_inputs(pat, dtypes=("float64",), max_seq_len=24, head_dims=(4,), terms=True))
    q, k, v, do = testing.make_tensors(case)
    for dense_limit in (4096, 0):
        testing.assert_matches_reference(ReferenceAttention(pat, dense_limit=dense_limit), pat, q, k, v, case.scale,
                                         do, against="dense", **testing.make_terms(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_terms_through_a_backend(backend):
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def run(data):
        pat = data.draw(testing.patterns(max_depth=2, max_leaves=3, allow_where=False, terms=True))
        case = data.draw(testing.attention_inputs(pat, dtypes=("float32",), max_seq_len=40, head_dims=(16,),
                                                  max_heads=2, blocks=(16,), terms=True))
        device = device_for(backend)
        q, k, v, do = testing.make_tensors(case, device=device)
        attn = pcc.compile(pat, backend=backend, **({"block": case.block} if backend == "triton" else {}))
        testing.assert_matches_reference(attn, pat, q, k, v, case.scale, do, **testing.make_terms(case, device=device))

    run()


def test_the_strategies_reach_every_term():
    pats = testing.patterns(max_depth=1, max_leaves=2, terms=True)
    assert find(pats, lambda p: ir.split_terms(p)[1].softcap is not None) is not None
    assert find(pats, lambda p: ir.split_terms(p)[1].alibi) is not None
    cases = testing.attention_inputs(max_seq_len=16, terms=True)
    case = find(cases, lambda c: c.sinks and c.alibi_slopes and c.rel_bias_distance is not None)
    made = testing.make_terms(case)
    assert made["sinks"].shape == (case.H,) and made["alibi_slopes"].shape == (case.H,)
    assert made["rel_bias"].shape == (case.H, 2 * case.rel_bias_distance + 1)
    assert "sinks" in case.describe()
    assert testing.make_terms(find(testing.attention_inputs(), lambda c: True)) == {}


class _Wrong:
    """The reference with one mistake, to see the kit catch it."""

    def __init__(self, pat, mistake):
        self.inner, self.mistake = pcc.compile(pat, backend="reference"), mistake

    def __call__(self, q, k, v, scale=None, return_lse=False, **terms):
        if self.mistake == "detached rel_bias":
            terms["rel_bias"] = terms["rel_bias"].detach()
        if self.mistake == "sinks ignored":
            terms.pop("sinks")
        if self.mistake == "slopes off by 1e-3":
            terms["alibi_slopes"] = terms["alibi_slopes"] * 1.001
        return self.inner(q, k, v, scale=scale, return_lse=return_lse, **terms)


@pytest.mark.parametrize("mistake, message", [
    ("detached rel_bias", "d_rel_bias is None: no gradient reached rel_bias"),
    ("sinks ignored", "o: .* values off"),
    ("slopes off by 1e-3", "values off"),
])
def test_the_kit_catches_wrong_terms(mistake, message):
    case = testing.AttentionCase(B=1, H=2, Hkv=1, n=20, D=8, dtype="float32", scale=None, seed=5,
                                 alibi_slopes=True, sinks=True, rel_bias_distance=3)
    pat = pcc.parse("causal")
    q, k, v, do = testing.make_tensors(case)
    testing.assert_matches_reference(_Wrong(pat, None), pat, q, k, v, None, do, **testing.make_terms(case))
    with pytest.raises(AssertionError, match=message):
        testing.assert_matches_reference(_Wrong(pat, mistake), pat, q, k, v, None, do, **testing.make_terms(case))


def test_standard_slopes_are_the_same_numbers_everywhere():
    """16 heads: slopes 2^(-h/2), not float32 numbers; every path rounds them alike."""
    q, k, v, do = testing.make_tensors(testing.AttentionCase(B=1, H=16, Hkv=4, n=30, D=8, dtype="float64",
                                                             scale=None, seed=2))
    pat = pcc.parse("causal with alibi")
    for attn in (ReferenceAttention(pat), ReferenceAttention(pat, dense_limit=0), pcc.compile(pat, backend="reference")):
        testing.assert_matches_reference(attn, pat, q, k, v, None, do, against="dense")
    np.testing.assert_array_equal(pcc.compile(pat, backend="reference")(q.numpy(), k.numpy(), v.numpy()),
                                  ReferenceAttention(pat)(q.numpy(), k.numpy(), v.numpy()))
