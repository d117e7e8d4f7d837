"""The Triton backend against the float64 reference, and its parts one by one.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (scripts/test.sh
sets it; run alone, this file sets it while its tests run, before triton is
imported): small shapes (n <= 64, D 16/32), layout block 16 with
every tile 16, and one layout of block 32 walked in 16-wide steps. With CUDA
(``bench/gpu_check.sh``), the same tests use the default H100 configuration
and longer sequences.

Tolerances (absolute, on values of order 1; inputs are standard normal):
float32 uses exact fp32 products (``input_precision="ieee"``), so 2e-5 for
o and lse and 1e-4 for gradients. float16 and bfloat16 round P, dS and the
inputs of every product to 16 bits (the reference sees the same rounded
inputs), so 4e-3 / 3e-2 (fp16) and 3e-2 / 1.5e-1 (bf16) for o / gradients;
lse is fp32 in every dtype.

Regenerate the golden sources with ``PATTERNCC_UPDATE_GOLDEN=1 pytest tests/test_triton.py``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import stat
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from patterncc import ir
from patterncc.masks import dense_mask
from patterncc.errors import PatternError
from patterncc.blocklayout import build as build_layout

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# Large shapes and the default H100 configuration: on a GPU, or forced (slow) under the interpreter.
LARGE = os.environ.get("PATTERNCC_TEST_LARGE", "1" if GPU else "0") == "1"
GOLDEN = Path(__file__).parent / "golden" / "triton"


from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)


from patterncc.backends.reference import ReferenceAttention  # noqa: E402
from patterncc.backends.triton import KernelConfig, TritonAttention, cache, codegen, tables  # noqa: E402
from patterncc.backends.triton.config import default_config  # noqa: E402
from stdlib_ir import fixed, local_global, sliding_window, strided  # noqa: E402

# -- shapes: interpreter-sized on the CPU, real on the GPU

if LARGE:
    U = 64  # the unit pattern parameters scale with
    N_RAGGED, N_EVEN, D_SMALL, D_LARGE = 1000, 1024, 64, 128
    CONFIG = None  # the default H100 table (block 64)
    SUBTILED = KernelConfig(block=128, block_m=64, block_n=32, block_m1=32, block_n1=64,
                            block_m2=64, block_n2=32, fwd_warps=4, bwd_warps=4)
    MERGED = KernelConfig(block=16)  # the D <= 64 tiles over a fine layout
else:
    U = 8
    N_RAGGED, N_EVEN, D_SMALL, D_LARGE = 37, 48, 16, 32
    CONFIG = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16,
                          block_m2=16, block_n2=16)
    SUBTILED = KernelConfig(block=32, block_m=16, block_n=16, block_m1=16, block_n1=16,
                            block_m2=16, block_n2=16)
    MERGED = KernelConfig(block=16, block_m=32, block_n=16, block_m1=16, block_n1=32,
                          block_m2=32, block_n2=16)

TOL = {  # dtype -> (o, lse, gradients), absolute
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (4e-3, 2e-3, 3e-2),
    torch.bfloat16: (3e-2, 1e-2, 1.5e-1),
}

C = ir.Causal()


def V(name):
    return ir.Var(name)


def K_(value):
    return ir.Const(value)


STANDARD = {
    "causal": C,
    "all": ir.All(),
    "strided": strided(U),
    "fixed": fixed(2 * U, U // 2),
    "sliding_window": sliding_window(U),
    "local_global": local_global(U, U // 2),
    "longformer": ir.Local(U) | ir.Global(3),
    "bigbird": ir.Local(U // 2) | ir.Global(3) | ir.Random(2, 2 * U, 7),
    "bigbird_small_b": ir.Local(U // 2) | ir.Random(3, U // 2 + 1, 11),
    "axial": C & (ir.Block(U) | ir.Stride(U)),
    "dilated": C & ir.Dilated(3, 4),
    # the previous U keys only (row 0 sees nothing); a look-ahead window; one offset past the diagonal
    "band_previous": ir.Band(1, U + 1),
    "band_ahead": ir.Band(-U, 1) | ir.Sink(2),
    "band_offset": ir.Band(-2 * U - 3, -U + 2) | (C & ir.Band(3, 2 * U)),
    "sink": C & (ir.Local(U) | ir.Sink(5)),
    "difference": C - ir.Stride(3),
    "complement": ~ir.Local(U // 2),
    # floor semantics on negative operands: (q - k) // 3 and (k - q) % 5
    "where_floor": ir.Where(ir.BoolOp("or", (
        ir.Compare("==", ir.BinOp("//", ir.BinOp("-", V("q"), V("k")), K_(3)), K_(-1)),
        ir.Compare("==", ir.BinOp("%", ir.BinOp("-", V("k"), V("q")), K_(5)), K_(2))))),
    # the runtime length: the last 10 keys, or a band
    "where_n": C & ir.Where(ir.BoolOp("or", (
        ir.Compare(">=", V("k"), ir.BinOp("-", V("n"), K_(10))),
        ir.Compare("<", ir.BinOp("-", V("q"), V("k")), K_(4))))),
    # q * k leaves int32 for long sequences: computed in int64
    "where_int64": ir.Where(ir.BoolOp("or", (
        ir.Compare("==", ir.BinOp("%", ir.BinOp("*", V("q"), V("k")), K_(7)), K_(3)),
        ir.Compare("==", V("k"), V("q"))))),
    # an argument that depends on n: bound per length
    "symbolic": C & ir.Local(ir.BinOp("+", ir.BinOp("//", V("n"), K_(4)), K_(1))),
}

HEAD_DEPENDENT = {
    "cycle": ir.Cycle((C, sliding_window(U // 2), ir.Local(3) | ir.Sink(2))),
    "heads": ir.Heads((ir.HeadRange(0, 1, C), ir.HeadRange(1, 3, strided(U // 2)), ir.HeadRange(3, 4, ir.All()))),
    "where_h": ir.Where(ir.BoolOp("or", (
        ir.Compare("==", ir.BinOp("%", ir.BinOp("+", V("q"), V("h")), K_(3)), K_(0)),
        ir.Compare("==", V("k"), V("q"))))),
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def make_inputs(B, H, Hkv, n, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=g) for shape in
                   ((B, H, n, D), (B, Hkv, n, D), (B, Hkv, n, D), (B, H, n, D)))
    return [x.to(device=DEVICE, dtype=dtype) for x in (q, k, v, do)]


def check_against_reference(pattern, *, B=1, H=2, Hkv=None, n=N_RAGGED, D=D_SMALL, dtype=torch.float32,
                            scale=None, config=CONFIG, seed=0, lse_grad=False, inputs=None):
    """Forward (o, lse) and backward (dq, dk, dv) against the float64 reference."""
    Hkv = Hkv or H
    q, k, v, do = inputs or make_inputs(B, H, Hkv, n, D, dtype, seed)
    attn = TritonAttention(pattern, config=config)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = attn(q, k, v, scale=scale, return_lse=True)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    loss = (o.float() * do.float()).sum() + (lse.masked_fill(lse.isinf(), 0).sum() if lse_grad else 0)
    loss.backward()

    ref = ReferenceAttention(pattern)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    o64, lse64 = ref(q64, k64, v64, scale=scale, return_lse=True)
    ref_loss = (o64 * do.cpu().double()).sum() + (lse64.masked_fill(lse64.isinf(), 0).sum() if lse_grad else 0)
    ref_loss.backward()

    tol_o, tol_lse, tol_grad = TOL[dtype]
    _close("o", o, o64, tol_o)
    _close("lse", lse, lse64, tol_lse)
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        _close(name, got, want, tol_grad)
    return o, lse, (q.grad, k.grad, v.grad)


def _close(name, got, want, atol):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{name} has NaN"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{name}: -inf in the wrong places"
    if inf.any():
        assert torch.equal(got[inf], want[inf])
    err = (got[~inf] - want[~inf]).abs()
    bound = atol * (1 + want[~inf].abs())
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1, f"{name}: max abs error {err.max().item():.3g} is {worst:.2f}x the tolerance {atol}"


# ----------------------------------------------------------------------------
# Attention against the reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_standard_patterns(name):
    check_against_reference(STANDARD[name])


@pytest.mark.parametrize("name", sorted(HEAD_DEPENDENT))
def test_head_dependent_patterns_in_one_launch(name):
    check_against_reference(HEAD_DEPENDENT[name], H=4, Hkv=2)


@pytest.mark.parametrize("n", [1, 2, N_EVEN, N_EVEN + 1])
def test_lengths(n):
    check_against_reference(local_global(U, 3), n=n)


def test_layout_block_larger_than_the_tiles():
    """block 32 (128 on the GPU) walked in smaller steps, with a ragged end."""
    check_against_reference(strided(U), config=SUBTILED, n=N_RAGGED + 30)


def test_layout_block_smaller_than_the_tiles():
    """Tiles and steps that merge several layout blocks."""
    check_against_reference(fixed(2 * U, U // 2), config=MERGED, n=N_RAGGED + 30)


# The 16-bit rows of the default table, long and short walk (config.py):
# the tiles real runs use, against the reference on a ragged length.
TABLE_ROWS = [(D, walk) for D in (64, 128) for walk in (None, 0.0)]


@pytest.mark.parametrize("n", [300 if LARGE else 150, 1], ids=["ragged", "n1"])
@pytest.mark.parametrize("D, walk", TABLE_ROWS, ids=[f"D{D}-{'short' if w is not None else 'long'}"
                                                    for D, w in TABLE_ROWS])
def test_default_table_rows(D, walk, n):
    """Several query and key tiles of every row, the last one ragged; and one token."""
    config = default_config(D, torch.float16, walk=walk)
    check_against_reference(sliding_window(U) | ir.Global(3), D=D, dtype=torch.float16, config=config, n=n, H=1)


def test_tiles_follow_the_layouts_walk():
    """A short mean walk (banded layouts) takes the short-walk row, a long one
    (causal over many blocks) the long row; float32 and D = 256 have one row."""
    from patterncc.backends.triton.config import SHORT_WALK

    band = TritonAttention(sliding_window(256))
    causal = TritonAttention(C)
    n = 16384
    band_layout, causal_layout = band.layout(n, 1, 64), causal.layout(n, 1, 64)
    assert band_layout.mean_walk < SHORT_WALK <= causal_layout.mean_walk
    for D in (64, 128):
        assert band.config_for(D, torch.bfloat16, band_layout) == default_config(D, torch.bfloat16, walk=0.0)
        assert causal.config_for(D, torch.bfloat16, causal_layout) == default_config(D, torch.bfloat16)
        assert default_config(D, torch.bfloat16, walk=0.0) != default_config(D, torch.bfloat16)
    for D, dtype in ((256, torch.bfloat16), (64, torch.float32), (128, torch.float32)):
        assert default_config(D, dtype, walk=0.0) == default_config(D, dtype)
    given = KernelConfig(block=64)
    assert TritonAttention(C, config=given).config_for(64, torch.bfloat16, band_layout) is given


@pytest.mark.parametrize("pattern", [C, sliding_window(100), ir.Local(3) | ir.Global(2), ir.Block(64) - ir.All()],
                         ids=["causal", "band", "local_global", "empty"])
def test_mean_walk_counts_keys_per_nonempty_row(pattern):
    lay = build_layout(pattern, 1000, 64, 1)
    dense = lay.to_dense()[0]
    rows = (dense > 0).any(axis=1)
    want = (dense > 0).sum() * 64 / max(1, rows.sum())
    assert lay.mean_walk == pytest.approx(want)


@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention(Hkv):
    check_against_reference(sliding_window(U), B=2, H=4, Hkv=Hkv)
    check_against_reference(HEAD_DEPENDENT["cycle"], H=4, Hkv=Hkv, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype):
    check_against_reference(strided(U), dtype=dtype, D=D_LARGE)


def test_bfloat16_is_right_in_a_process_nobody_patched(monkeypatch):
    """The interpreter's own bf16 tl.dot multiplies bit patterns (o ~ 1e9): the
    runtime must fix it before it launches, not only the tests' setup: a
    process that never imports the tests (the demo) gets right bf16 results
    through ``pcc.compile`` too."""
    from triton.runtime import interpreter

    from patterncc.backends.triton import _interpret

    if _interpret._original is not None:  # undo the patch an earlier test's launch applied: a fresh process
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _interpret._original)
        monkeypatch.setattr(_interpret, "_original", None)
    check_against_reference(C & ir.Local(7), dtype=torch.bfloat16, D=D_LARGE, seed=3)


@pytest.mark.parametrize("D", [8, 20] if not LARGE else [40, 80, 256])
def test_head_dims_padded(D):
    check_against_reference(sliding_window(U), D=D)


def test_scale_and_lse_gradient():
    check_against_reference(fixed(2 * U, 3), scale=0.3, lse_grad=True)


def test_delta_pass_only_where_needed(monkeypatch):
    """One launch writes delta in its dQ programs (no pass of its own over O
    and dO); an lse gradient (delta - dlse) takes the separate pass. Both
    against the reference."""
    from patterncc.backends.triton import runtime

    passes = []
    real = runtime._Run.delta
    monkeypatch.setattr(runtime._Run, "delta", lambda self, *args: passes.append(1) or real(self, *args))
    check_against_reference(fixed(2 * U, 3), H=3, Hkv=1, seed=4)
    assert passes == []
    check_against_reference(fixed(2 * U, 3), scale=0.3, lse_grad=True)
    assert passes == [1]


def test_backward_row_addressing_both_ways(monkeypatch):
    """The backward kernels address a step's rows by int32 offsets where
    every row offset fits (ADDR32, what every test shape takes) and by the
    64-bit offset tile otherwise: both against the reference, natural and
    strided inputs, GQA; and the host's bound at the int32 edge."""
    from patterncc.backends.triton import runtime

    seen = []
    real = runtime._Run._rows_fit_int32
    monkeypatch.setattr(runtime._Run, "_rows_fit_int32", lambda self, *xs: seen.append(real(self, *xs)) or False)
    check_against_reference(sliding_window(U) | ir.Global(3), H=4, Hkv=2, seed=5)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, N_RAGGED, 2, D_SMALL, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    check_against_reference(fixed(2 * U, 3), inputs=[q, k, v, torch.randn(1, 2, N_RAGGED, D_SMALL).to(DEVICE)])
    assert seen and all(seen)  # these shapes would have taken int32 offsets

    class Rows:  # the stride and shape of a tensor too large to make here
        def __init__(self, row_stride, d):
            self.shape, self._stride = (1, 1, 0, d), (0, 0, row_stride, 1)

        def stride(self, i):
            return self._stride[i]

    run = TritonAttention(C).prepare(N_RAGGED, 1, 1, 128, torch.float32, DEVICE)
    slots = N_RAGGED + max(run.config.block_m1, run.config.block_n2)  # the last step padded to a whole tile
    edge = (2**31 - 1 - 128) // slots  # the largest row stride whose offsets fit
    assert real(run, Rows(edge, 128)) and not real(run, Rows(edge + 1, 128))
    assert not real(run, Rows(128, 128), Rows(edge + 1, 128))  # every walked tensor must fit


