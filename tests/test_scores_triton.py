"""The score terms fused into the Triton kernels, against an independent
float64 torch implementation of their contract (``patterncc.scores``).

Every case checks o, lse and every gradient: q, k, v and each given term
tensor (alibi_slopes, sinks, rel_bias), for natural and planned patterns
(residue order, gathered columns), GQA, 16-bit dtypes, lengths that are not
a multiple of the block, n = 1 and rows with no allowed key. Under
``TRITON_INTERPRET=1`` (set here, as in test_triton.py) the shapes are
interpreter-sized: n <= 48, D = 16, every tile 16.

Tolerances are absolute on values of order 1 (inputs standard normal) and
scale with the reference's largest magnitude for the term gradients, which
are sums over every pair of a head: float32 (exact fp32 products) 2e-5 for
o and lse, 1e-4 for gradients; float16 and bfloat16 round P and dS to 16
bits as test_triton.py's tolerances say.
"""

from __future__ import annotations


import pytest
import torch

from patterncc import ir
from patterncc.masks import dense_mask

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)


from patterncc.attention import Attention  # noqa: E402
from patterncc.backends.triton import KernelConfig, TritonAttention  # noqa: E402
from stdlib_ir import fixed, sliding_window, strided  # noqa: E402

TILES16 = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
# tiles of different sizes: the dQ tile's skewed diagonals are 32 + 16 - 1 long
MIXED = KernelConfig(block=16, block_m=32, block_n=16, block_m1=16, block_n1=32, block_m2=32, block_n2=16)
BAND = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16,
                    bwd_band=True)

TOL = {  # dtype -> (o, lse, gradients), absolute
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (4e-3, 2e-3, 3e-2),
    torch.bfloat16: (3e-2, 1e-2, 1.5e-1),
}
C = ir.Causal()
TERM_NAMES = ("softcap", "alibi_slopes", "sinks", "rel_bias")


# ----------------------------------------------------------------------------
# The contract in float64, written out independently of the backends
# ----------------------------------------------------------------------------


