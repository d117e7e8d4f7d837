"""Packed batches (``cu_seqlens``): the pattern applies to each sequence
alone, with ``q``, ``k`` and ``n`` counted within it, so a packed call equals
each sequence's own call concatenated: ``o``, ``lse``, the gradients of q, k,
v and of the score terms' tensors, rows with no key (0 and ``-inf``, the
sink's value with sinks).

Every backend is checked against each sequence computed alone in float64:
the reference against the testing kit's independent dense computation, the
Triton kernels against the reference (``testing.assert_packed_matches_reference``),
on drawn patterns and packed batches (lengths 1..300, 1..20 sequences,
boundaries inside blocks and on their edges; interpreter-sized under
``TRITON_INTERPRET=1``), then on the awkward cases by name. Bad
``cu_seqlens`` are refused before any work, with a message naming it.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import patterncc as pcc
from patterncc import ir, testing
from patterncc.testing import AttentionCase, make_cu_seqlens, make_tensors, make_terms, patterns

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)


BACKENDS = ["reference", "triton"]
ISQRT = ir.Causal() & ir.Local(ir.Call("isqrt", (ir.Var("n"),)))  # a window that depends on each sequence's n


def compiled(pat, backend: str, **options):
    """``pcc.compile(pat, backend=backend)``; the Triton backend at block 16 (interpreter-sized)."""
    if backend == "triton":
        options.setdefault("block", 16)
    return pcc.compile(pat, backend=backend, **options)


def device_of(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def case_of(backend: str, lengths, H=2, Hkv=1, D=16, dtype=None, seed=0, **terms) -> AttentionCase:
    dtype = dtype or ("float32" if backend == "triton" else "float64")
    return AttentionCase(B=1, H=H, Hkv=Hkv, n=sum(lengths), D=D, dtype=dtype, scale=None, seed=seed, block=16,
                         lengths=tuple(lengths), **terms)


def check(backend: str, pat, case: AttentionCase, **options):
    """The packed call of ``pat`` on ``case`` against each sequence alone (see the module docstring)."""
    attn = compiled(pat, backend, **options)
    device = device_of(backend)
    q, k, v, do = make_tensors(case, device=device)
    against = "dense" if backend == "reference" else "reference"
    return testing.assert_packed_matches_reference(attn, attn.pattern, q, k, v, make_cu_seqlens(case, device),
                                                   case.scale, do, against=against,
                                                   **make_terms(case, device=device))


# ----------------------------------------------------------------------------
# Drawn patterns and batches
# ----------------------------------------------------------------------------


def _shapes(backend: str) -> dict:
    """The full range (lengths to 300, up to 20 sequences) on the reference
    and on a GPU; interpreter-sized otherwise."""
    if backend == "reference":
        return dict(max_len=300, max_count=20, max_total=1200, blocks=(16, 32, 64), head_dims=(8, 16))
    if GPU:
        return dict(max_len=300, max_count=20, blocks=(16, 32, 64, 128), head_dims=(16, 64, 128))
    return dict(max_len=40, max_count=5, max_total=96, blocks=(16, 32), head_dims=(16,), max_heads=2)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(pat=patterns(heads=2, terms=True), data=st.data())
def test_packed_calls_match_each_sequence_alone(backend, pat, data):
    dtypes = ("float64",) if backend == "reference" else ("float32", "float16", "bfloat16")
    case = data.draw(testing.packed_inputs(pat, dtypes=dtypes, terms=True, **_shapes(backend)), label="case")
    options = {"block": case.block} if backend == "triton" else {}
    check(backend, pat, case, **options)


# ----------------------------------------------------------------------------
# The awkward cases, by name
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [(0, 5, 0, 0, 12, 0), (1, 1, 1), (16, 16, 3), (7, 9, 16, 1)],
                         ids=["empty", "ones", "block edges", "inside blocks"])
def test_empty_and_short_sequences(backend, lengths):
    check(backend, "strided(4)", case_of(backend, lengths))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sequence_is_the_plain_call(backend):
    attn = compiled("causal & (local(5) | sink(2))", backend)
    device = device_of(backend)
    q, k, v, _ = make_tensors(case_of(backend, (37,), H=4, Hkv=2), device=device)
    o, lse = attn(q, k, v, return_lse=True)
    for cu in (torch.tensor([0, 37], dtype=torch.int32, device=device), [0, 0, 37, 37]):
        packed_o, packed_lse = attn(q, k, v, return_lse=True, cu_seqlens=cu)
        if backend == "reference":
            assert torch.equal(packed_o, o) and torch.equal(packed_lse, lse)
        else:
            torch.testing.assert_close(packed_o, o, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_lse, lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sequence_has_its_own_n(backend):
    """``local(isqrt(n))`` packed is not the pattern over the whole row: the
    window of a sequence of 9 is 3, of 25 is 5, of 40 (the row) would be 6."""
    case = case_of(backend, (9, 25, 6))
    check(backend, ISQRT, case)
    attn = compiled(ISQRT, backend)
    q, k, v, _ = make_tensors(case, device=device_of(backend))
    packed = attn(q, k, v, cu_seqlens=make_cu_seqlens(case, device_of(backend)))
    alone = attn(q[:, :, 9:34], k[:, :, 9:34], v[:, :, 9:34])
    whole_row = attn(q, k, v)[:, :, 9:34]
    torch.testing.assert_close(packed[:, :, 9:34], alone, rtol=1e-5, atol=1e-5)
    assert (packed[:, :, 9:34] - whole_row).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pat", ["heads { 0..1 => causal & local(3), 1..4 => strided(4) }",
                                 "cycle(causal, sliding_window(5))"])
def test_heads_and_cycle_with_gqa(backend, pat):
    check(backend, pat, case_of(backend, (11, 20, 1, 8), H=4, Hkv=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_terms_and_sinks_on_empty_rows(backend):
    """``causal - local(1)``: each sequence's first row has no key; with sinks
    its lse is the sink and its output 0, and every term's gradient sums over
    the sequences."""
    pat = "(causal - local(1)) with softcap(2.5), alibi"
    case = case_of(backend, (1, 6, 0, 13), H=2, Hkv=2, sinks=True, rel_bias_distance=4)
    check(backend, pat, case)
    attn = compiled(pat, backend)
    device = device_of(backend)
    q, k, v, _ = make_tensors(case, device=device)
    sinks = make_terms(case, device)["sinks"]
    o, lse = attn(q, k, v, return_lse=True, cu_seqlens=make_cu_seqlens(case, device), sinks=sinks)
    for first in (0, 1, 7):  # the first row of each non-empty sequence
        assert torch.equal(o[0, :, first], torch.zeros_like(o[0, :, first]))
        torch.testing.assert_close(lse[0, :, first], sinks.to(lse.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(backend, dtype):
    check(backend, "fixed(8, 2)", case_of(backend, (5, 16, 27), dtype=dtype, seed=1))


def test_numpy_inputs_take_lists_and_int_arrays():
    attn = pcc.compile("strided(3)", backend="reference")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 12, 4)) for _ in range(3))
    want = [attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in ((0, 5), (5, 12))]
    for cu in ([0, 5, 12], np.array([0, 5, 12], dtype=np.int32), np.array([0, 5, 5, 12], dtype=np.int64)):
        o, lse = attn(q, k, v, return_lse=True, cu_seqlens=cu)
        assert isinstance(o, np.ndarray) and o.dtype == np.float64
        assert np.array_equal(o, np.concatenate([w[0] for w in want], axis=2))
        assert np.array_equal(lse, np.concatenate([w[1] for w in want], axis=2))


def test_int64_cu_seqlens_are_accepted():
    attn = pcc.compile("causal", backend="reference")
    q, k, v, _ = make_tensors(case_of("reference", (3, 4)))
    lens = torch.tensor([3, 4])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])  # int64, as cumsum gives
    assert torch.equal(attn(q, k, v, cu_seqlens=cu), attn(q, k, v, cu_seqlens=cu.to(torch.int32)))


def test_the_reference_keeps_memory_to_the_sequences_own_size():
    """40 sequences of 500 tokens: a mask over the whole row would be 20,000^2
    = 400 MB of booleans; each sequence's own dense work is a few MB."""
    attn = pcc.compile("sliding_window(32)", backend="reference")
    lengths = [500] * 40
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, sum(lengths), 8)) for _ in range(3))
    tracemalloc.start()
    try:
        attn(q, k, v, cu_seqlens=[0, *np.cumsum(lengths)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB"


# ----------------------------------------------------------------------------
# Bad input: refused before any work, naming cu_seqlens
# ----------------------------------------------------------------------------

BAD = [
    (torch.tensor([0.0, 7.0]), TypeError, r"cu_seqlens must hold integers: an int32 tensor .* got a tensor of dtype "
                                          r"torch.float32"),
    (torch.tensor([0, 7], dtype=torch.int16), TypeError, r"cu_seqlens must hold integers: .*torch.int16"),
    (torch.tensor([True, False]), TypeError, r"cu_seqlens must hold integers: .*torch.bool"),
    ([0, 3.5, 7], TypeError, r"cu_seqlens must hold integers: .*a list, got \[0, 3.5, 7\]"),
    ("0 7", TypeError, r"cu_seqlens must hold integers: .*got str"),
    (torch.tensor([[0, 7]], dtype=torch.int32), ValueError, r"cu_seqlens must be 1-D \[num_seqs \+ 1\], got shape "
                                                            r"\(1, 2\)"),
    ([0], ValueError, r"cu_seqlens must hold at least two offsets \(0 and the total 7\)"),
    ([1, 7], ValueError, r"cu_seqlens must start at 0 and end at the packed length 7 \(q.shape\[2\]\), got "
                         r"cu_seqlens\[0\] = 1"),
    ([0, 6], ValueError, r"cu_seqlens must start at 0 and end at the packed length 7 \(q.shape\[2\]\), got "
                         r"cu_seqlens\[-1\] = 6"),
    ([0, 5, 3, 7], ValueError, r"cu_seqlens must be non-decreasing \(cumulative lengths\), got cu_seqlens\[1\] = 5 > "
                               r"cu_seqlens\[2\] = 3"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_cu_seqlens_are_refused(backend, cu, error, message):
    attn = pcc.compile("causal", backend=backend)
    q, k, v, _ = make_tensors(case_of("reference", (7,), dtype="float32"))
    with pytest.raises(error, match=message):
        attn(q, k, v, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_and_combinations_are_refused(backend):
    attn = pcc.compile("causal", backend=backend)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v, _ = make_tensors(AttentionCase(B=2, H=2, Hkv=1, n=7, D=8, dtype="float32", scale=None, seed=0))
    with pytest.raises(ValueError, match=r"batch size 1: q \[1, H, total, D\], k and v \[1, Hkv, total, D\]; "
                                         r"got q \(2, 2, 7, 8\)"):
        attn(q, k, v, cu_seqlens=cu)
    q, k, v = q[:1], k[:1], v[:1]
    with pytest.raises(ValueError, match=r"q's length 4 must equal k's and v's 7"):
        attn(q[:, :, 3:], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens and cache_seqlens cannot be combined"):
        attn(q, k, v, cu_seqlens=cu, cache_seqlens=[7])
    with pytest.raises(TypeError, match="q must be a torch tensor or a numpy array, got list"):
        attn([[1.0]], k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"sinks must be shaped \[H\] with H = 2"):
        attn(q, k, v, cu_seqlens=cu, sinks=torch.zeros(3))


def test_traced_packed_calls_are_the_op():
    """A call a tracer may see (a tensor subclass; fake tensors) takes the
    ``patterncc::attention`` op with cu_seqlens as a tensor: the subclass
    call gives the plain call's result, and fake tensors get the op's
    shapes without any value read (torch.compile itself: test_compile.py)."""
    class Traced(torch.Tensor):  # a tensor subclass: what tracers see (fake tensors, for one)
        pass

    attn = pcc.compile("causal", backend="reference")
    q, k, v, _ = make_tensors(case_of("reference", (3, 4)))
    want = attn(q, k, v, cu_seqlens=[0, 3, 7])
    got = attn(q.as_subclass(Traced), k, v, cu_seqlens=[0, 3, 7])
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, atol=0, rtol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # a fake cu_seqlens has no values to read: the op's fake runs
        q, cu = mode.from_tensor(q), mode.from_tensor(torch.tensor([0, 3, 7], dtype=torch.int32))
        o, lse = attn(q, q, q, cu_seqlens=cu, return_lse=True)
        assert (tuple(o.shape), tuple(lse.shape)) == (tuple(q.shape), tuple(q.shape[:3]))


@pytest.mark.skipif(not GPU, reason="needs CUDA: cu_seqlens on the GPU is read on the host")
def test_cu_seqlens_on_the_gpu():
    attn = pcc.compile("causal", backend="reference")
    q, k, v, _ = make_tensors(case_of("reference", (3, 4)), device="cuda")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
    assert torch.equal(attn(q, k, v, cu_seqlens=cu), attn(q, k, v, cu_seqlens=cu.cpu()))


# ----------------------------------------------------------------------------
# patterncc.nn: a packed forward is each sequence's forward, concatenated
# ----------------------------------------------------------------------------

NN_LENGTHS = (5, 0, 12, 1, 9)
NN_CU = torch.tensor([0, *np.cumsum(NN_LENGTHS)], dtype=torch.int32)


def _grads(module) -> dict:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _packed_and_alone(module, x, weight):
    """(packed output, its parameter gradients), (each sequence alone, concatenated; their gradients summed):
    the loss is ``sum(output * weight)``, the same over both."""
    module.zero_grad()
    packed = module(x, cu_seqlens=NN_CU)
    (packed * weight).sum().backward()
    packed_grads = _grads(module)
    module.zero_grad()
    spans = [(a, b) for a, b in zip(NN_CU[:-1].tolist(), NN_CU[1:].tolist()) if b > a]
    alone = torch.cat([module(x[:, a:b]) for a, b in spans], dim=1)
    (alone * weight).sum().backward()
    return (packed, packed_grads), (alone, _grads(module))


def _assert_same(got, want):
    (o, grads), (o_alone, grads_alone) = got, want
    torch.testing.assert_close(o, o_alone, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_alone.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_alone[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("pattern, options", [
    ("strided(4)", dict(kv_heads=2)),
    (ISQRT, dict(sinks=True, rel_bias_distance=3, softcap=3.0)),
    ("cycle(causal & local(3), causal & stride(3))", {}),
    (None, dict(kv_heads=1)),  # dense causal: SDPA per sequence
], ids=["strided-gqa", "isqrt-terms", "cycle", "sdpa"])
def test_sparse_self_attention_packed(pattern, options):
    from patterncc.nn import SparseSelfAttention

    torch.manual_seed(0)
    attn = SparseSelfAttention(16, 4, pattern, backend="reference", **options).double()
    if attn.sinks is not None:
        with torch.no_grad():
            attn.sinks.normal_()
            attn.rel_bias.normal_()
    x = torch.randn(1, sum(NN_LENGTHS), 16, dtype=torch.float64)
    _assert_same(*_packed_and_alone(attn, x, torch.randn(1, sum(NN_LENGTHS), 16, dtype=torch.float64)))


@pytest.mark.parametrize("recompute", [False, True])
def test_sparse_transformer_packed(recompute):
    """Logits and every parameter's gradient; positions restart with each sequence."""
    from patterncc.nn import SparseTransformer

    torch.manual_seed(0)
    model = SparseTransformer(31, 16, 2, 2, ["causal & local(4)", "strided(3)"], max_len=12,
                              recompute=recompute, backend="reference", sinks=True).double()
    idx = torch.randint(0, 31, (1, sum(NN_LENGTHS)))
    _assert_same(*_packed_and_alone(model, idx, torch.randn(1, sum(NN_LENGTHS), 31, dtype=torch.float64)))
    targets = torch.randint(0, 31, (1, sum(NN_LENGTHS)))
    want = torch.nn.functional.cross_entropy(model(idx, cu_seqlens=NN_CU)[0].float(), targets[0])
    torch.testing.assert_close(model.loss(idx, targets, cu_seqlens=NN_CU), want)


def test_nn_refuses_bad_packed_batches():
    from patterncc.nn import SparseSelfAttention, SparseTransformer

    model = SparseTransformer(31, 16, 1, 2, "causal", max_len=8, backend="reference")
    model(torch.zeros(1, 12, dtype=torch.long), cu_seqlens=[0, 6, 12])  # longer than max_len, each sequence not
    with pytest.raises(ValueError, match=r"packed sequence 1 has 9 tokens, more than the model's max_len=8"):
        model(torch.zeros(1, 12, dtype=torch.long), cu_seqlens=[0, 3, 12])
    with pytest.raises(ValueError, match="the batch must be 1"):
        model(torch.zeros(2, 6, dtype=torch.long), cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="cu_seqlens and a KV cache cannot be combined"):
        model(torch.zeros(1, 6, dtype=torch.long), model.new_cache(1), cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at the packed length 6"):
        SparseSelfAttention(16, 2, "causal", backend="reference")(torch.zeros(1, 6, 16), cu_seqlens=[0, 5])