@pytest.mark.parametrize("scale", [-0.4, 0.0])
def test_negative_and_zero_scale(scale):
    """The forward kernel moves the scale's sign into q (its FULL steps fold
    the scale into exp2's argument, after the max: that needs a multiplier
    >= 0); a zero scale is uniform attention over the allowed keys."""
    check_against_reference(sliding_window(U) | ir.Global(3), scale=scale, lse_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-40, -2.2e-313])
def test_scale_below_float32s_normal_range(scale, dtype):
    """A scale below float32's smallest normal number is uniform attention,
    as the float64 reference has it (once, under the interpreter, bfloat16
    gave zeros for it)."""
    check_against_reference(sliding_window(U) | ir.Global(3), scale=scale, dtype=dtype)


def test_rows_without_keys_give_zero_and_minus_inf():
    """~causal leaves the last row empty; `none` empties every row."""
    for pattern in (~C, ir.Empty()):
        o, lse, grads = check_against_reference(pattern, lse_grad=True)
        empty = torch.isinf(lse)
        assert empty[..., -1].all()
        assert (o[empty] == 0).all()
        assert (lse[empty] == float("-inf")).all()
        for g in grads:
            assert torch.isfinite(g).all()
    _, _, (dq, dk, dv) = check_against_reference(ir.Empty())
    assert not dq.any() and not dk.any() and not dv.any()