def naive(q, k, v, allowed, scale, softcap=None, alibi_slopes=None, sinks=None, rel_bias=None):
    """o, lse in float64 of the score-term contract: s = scale q.k; softcap
    c tanh(s / c); minus slope_h |q - k|; plus t[h, clamp(q - k, -M, M) + M];
    the pattern's ``allowed`` [H or 1, n, n]; exp(sinks_h) in the denominator.
    Rows with nothing (no key, no sink) give o = 0, lse = -inf, gradients 0."""
    B, H, n, D = q.shape
    group = H // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)  # (B, H, n, n)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(n, device=q.device)
    dist = pos[:, None] - pos[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().view(H, 1, 1) * dist.abs()
    if rel_bias is not None:
        M = (rel_bias.shape[1] - 1) // 2
        s = s + rel_bias.double()[:, dist.clamp(-M, M) + M]
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, H, 1, 1).expand(B, H, n, 1)], dim=-1)
    top = s.max(dim=-1, keepdim=True).values.detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(s - top).sum(dim=-1, keepdim=True)
    reached = total > 0
    lse = torch.where(reached, top + torch.log(torch.where(reached, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    p = torch.exp(s - torch.where(reached, lse, torch.zeros_like(lse)))[..., :n]
    return p @ v, lse.squeeze(-1)


def make_inputs(B, H, Hkv, n, D, dtype, terms, seed=0, term_dtype=torch.float32, fixed=()):
    """q, k, v and the named terms' values, all leaves that require grad
    but the term tensors named in ``fixed``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    values = {}
    if "softcap" in terms:
        values["softcap"] = 1.5  # small enough that tanh bends the scores
    if "alibi_slopes" in terms:
        values["alibi_slopes"] = torch.rand(H, generator=g) * 0.5
    if "sinks" in terms:
        values["sinks"] = torch.randn(H, generator=g)
    if "rel_bias" in terms:
        M = 3 if terms["rel_bias"] is None else terms["rel_bias"]
        values["rel_bias"] = torch.randn(H, 2 * M + 1, generator=g)
    values = {key: x.to(term_dtype) if torch.is_tensor(x) else x for key, x in values.items()}
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    values = {key: x.to(DEVICE).requires_grad_(key not in fixed) if torch.is_tensor(x) else x
              for key, x in values.items()}
    return leaves, values


def check(attn, pattern, B=1, H=2, Hkv=2, n=37, D=16, dtype=torch.float32, terms=None, seed=0,
          term_dtype=torch.float32, fixed=()):
    """attn's o, lse and every gradient against ``naive`` on fresh inputs;
    the term tensors named in ``fixed`` want no gradient and must get none."""
    terms = {"softcap": None, "alibi_slopes": None, "sinks": None, "rel_bias": 3} if terms is None else terms
    (q, k, v), values = make_inputs(B, H, Hkv, n, D, dtype, terms, seed, term_dtype, fixed)
    scale = D ** -0.5
    o, lse = attn(q, k, v, return_lse=True, **values)
    allowed = torch.as_tensor(dense_mask(pattern, n, H), device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_values = {key: x.detach().clone().requires_grad_() if torch.is_tensor(x) else x
                  for key, x in values.items()}
    o_ref, lse_ref = naive(*leaves, allowed, scale, **ref_values)
    tol_o, tol_lse, tol_g = TOL[dtype]
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "rows with no allowed key differ"
    finite = torch.isfinite(lse_ref)
    assert (o.double() - o_ref).abs().max() <= tol_o
    assert (torch.where(finite, lse.double() - lse_ref, 0.0)).abs().max() <= tol_lse
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE) * finite
    torch.autograd.backward([o, lse], [do.to(o.dtype), dlse.float()])
    torch.autograd.backward([o_ref, torch.where(finite, lse_ref, 0.0)], [do.double(), dlse.double()])
    for key in fixed:
        assert values[key].grad is None, f"{key} wants no gradient but got one"
    learned = [key for key, x in values.items() if torch.is_tensor(x) and key not in fixed]
    got = [*(x.grad for x in (q, k, v)), *(values[key].grad for key in learned)]
    want = [*(x.grad for x in leaves), *(ref_values[key].grad for key in learned)]
    names = ["dq", "dk", "dv", *("d_" + key for key in learned)]
    for name, a, b in zip(names, got, want):
        assert a is not None, f"{name}: no gradient"
        assert torch.isfinite(a).all(), f"{name} is not finite"
        assert a.dtype == b.dtype or name in ("dq", "dk", "dv"), f"{name} has dtype {a.dtype}, want {b.dtype}"
        size = max(1.0, b.abs().max().item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol_g * size, f"{name}: max error {err:.3g} over {tol_g * size:.3g}"
    return o, lse, values


def natural(pattern, config=TILES16):
    return TritonAttention(pattern, config=config)


def planned(pattern, config=TILES16):
    """The Triton backend's planned attention forced to reorder (the
    public ``Attention`` builds the same object)."""
    return Attention(pattern, backend="triton", plan="planned", config=config).impl("triton")


# ----------------------------------------------------------------------------
# Each term alone, and all of them, in natural order
# ----------------------------------------------------------------------------


ALONE = [{"softcap": None}, {"alibi_slopes": None}, {"sinks": None}, {"rel_bias": 3}]


@pytest.mark.parametrize("terms", ALONE, ids=[next(iter(t)) for t in ALONE])
@pytest.mark.parametrize("name", ["sliding_window", "causal"])
def test_each_term_alone(name, terms):
    pattern = sliding_window(8) if name == "sliding_window" else C
    check(natural(pattern), pattern, terms=terms)


@pytest.mark.parametrize("name, pattern", [
    ("sliding_window", sliding_window(8)),
    ("causal", C),
    ("longformer", ir.Local(6) | ir.Global(3)),  # q - k of both signs: both tails of the bias
])
def test_all_terms(name, pattern):
    check(natural(pattern), pattern)


@pytest.mark.parametrize("M", [0, 1, 20, 60])
def test_rel_bias_distances(M):
    """M = 0 (one bucket for every pair), small (whole tiles in the tails:
    the far-tile shortcut), and M past the sequence (no pair clamped)."""
    check(natural(ir.All()), ir.All(), terms={"rel_bias": M})


@pytest.mark.parametrize("pattern, n", [(C, 100), (ir.All(), 48), (sliding_window(80), 100)],
                         ids=["causal", "all", "sliding_window"])
@pytest.mark.parametrize("M", [2, 20])
def test_rel_bias_on_runs(pattern, n, M):
    """FULL steps walked as runs: with a bias, each run is a loop over the
    steps wholly in a tail of it and one over the near steps (_near_steps)."""
    attn = natural(pattern)
    tables = attn.prepare(n, 2, 2, 16, torch.float32, torch.device(DEVICE)).tables
    assert tables.fwd_walk == tables.dq_walk == "runs"
    check(attn, pattern, n=n, terms={"rel_bias": M, "alibi_slopes": None})


@pytest.mark.parametrize("config", [MIXED, BAND], ids=["mixed_tiles", "band_walk"])
def test_all_terms_other_walks(config):
    check(natural(C, config), C, n=45)
    check(natural(sliding_window(8), config), sliding_window(8), n=45)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_terms_16bit(dtype):
    check(natural(sliding_window(8)), sliding_window(8), dtype=dtype)


def test_term_gradients_in_the_terms_dtype():
    check(natural(C), C, terms={"alibi_slopes": None, "sinks": None, "rel_bias": 2}, term_dtype=torch.bfloat16)


def test_gqa():
    check(natural(sliding_window(8)), sliding_window(8), H=4, Hkv=2, B=2, n=33)
    check(natural(C), C, H=4, Hkv=1, n=20, terms={"softcap": None, "sinks": None})


@pytest.mark.parametrize("n", [1, 16, 48])
def test_lengths(n):
    check(natural(C), C, n=n)


# ----------------------------------------------------------------------------
# Rows with no allowed key: o = 0, lse = -inf or the sink, zero gradients, no NaN
# ----------------------------------------------------------------------------


EMPTY_ROWS = C - ir.Block(4)  # each query of the first block of 4 sees no key


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
def test_rows_with_no_allowed_key(with_sinks):
    terms = {"softcap": None, "alibi_slopes": None, "rel_bias": 2}
    if with_sinks:
        terms["sinks"] = None
    o, lse, values = check(natural(EMPTY_ROWS), EMPTY_ROWS, n=21, terms=terms)
    assert (o[:, :, :4] == 0).all()
    if with_sinks:
        sink = values["sinks"].detach().view(-1, 1).expand(-1, 4)
        assert (lse[0, :, :4] - sink).abs().max() <= 1e-6  # t_h, through log2 units and back
    else:
        assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] < 0).all()


# ----------------------------------------------------------------------------
# Planned patterns: components in their own token orders, one sink
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, pattern, n", [
    ("strided", strided(8), 37),   # a band and a residue-order stride component
    ("fixed", fixed(16, 4), 45),   # blocks and the gathered summary columns
])
def test_planned(name, pattern, n):
    attn = planned(pattern)
    plan = attn.plan(n, 2)
    assert any(c.reordered for c in plan.components), plan.describe()
    check(attn, pattern, n=n)
    check(attn, pattern, n=n, H=4, Hkv=2, terms={"sinks": None, "softcap": None}, seed=3)


def test_planned_16bit():
    check(planned(strided(8)), strided(8), n=40, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------
# Determinism and input checks
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [natural, planned], ids=["natural", "planned"])
def test_term_gradients_are_deterministic(make):
    pattern = strided(8)
    attn = make(pattern)
    grads = []
    for _ in range(2):
        (q, k, v), values = make_inputs(1, 2, 2, 40, 16, torch.float32,
                                        {"alibi_slopes": None, "sinks": None, "rel_bias": 5})
        o = attn(q, k, v, **values)
        o.square().sum().backward()
        grads.append([x.grad for x in values.values()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _launched_term_grads(monkeypatch) -> list:
    """The TERM_GRADS of every dQ launch from here on (``_KernelTerms.dq_args``)."""
    from patterncc.backends.triton.launch import _KernelTerms

    seen, real = [], _KernelTerms.dq_args

    def spy(self, *args):
        kwargs = real(self, *args)
        seen.append(kwargs["TERM_GRADS"])
        return kwargs

    monkeypatch.setattr(_KernelTerms, "dq_args", spy)
    return seen


@pytest.mark.parametrize("fixed", [("alibi_slopes",), ("rel_bias",), ("sinks",), ("alibi_slopes", "sinks", "rel_bias")],
                         ids=["slopes", "rel_bias", "sinks", "all"])
@pytest.mark.parametrize("make", [natural, planned, lambda p: Attention(p, backend="triton", config=TILES16)],
                         ids=["natural", "planned", "op"])
def test_fixed_term_tensors_get_no_gradient_and_cost_no_sum(make, fixed, monkeypatch):
    """A term tensor that wants no gradient (ALiBi's standard slopes, a
    frozen bias) gets none; q, k, v and the other terms' gradients stay
    exact; and the dQ kernel takes no sum for it (TERM_GRADS: bit 1 the
    slopes, bit 2 the relative bias), through the backend's own autograd
    (natural, planned) and through the torch op (``Attention``)."""
    seen = _launched_term_grads(monkeypatch)
    pattern = sliding_window(8)
    check(make(pattern), pattern, terms={"alibi_slopes": None, "sinks": None, "rel_bias": 3}, fixed=fixed)
    want = ("alibi_slopes" not in fixed) | ("rel_bias" not in fixed) << 1
    assert seen and set(seen) == {want}


def test_the_standard_slopes_take_no_gradient_sum(monkeypatch):
    """``with alibi``'s standard slopes are fixed (BLOOM's, MPT's): the
    backward of a compiled pattern takes no slope sum, and stays exact
    against the same slopes given as a fixed tensor."""
    import patterncc as pcc
    from patterncc.scores import alibi_slopes

    seen = _launched_term_grads(monkeypatch)
    attn = pcc.compile("causal with alibi", backend="triton", config=TILES16)
    (q, k, v), _ = make_inputs(1, 2, 2, 37, 16, torch.float32, {})
    attn(q, k, v).square().sum().backward()
    assert seen and set(seen) == {0}
    slopes = torch.tensor(alibi_slopes(2), device=DEVICE)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    allowed = torch.as_tensor(dense_mask(C, 37, 2), device=DEVICE)
    o_ref, _ = naive(*leaves, allowed, 16 ** -0.5, alibi_slopes=slopes)
    o_ref.square().sum().backward()
    for got, want in zip((q, k, v), leaves):
        assert (got.grad.double() - want.grad).abs().max() <= TOL[torch.float32][2]


def test_no_terms_is_the_plain_call():
    (q, k, v), _ = make_inputs(1, 2, 2, 37, 16, torch.float32, {})
    attn = natural(sliding_window(8))
    o, lse = attn(q, k, v, return_lse=True)
    o2, lse2 = attn(q, k, v, return_lse=True, softcap=None, alibi_slopes=None, sinks=None, rel_bias=None)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": "50"}, TypeError, "softcap"),
    ({"softcap": 1e-45}, ValueError, "softcap"),
    ({"sinks": torch.zeros(3)}, ValueError, "sinks"),
    ({"alibi_slopes": torch.zeros(2, dtype=torch.int64)}, TypeError, "alibi_slopes"),
    ({"rel_bias": torch.zeros(2, 4)}, ValueError, "rel_bias"),
    ({"rel_bias": [0.0] * 3}, TypeError, "rel_bias"),
])
def test_bad_terms_name_the_argument(kwargs, error, words):
    (q, k, v), _ = make_inputs(1, 2, 2, 8, 16, torch.float32, {})
    for attn in (natural(C), planned(strided(8))):
        with pytest.raises(error, match=words):
            attn(q, k, v, **kwargs)


def test_the_reversed_bias_table_pads_as_the_kernels_read_it():
    """launch.REL_PAD is the kernels' _REL_PAD (two copies of one number: the template is not imported)."""
    import re
    from pathlib import Path

    from patterncc.backends.triton import launch

    template = (Path(launch.__file__).parent / "kernels.py").read_text()
    assert int(re.search(r"_REL_PAD = tl\.constexpr\((\d+)\)", template).group(1)) == launch.REL_PAD


def test_a_relative_bias_refuses_tiles_its_padded_table_cannot_serve():
    """Tiles of 256 would read past the reversed table's padding: a clear error, not a wrong answer."""
    big = KernelConfig(block=16, block_m=256, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
    attn = Attention(ir.Causal(), "triton", config=big)
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rel_bias needs tiles"):
        attn(q, q, q, rel_bias=torch.zeros(2, 9, device=DEVICE))