@pytest.mark.parametrize("plan", ["natural", "planned"])
def test_a_batch_of_no_rows_is_an_empty_result(plan):
    """B = 0 (a data-parallel shard or a filtered batch with nothing in it): the empty outputs of their
    shapes and dtypes, as on the reference backend, eager and through the op (torch.compile), with
    short queries, GQA and a padded head dim; zero gradients of every input's shape, the score terms'
    included (no output depends on anything). An empty dimension other than the batch is refused."""
    import patterncc as pcc

    attn = pcc.compile("strided(8) with softcap(5), alibi", backend="triton", plan=plan, block=16)
    traced = torch.compile(lambda *a, **kw: attn(*a, return_lse=True, **kw), fullgraph=True, backend="aot_eager")
    for n_q, D, dtype in ((40, 16, torch.float32), (3, 20, torch.bfloat16)):
        q = torch.randn(0, 4, n_q, D, device=DEVICE, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(0, 2, 40, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
        terms = dict(sinks=torch.randn(4, device=DEVICE, requires_grad=True),
                     rel_bias=torch.randn(4, 5, device=DEVICE, requires_grad=True))
        for call in (lambda *a, **kw: attn(*a, return_lse=True, **kw), traced):
            o, lse = call(q, k, v, **terms)
            assert o.shape == q.shape and o.dtype == dtype and lse.shape == (0, 4, n_q)
            assert lse.dtype == torch.float32
            leaves = (q, k, v, *terms.values())
            for leaf, g in zip(leaves, torch.autograd.grad(o.sum() + lse.sum(), leaves)):
                assert g.shape == leaf.shape and g.dtype == leaf.dtype and not g.any()
    with pytest.raises(ValueError, match="but the batch must be >= 1"):
        attn(*(torch.randn(1, 4, 40, 0, device=DEVICE) for _ in range(3)))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_under_autocast_inputs_take_its_dtype(backend):
    """Under torch.autocast attention runs in its dtype, as SDPA does: float32 and mixed inputs give the
    16-bit call's output (bf16 here), eager and compiled (no graph break), with gradients back in the
    inputs' own dtypes; float64 stays float64, as autocast leaves it; outside autocast nothing changes."""
    import patterncc as pcc

    attn = pcc.compile("strided(8) with softcap(5)", backend=backend, block=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    sinks = torch.randn(2, generator=g).to(DEVICE).requires_grad_()
    kind = torch.device(DEVICE).type

    def call(q, k, v, sinks):
        with torch.autocast(kind, dtype=torch.bfloat16):
            return attn(q, k, v, sinks=sinks)

    want = attn(*(x.detach().bfloat16() for x in (q, k, v)), sinks=sinks.detach())
    for run in (call, torch.compile(call, fullgraph=True, backend="aot_eager")):
        for mixed in (False, True):
            o = run(q, k.bfloat16() if mixed else k, v, sinks)
            assert o.dtype == torch.bfloat16 and torch.equal(o, want)
            grads = torch.autograd.grad(o.float().sum(), (q, k, v, sinks))
            assert all(x.dtype == torch.float32 and x.abs().sum() > 0 for x in grads)
    assert torch._dynamo.explain(call)(q, k, v, sinks).graph_break_count == 0
    if backend == "reference":
        with torch.autocast(kind, dtype=torch.bfloat16):
            assert attn(q.double(), k.double(), v.double()).dtype == torch.float64
    assert attn(q, k, v).dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_differentiating_a_gradient_again_is_an_error(backend):
    """A gradient penalty (create_graph=True, then a loss on the gradient) needs second derivatives,
    which the kernels do not have: its backward raises, for plain, packed and short-query calls. It
    never leaves the penalty's share out of the gradients silently."""
    import patterncc as pcc

    attn = pcc.compile("strided(8)", backend=backend, block=16)
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)
    for o in (attn(q, k, v), attn(q, k, v, cu_seqlens=cu), attn(q[:, :, -3:], k, v)):
        (dq,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            (o.sum() + dq.pow(2).sum()).backward()


def test_strided_inputs():
    """[B, n, H, D] memory viewed as [B, H, n, D] goes in without a copy; a
    transposed last dimension is copied."""
    B, H, n, D = 1, 2, N_RAGGED, D_SMALL
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    do = torch.randn(B, H, n, D, generator=g).to(DEVICE)
    assert not q.is_contiguous()
    check_against_reference(sliding_window(U), inputs=[q, k, v, do])
    q2 = torch.randn(B, H, D, n, generator=g).to(DEVICE).transpose(2, 3)
    assert q2.stride(-1) != 1
    check_against_reference(sliding_window(U), inputs=[q2, k, v, do])


def test_return_lse_flag_and_default_scale():
    q, k, v, _ = make_inputs(1, 2, 2, N_RAGGED, D_SMALL, torch.float32)
    attn = TritonAttention(C, config=CONFIG)
    o = attn(q, k, v)
    assert isinstance(o, torch.Tensor)
    o2 = attn(q, k, v, scale=1 / math.sqrt(D_SMALL))
    assert torch.equal(o, o2)


def test_new_length_reuses_the_module_unless_arguments_use_n():
    attn = TritonAttention(sliding_window(U), config=CONFIG)
    cfg = attn.config_for(D_SMALL, torch.float32)
    assert attn.kernels(20, cfg) is attn.kernels(30, cfg)
    sym = TritonAttention(STANDARD["symbolic"], config=CONFIG)
    at20, at30 = sym.kernels(20, cfg), sym.kernels(30, cfg)
    # The bound arguments differ per length; the compiled kernels are shared (codegen: runtime integers).
    assert (at20.PATTERN_ARGS, at30.PATTERN_ARGS) == ((6,), (8,))
    assert at20.attn_fwd is at30.attn_fwd


def test_default_tiles_give_at_most_two_modules_over_lengths():
    """With the default table a length can move the layout's walk across
    SHORT_WALK (causal: short at 1000, long at 9000): one module per tile
    set, shared by every length on the same side."""
    attn = TritonAttention(C)
    configs = {n: attn.config_for(64, torch.bfloat16, attn.layout(n, 1, 64)) for n in (100, 1000, 5000, 9000)}
    assert configs[100] == configs[1000] != configs[5000] == configs[9000]
    assert attn.kernels(100, configs[100]) is attn.kernels(1000, configs[1000])
    assert attn.kernels(5000, configs[5000]) is attn.kernels(9000, configs[9000])


@settings(max_examples=8 if not LARGE else 6, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hypothesis_compositions(data):
    from patterncc.testing import patterns

    H = data.draw(st.sampled_from([1, 2]), label="H")
    pattern = data.draw(patterns(max_depth=2, max_leaves=4, heads=H), label="pattern")
    n = data.draw(st.integers(1, 48 if not LARGE else 600), label="n")
    # the backward walking bands where the tiles are bands, or its step lists
    config = replace(CONFIG or default_config(D_SMALL, torch.float32), bwd_band=data.draw(st.booleans(), label="band"))
    check_against_reference(pattern, H=H, n=n, config=config, seed=data.draw(st.integers(0, 99), label="seed"))


# ----------------------------------------------------------------------------
# The predicate itself, element by element
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STANDARD) + sorted(HEAD_DEPENDENT))
def test_predicate_matches_mask(name):
    pattern = {**STANDARD, **HEAD_DEPENDENT}[name]
    heads = 4 if name in HEAD_DEPENDENT else 1
    n = 61
    got = TritonAttention(pattern, config=CONFIG).mask_picture(n, heads, device=DEVICE)
    np.testing.assert_array_equal(got.cpu().numpy().astype(bool), dense_mask(pattern, n, heads))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_predicate_matches_mask_hypothesis(data):
    from patterncc.testing import patterns

    heads = data.draw(st.sampled_from([1, 3]), label="heads")
    pattern = data.draw(patterns(max_depth=3, max_leaves=6, heads=heads), label="pattern")
    n = data.draw(st.integers(1, 40), label="n")
    got = TritonAttention(pattern, config=CONFIG).mask_picture(n, heads, device=DEVICE)
    np.testing.assert_array_equal(got.cpu().numpy().astype(bool), dense_mask(pattern, n, heads))


@pytest.mark.parametrize("name", sorted(STANDARD) + sorted(HEAD_DEPENDENT))
def test_mask_mod_matches_mask(name):
    from patterncc.backends.triton import flex

    pattern = {**STANDARD, **HEAD_DEPENDENT}[name]
    heads, n = (4 if name in HEAD_DEPENDENT else 1), 45
    np.testing.assert_array_equal(mask_mod_picture(flex.mask_mod(pattern, n), n, heads), dense_mask(pattern, n, heads))


def mask_mod_picture(mod, n: int, heads: int) -> np.ndarray:
    """bool ``[heads, n, n]``: a mask_mod evaluated at every (query, key) pair."""
    pos = torch.arange(n, dtype=torch.int32)
    return np.stack([np.broadcast_to(mod(0, torch.tensor(h), pos[:, None], pos[None, :]).numpy(), (n, n))
                     for h in range(heads)])


@pytest.mark.parametrize("src", ["where k < min(q, 5)", "where k > max(q - 9, 2)", "where min(3, k) == min(q, 3)",
                                 "where k <= max(n // 2, q)"])
def test_mask_mod_min_and_max_with_one_constant(src):
    """min/max of a tensor and a constant in the torch predicate (the mask_mod
    Flex runs): min caps from above. Found by the drawn test below; both
    spellings once had it the other way."""
    from patterncc import pipeline
    from patterncc.backends.triton import flex

    pattern, n = pipeline.parse(src), 23
    np.testing.assert_array_equal(mask_mod_picture(flex.mask_mod(pattern, n), n, 1), dense_mask(pattern, n, 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mask_mod_matches_mask_on_drawn_patterns(data):
    from patterncc.backends.triton import flex
    from patterncc.testing import patterns

    pattern = data.draw(patterns(max_depth=3, max_leaves=5, heads=3), label="pattern")
    n = data.draw(st.integers(1, 60), label="n")
    want = dense_mask(pattern, n, 3)
    np.testing.assert_array_equal(mask_mod_picture(flex.mask_mod(pattern, n), n, 3), np.broadcast_to(want, (3, n, n)))


def test_kernel_key_of_a_cpu_device_on_a_cuda_machine(monkeypatch):
    """``flex.mask_mod`` evaluates on the CPU by default; on a machine with
    CUDA the kernel cache key must not ask CUDA for a CPU device's
    capability (it raises there, and every mask_mod test failed on a CUDA
    machine while no CPU-only run could see it)."""
    from patterncc.backends.triton import runtime

    def capability_of(device):
        if torch.device(device).type != "cuda":
            raise ValueError(f"Expected a cuda device, but got: {device}")
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    assert runtime._capability("cpu") == "none"
    assert runtime._capability(torch.device("cpu")) == "none"
    assert runtime._capability(None) == "sm_90"
    assert runtime._capability("cuda:0") == "sm_90"


def test_int64_decision():
    q, k, n = V("q"), V("k"), V("n")
    assert not codegen._needs_int64(ir.Compare("<", ir.BinOp("-", q, k), K_(5)))
    assert codegen._needs_int64(ir.Compare("<", ir.BinOp("+", q, k), n))
    assert codegen._needs_int64(ir.Compare("<", ir.BinOp("*", q, K_(2)), n))
    source = codegen.generate_source(STANDARD["where_int64"])
    assert "q.to(tl.int64)" in source and "floor_mod" not in source


_LEAVES = st.one_of(st.sampled_from(["q", "k", "n"]).map(V), st.integers(-40, 40).map(K_))


def _exprs():
    return st.recursive(_LEAVES, lambda sub: st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "//", "%"]), sub, sub).map(lambda t: ir.BinOp(t[0], t[1], t[2])),
        st.tuples(st.sampled_from(["min", "max"]), sub, sub).map(lambda t: ir.Call(t[0], (t[1], t[2]))),
    ), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(_exprs(), st.data())
def test_interval_bounds_every_value(e, data):
    """codegen._interval decides int32 vs int64: every value an expression
    takes over the variables' ranges must lie inside it (Python semantics)."""
    lo, hi = codegen._interval(e)
    env = {name: data.draw(st.one_of(st.integers(a, b), st.sampled_from([a, b])), label=name)
           for name, (a, b) in codegen._VAR_RANGES.items()}
    try:
        value = ir.eval_int(e, env)
    except PatternError:  # division by zero: no value
        return
    assert lo <= value <= hi, (ir.expr_source(e), env, value, (lo, hi))


@pytest.mark.parametrize("extra", [ir.Empty(), ir.Sink(64), ir.Global(64)])
def test_residue_predicate_divides_natively_in_int32(extra):
    """The planner's residue predicates divide by max(n // l, 1) and take
    min(t // S, l - 1) as a slot's class: provably in int32, so the kernels
    divide with int32 `//`, not an emulated int64 floor division, also when a
    sink or global part is rewritten over slot positions."""
    from patterncc.planner import build_plan

    plan = build_plan(ir.Causal() & (ir.Local(128) | ir.Stride(128) | extra), 16384, 64, 1, mode="planned")
    (residue,) = [c for c in plan.components if c.q_order.kind == "residue"]
    source = codegen.generate_source(residue.predicate)
    body = source[source.index("def pattern_mask"):source.index("@triton.jit", source.index("def pattern_mask"))]
    assert re.search(r"q // tl.maximum\(\(N // 128\), 1\)", body), body
    assert "int64" not in body and "floor_div" not in body


def test_floor_helpers_only_where_operands_can_be_negative():
    source = codegen.generate_source(STANDARD["where_floor"])
    assert re.search(r"floor_div\(\(q - k\), 3\)", source) and re.search(r"floor_mod\(\(k - q\), 5\)", source)
    plain = codegen.generate_source(C & ir.Where(ir.Compare("==", ir.BinOp("%", V("k"), K_(4)), K_(1))))
    assert "floor_mod" not in plain and "(k % 4)" in plain


# ----------------------------------------------------------------------------
# Code generation: literals, golden files
# ----------------------------------------------------------------------------


def test_only_int_literals_reach_the_source():
    with pytest.raises(AssertionError, match="only int literals"):
        codegen.generate_source(ir.Local(2.5))
    with pytest.raises(AssertionError, match="only int literals"):
        codegen.generate_source(ir.Local(True))
    with pytest.raises(AssertionError, match="unknown variable"):
        codegen.generate_source(ir.Where(ir.Compare("<", V("__import__"), K_(1))))
    with pytest.raises(AssertionError, match="unknown operator"):
        codegen.generate_source(ir.Where(ir.Compare("<", ir.BinOp("**", V("q"), K_(2)), K_(1))))


def test_every_literal_in_the_predicate_is_an_int():
    source = codegen.generate_source(ir.Cycle(tuple(STANDARD.values())), seq_len=40)
    predicate = source.split("def pattern_mask")[1].split("# ----")[0]
    for line in predicate.splitlines()[2:]:
        code = line.split("#")[0]
        for token in re.findall(r"[A-Za-z_][A-Za-z_0-9.]*|\d+\.\d*|\d+|\S", code):
            assert token[0].isdigit() and token.isdigit() or not token[0].isdigit(), f"{token!r} in {line!r}"
        assert "'" not in code and '"' not in code, line


def test_symbolic_arguments_need_a_length():
    with pytest.raises(PatternError, match="depend on n"):
        codegen.generate_source(STANDARD["symbolic"])
    assert codegen.pattern_args(STANDARD["symbolic"], seq_len=40) == (11,)  # n // 4 + 1
    assert codegen.generate_source(STANDARD["symbolic"], seq_len=40) == codegen.generate_source(
        STANDARD["symbolic"], seq_len=400)  # the bound integer is an argument, not a literal


GOLDEN_CASES = {
    "strided_128": strided(128),
    "fixed_128_32": fixed(128, 32),
    "bigbird_heads": ir.Cycle((ir.Local(64) | ir.Global(16) | ir.Random(3, 64, 1), STANDARD["where_floor"])),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_source(name):
    source = codegen.generate_source(GOLDEN_CASES[name], default_config(64, "bfloat16"))
    path = GOLDEN / f"{name}.py.txt"
    if os.environ.get("PATTERNCC_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    assert path.exists(), f"{path} is missing: run with PATTERNCC_UPDATE_GOLDEN=1"
    assert source == path.read_text(), f"generated source changed; PATTERNCC_UPDATE_GOLDEN=1 rewrites {path}"
    compile(source, str(path), "exec")


# ----------------------------------------------------------------------------
# Host tables
# ----------------------------------------------------------------------------


def _expected_steps(lay, tile, step, n):
    """Oracle for tables.kernel_steps, by loops over the dense layout picture:
    int8 [H, tiles, steps] with 0 empty, 1 PARTIAL walk, 2 FULL walk."""
    dense, b = lay.to_dense(), lay.block
    H, nb = dense.shape[0], dense.shape[1]
    out = np.zeros((H, -(-n // tile), -(-n // step)), dtype=np.int8)
    for h in range(H):
        for t in range(out.shape[1]):
            for s in range(out.shape[2]):
                rows = range(t * tile // b, min(-(-(t + 1) * tile // b), nb))
                cols = range(s * step // b, min(-(-(s + 1) * step // b), nb))
                classes = dense[h][np.ix_(list(rows), list(cols))]
                if classes.any():
                    out[h, t, s] = 2 if (classes == 2).all() and (s + 1) * step <= n else 1
    return out


def _walked_steps(lists, H):
    """{(h * n_tiles + tile, step): 2 for a FULL walk, 1 for a PARTIAL one}."""
    walked = {}
    for cls, ptr, steps in ((2, lists.full_ptr, lists.full_steps), (1, lists.part_ptr, lists.part_steps)):
        for row in range(H * lists.n_tiles):
            row_steps = steps[ptr[row]:ptr[row + 1]].tolist()
            assert row_steps == sorted(row_steps)
            for s in row_steps:
                assert (row, s) not in walked, "a step walked twice"
                walked[row, s] = cls
    return walked


def test_resources_report_types_every_pointer_argument():
    """bench/probes.py's resources compiles the kernels from a signature it writes by
    argument name (``_arg_type``): every tensor argument must get a pointer
    type there, or the report's compile fails for that kernel."""
    import inspect

    import bench_probes

    probes = bench_probes.load()

    attn = TritonAttention(C, config=CONFIG)
    module = attn.kernels(64, attn.config_for(64, torch.bfloat16), DEVICE)
    scalars = {"sm_scale", "N", "H", "GROUP", "N_TOK", "ORD_L", "ORD_S", "ORD_C", "LSE_LEN", "softcap", "rel_m", "ALIGN"}
    for kernel in (module.attn_fwd, module.attn_bwd_preprocess, module.attn_bwd_dkdv, module.attn_bwd_dq):
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        for name, param in params.items():
            if "constexpr" in str(param.annotation) or name.startswith("stride") or name in scalars:
                continue
            assert probes._arg_type(name, "bf16").startswith("*"), f"{name} would be typed as a scalar"


def test_lse_and_delta_rows_are_padded_to_a_multiple_of_16():
    """The backward kernels read lse and delta in rows of LSE_LEN, which Triton specializes: the host
    pads rows to a multiple of 16 at every length (so no length compiles a kernel again), copying lse
    only where the forward's rows are not already so."""
    from patterncc.backends.triton.launch import _row_length, aligned_rows, with_aligned_rows

    for n in (1, 15, 16, 17, 70):
        lse = torch.randn(2, 3, n, device=DEVICE)
        got = with_aligned_rows(lse)
        assert torch.equal(got, lse) and got.stride(1) % 16 == 0 and got.stride(1) >= n
        assert (got is lse) == (n % 16 == 0)
        delta = aligned_rows(2, 3, n, DEVICE)
        assert _row_length(got, delta) == -(-n // 16) * 16
    with pytest.raises(AssertionError, match="share rows of one length"):
        _row_length(torch.zeros(2, 3, 17, device=DEVICE), aligned_rows(2, 3, 17, DEVICE))


@pytest.mark.parametrize("n", [64, 70, 1])
@pytest.mark.parametrize("block,tile,step", [(16, 16, 16), (32, 16, 16), (16, 32, 16), (16, 16, 64), (64, 32, 16)])
def test_kernel_steps_match_the_layout(n, block, tile, step):
    """Every non-empty (tile, step) is walked once, FULL only when every block
    under it is FULL and the step lies inside the sequence."""
    pattern, heads = HEAD_DEPENDENT["cycle"], 3
    lay = build_layout(pattern, n, block, heads)
    lists = tables.kernel_steps(lay.kv_ptr, lay.kv_idx, lay.kv_full, n, block, tile, step)
    want = _expected_steps(lay, tile, step, n)
    walked = _walked_steps(lists, lay.heads)
    got = np.zeros_like(want)
    for (row, s), cls in walked.items():
        got[row // lists.n_tiles, row % lists.n_tiles, s] = cls
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(lists.cost, (want > 0).sum(axis=2))
    order = tables.tile_order(lists.cost)
    assert sorted(order[0].tolist()) == list(range(lists.n_tiles))
    assert all(lists.cost[0][order[0][i]] >= lists.cost[0][order[0][i + 1]] for i in range(lists.n_tiles - 1))


@pytest.mark.parametrize("n", [64, 70, 1, 200])
@pytest.mark.parametrize("pattern", ["cycle", "local_sink"])
def test_full_runs_are_the_full_steps(n, pattern, monkeypatch):
    """tables.full_runs: the FULL steps of every tile, as maximal runs of
    consecutive steps; tables.run_table: the same, two per tile."""
    monkeypatch.setattr(tables, "RUN_MIN", 0)  # short runs too: the table is built wherever it can be
    pat = HEAD_DEPENDENT["cycle"] if pattern == "cycle" else C & (ir.Local(40) | ir.Sink(20))
    lay = build_layout(pat, n, 16, 3)
    lists = tables.kernel_steps(lay.kv_ptr, lay.kv_idx, lay.kv_full, n, 16, 16, 16)
    runs = tables.full_runs(lists)
    assert runs.ptr.dtype == runs.bounds.dtype == np.int32 and runs.ptr.size == lists.full_ptr.size
    for row in range(lists.full_ptr.size - 1):
        steps = lists.full_steps[lists.full_ptr[row]:lists.full_ptr[row + 1]].tolist()
        pairs = runs.bounds[2 * runs.ptr[row]:2 * runs.ptr[row + 1]].reshape(-1, 2).tolist()
        assert [s for first, end in pairs for s in range(first, end)] == steps
        assert all(first < end for first, end in pairs)
        assert all(a[1] < b[0] for a, b in zip(pairs, pairs[1:])), "runs that touch were not merged"
    table = tables.run_table(lists)
    if table is None:  # no FULL steps, some tile has more than two runs, or the runs are short
        per_tile = np.diff(runs.ptr)
        assert (runs.count == 0 or per_tile.max() > tables.MAX_RUNS
                or lists.full_steps.size < tables.RUN_MIN * runs.count)
        return
    for row in range(table.shape[0]):
        steps = lists.full_steps[lists.full_ptr[row]:lists.full_ptr[row + 1]].tolist()
        a0, a1, b0, b1 = table[row].tolist()
        assert list(range(a0, a1)) + list(range(b0, b1)) == steps
    assert pattern == "cycle" or n == 1 or (table[:, 3] > table[:, 2]).any(), "no tile with two runs was checked"


@pytest.mark.parametrize("walk", ["runs", "steps"])
def test_kernels_walk_full_runs_and_step_lists(walk, monkeypatch):
    """Both ways of walking FULL steps, forced, against the reference: a band
    and a sink give two runs per tile (a bug in the runs' bounds would skip
    or repeat keys); the tables say which way the kernels went."""
    monkeypatch.setattr(tables, "RUN_MIN", 0 if walk == "runs" else 10**9)
    pattern, n = C & (ir.Local(5 * U) | ir.Sink(5 * U // 2)), 150 if not LARGE else N_RAGGED
    check_against_reference(pattern, n=n, H=2)
    check_against_reference(pattern, n=n, H=4, Hkv=2, dtype=torch.bfloat16, scale=-0.3, lse_grad=True)
    attn = TritonAttention(pattern, config=CONFIG)
    run = attn.prepare(n, 2, 2, D_SMALL, torch.float32, torch.device(DEVICE))
    assert {run.tables.fwd_walk, run.tables.dq_walk, run.tables.dkdv_walk} == {walk}
    if walk == "runs":  # some tile has two runs
        table = run.tables.fwd[1].cpu().numpy().reshape(-1, 2 * tables.MAX_RUNS)
        assert (table[:, 3] > table[:, 2]).any()


@pytest.mark.parametrize("n", [64, 70, 1, 200])
@pytest.mark.parametrize("pattern", ["sliding_window", "causal", "local_sink", "cycle"])
def test_band_table_is_the_steps(n, pattern):
    """tables.band_table: where it is built, each tile's range holds exactly
    its steps, FULL inside and PARTIAL outside; it is None only when some
    tile's steps are not such a band (a sink's columns are not)."""
    pat = {"sliding_window": sliding_window(40), "causal": C, "local_sink": C & (ir.Local(40) | ir.Sink(20)),
           "cycle": HEAD_DEPENDENT["cycle"]}[pattern]
    lay = build_layout(pat, n, 16, 3)
    for tile, step in ((16, 16), (32, 16), (16, 32)):
        lists = tables.kernel_steps(lay.kv_ptr, lay.kv_idx, lay.kv_full, n, 16, tile, step)
        table = tables.band_table(lists)
        rows = range(lists.full_ptr.size - 1)
        full = [lists.full_steps[lists.full_ptr[r]:lists.full_ptr[r + 1]].tolist() for r in rows]
        part = [lists.part_steps[lists.part_ptr[r]:lists.part_ptr[r + 1]].tolist() for r in rows]
        bands = [not f or f == list(range(f[0], f[-1] + 1)) for f in full]
        bands = [b and sorted(f + p) == list(range(min(f + p), max(f + p) + 1)) if f + p else b
                 for b, f, p in zip(bands, full, part)]
        assert (table is not None) == all(bands)
        if table is None:
            assert pattern in ("local_sink", "cycle") and n > 1
            continue
        assert table.dtype == np.int32 and table.shape == (len(full), 4)
        for (lo, f_lo, f_hi, hi), f, p in zip(table.tolist(), full, part):
            assert lo <= f_lo <= f_hi <= hi
            assert list(range(f_lo, f_hi)) == f
            assert list(range(lo, f_lo)) + list(range(f_hi, hi)) == p


@pytest.mark.parametrize("pattern", ["sliding_window", "causal", "local_sink"])
def test_band_walk_matches_the_reference(pattern):
    """The backward kernels walking bands (KernelConfig.bwd_band), against the
    reference at a ragged length, with GQA, bf16 and an lse gradient. A band
    with sink columns far behind it is no band for dQ (its query tiles walk
    the sink, a gap, then the band: lists), one for dK/dV (a sink key's tile
    walks every query after it)."""
    pat = {"sliding_window": sliding_window(3 * U), "causal": C,
           "local_sink": C & (ir.Local(5 * U) | ir.Sink(5 * U // 2))}[pattern]
    n = 150 if pattern == "local_sink" and not LARGE else N_RAGGED
    config = replace(CONFIG or default_config(D_SMALL, torch.float32), bwd_band=True)
    check_against_reference(pat, n=n, H=2, config=config)
    check_against_reference(pat, n=n, H=4, Hkv=2, dtype=torch.bfloat16, config=config, lse_grad=True)
    run = TritonAttention(pat, config=config).prepare(n, 2, 2, D_SMALL, torch.float32, torch.device(DEVICE))
    assert (run.tables.dq_walk == "band", run.tables.dkdv_walk) == (pattern != "local_sink", "band")
    with pytest.MonkeyPatch.context() as mp:  # the 64-bit row addressing too (tensors past 2**31 elements)
        from patterncc.backends.triton import runtime

        mp.setattr(runtime._Run, "_rows_fit_int32", lambda self, *xs: False)
        check_against_reference(pat, n=n, H=2, Hkv=1, config=config, seed=3)
    assert run.tables.fwd_walk != "band"


def test_fine_blocks_skip_empty_steps():
    """fixed(128, 32) at block 64: a 128-query tile walks only the 64-key steps
    that hold summary columns (or its own block), half of what block 128 gives."""
    pattern, n = fixed(128, 32), 4096
    coarse, fine = build_layout(pattern, n, 128), build_layout(pattern, n, 64)
    steps = [tables.kernel_steps(lay.kv_ptr, lay.kv_idx, lay.kv_full, n, lay.block, 128, 64).steps
             for lay in (coarse, fine)]
    assert steps[1] < 0.6 * steps[0]


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------


def test_input_validation_messages():
    attn = TritonAttention(C, config=CONFIG)
    q, k, v, _ = make_inputs(1, 4, 2, 20, D_SMALL, torch.float32)
    cases = [
        ((q[0], k, v), ValueError, "q must be 4-D"),
        ((q, k.double(), v), TypeError, "k has dtype torch.float64"),
        ((q.half(), k, v), TypeError, "k has dtype torch.float32 but q has torch.float16"),
        ((q, k, v[:, :, :10]), ValueError, "v must have k's shape"),
        ((q, k[:, :, :10], v[:, :, :10]), ValueError, "sequence length"),
        ((q[:, :3], k, v), ValueError, "H=3 must be a multiple"),
        ((q, "k", v), TypeError, "k must be a torch.Tensor"),
        ((q.int(), k, v), TypeError, "q has dtype torch.int32"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            attn(*args)
    with pytest.raises(TypeError, match="scale must be a real number"):
        attn(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite"):
        attn(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"scale=-1e\+300 is outside float32's range"):
        attn(q, k, v, scale=-1e300)
    big = torch.zeros(1, 1, 2, 300, device=DEVICE)
    with pytest.raises(ValueError, match="D=300"):
        attn(big, big, big)
    with pytest.raises(ValueError, match="block=32 disagrees with config.block=16"):
        TritonAttention(C, block=32, config=KernelConfig(block=16))
    with pytest.raises(ValueError, match="block must be a power of two"):
        TritonAttention(C, block=48)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got block_n=8"):
        KernelConfig(block_n=8)
    with pytest.raises(TypeError, match="pattern must be"):
        TritonAttention("causal")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TritonAttention(C, config=CONFIG)(q, k, v)


def test_heads_must_cover_the_heads():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 16, torch.float32)
    with pytest.raises(PatternError, match="heads"):
        TritonAttention(HEAD_DEPENDENT["heads"], config=CONFIG)(q, k, v)


# ----------------------------------------------------------------------------
# The kernel cache on disk
# ----------------------------------------------------------------------------


def _cached_files():
    return sorted(cache.cache_dir().glob("k_*.py"))


def test_cache_rebuilds_corrupt_and_truncated_entries():
    pattern = C & ir.Local(5) & ir.Sink(13)  # used by no other test
    attn = TritonAttention(pattern, config=CONFIG)
    expected = dense_mask(pattern, 20)[0]
    attn.mask_picture(20, device=DEVICE)
    path = Path(attn.kernels(20, attn.config_for(64, torch.float16), DEVICE).__file__)  # mask_picture's module
    good = path.read_text()
    for damage in (good[: len(good) // 2],                      # truncated
                   good.replace("m0 = k <= q", "m0 = k < q"),  # edited: checksum mismatch
                   "garbage that is not python (\n"):
        path.write_text(damage)
        cache.clear_memory()  # and a new TritonAttention: nothing in memory, the file is read again
        got = TritonAttention(pattern, config=CONFIG).mask_picture(20, device=DEVICE)
        np.testing.assert_array_equal(got[0].cpu().numpy().astype(bool), expected)
        assert path.read_text() == good


def test_cache_falls_back_when_the_directory_is_read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(ro))
    monkeypatch.setattr(cache, "_fallback_dir", None)
    if os.access(ro, os.W_OK):  # root ignores permissions: make the probe fail instead
        real = cache.tempfile.NamedTemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == ro:
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(cache.tempfile, "NamedTemporaryFile", refuse)
    cache.clear_memory()
    with pytest.warns(RuntimeWarning, match="not writable"):
        got = TritonAttention(C & ir.Local(7), config=CONFIG).mask_picture(12, device=DEVICE)
    np.testing.assert_array_equal(got[0].cpu().numpy().astype(bool), dense_mask(C & ir.Local(7), 12)[0])
    assert not list(ro.iterdir())
    assert cache._fallback_dir is not None and list(cache._fallback_dir.glob("k_*.py"))
    monkeypatch.setattr(cache, "_fallback_dir", None)


def test_triton_key_is_remembered_and_renewed(tmp_path, monkeypatch):
    """remember_triton_key hands Triton the hash its own function computes,
    from a file on a warm start; a corrupt file, or any change to Triton's
    files (here: a new size reported by stat), computes it afresh."""
    import triton.runtime.cache as triton_cache

    monkeypatch.setattr(triton_cache, "triton_key", triton_cache.triton_key)  # restored after the test
    real = getattr(triton_cache.triton_key, "patterncc_real", triton_cache.triton_key)  # a kernel ran before
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "_fallback_dir", None)
    calls = []

    def counted():
        calls.append(1)
        return real()

    counted.cache_clear = real.cache_clear  # looks like the lru_cache'd function
    want = real()

    def remember():
        monkeypatch.setattr(cache, "_triton_key_done", False)
        triton_cache.triton_key = counted
        cache.remember_triton_key()
        assert triton_cache.triton_key() == want

    remember()  # cold: computed and written
    (memo,) = tmp_path.glob("triton_key_*.txt")
    remember()  # warm: read back
    assert len(calls) == 1
    memo.write_text(memo.read_text()[:-5])  # corrupt: recomputed and rewritten
    remember()
    assert len(calls) == 2 and memo.read_text().endswith(want)
    real_stat = os.stat
    with monkeypatch.context() as m:  # Triton's files "changed" (another size): a new memo file
        m.setattr(cache.os, "stat", lambda p, *a, **k: os.stat_result((*real_stat(p, *a, **k)[:6], 7, 8, 9, 10)))
        remember()
    assert len(calls) == 3 and len(list(tmp_path.glob("triton_key_*.txt"))) == 2
    monkeypatch.setenv("PATTERNCC_TRITON_KEY_MEMO", "0")
    remember()  # off: Triton's own function stays
    assert len(calls) == 4


def _compile_in_child(cache_dir: str, queue) -> None:
    os.environ["PATTERNCC_CACHE_DIR"] = cache_dir
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pattern = C & (ir.Local(9) | ir.Stride(4))
        config = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
        got = TritonAttention(pattern, config=config).mask_picture(30)
        ok = bool((got[0].cpu().numpy().astype(bool) == dense_mask(pattern, 30)[0]).all())
        queue.put("ok" if ok else "wrong mask")
    except Exception as err:  # reported to the parent
        queue.put(f"{type(err).__name__}: {err}")


def test_concurrent_compiles_share_one_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_compile_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for c in children:
        c.start()
    results = [queue.get(timeout=300) for _ in children]
    for c in children:
        c.join(timeout=60)
    assert results == ["ok"] * 3, results
    entries = list(tmp_path.glob("k_*.py"))
    assert len(entries) == 1
    assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------
# FlexAttention interop
# ----------------------------------------------------------------------------


def test_flex_block_mask_has_the_layout_sparsity():
    from patterncc.backends.triton.flex import to_flex_block_mask

    pattern, n, block, heads = HEAD_DEPENDENT["cycle"], 70, 16, 3
    lay = build_layout(pattern, n, block, heads)
    bm = to_flex_block_mask(lay, device=DEVICE)
    dense = lay.to_dense()
    assert bm.BLOCK_SIZE == (block, block)
    np.testing.assert_array_equal(bm.to_dense()[0].cpu().numpy(), (dense > 0).astype(np.int32))
    full = torch.zeros(heads, dense.shape[1], dense.shape[2] + 1, dtype=torch.int32)
    for h in range(heads):
        for i in range(dense.shape[1]):
            count = int(bm.full_kv_num_blocks[0, h, i])
            full[h, i, bm.full_kv_indices[0, h, i, :count].long().cpu()] = 1
    np.testing.assert_array_equal(full[:, :, :-1].numpy(), (dense == 2).astype(np.int32))


def test_flex_attention_with_the_block_mask_matches_the_reference():
    from torch.nn.attention.flex_attention import flex_attention

    from patterncc.backends.triton.flex import to_flex_block_mask

    pattern, n, heads = HEAD_DEPENDENT["cycle"], 45, 3
    lay = build_layout(pattern, n, 16, heads)
    bm = to_flex_block_mask(lay, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = flex_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), block_mask=bm)
    except Exception as err:  # only this interop check depends on flex running here
        pytest.skip(f"flex_attention does not run eagerly on {DEVICE} in torch {torch.__version__}: {err}")
    want = ReferenceAttention(pattern)(q, k, v)
    torch.testing.assert_close(o.cpu(), want, atol=1e-10, rtol=1e-10)
