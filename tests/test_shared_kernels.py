"""Patterns that differ only in their integers can share one kernel module.

By default the integers are literals, except where they are written with
``n`` (so every length shares one module). With ``PATTERNCC_SHARED_INTS=1``
``strided(128)`` and ``strided(256)`` generate the same source (the
integers are runtime arguments read from ``RANDOM``: codegen.py), so they
load one module, compile its kernels once, and keep one file in the disk
cache; each pattern's own integers travel in its ``PATTERN_ARGS`` and its
device buffer. Checked here: the same text and the same compiled objects,
one cache file, and results still exact for each pattern with the two used
in turn in one process (the float64 reference; the Triton tests'
tolerances: fp32 2e-5 for o and lse, 1e-4 for gradients), the generated
predicate and the FlexAttention mask_mod element by element included.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` at small shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_env import interpreter_and_cache  # noqa: F401 (autouse: the interpreter and a private cache)

import patterncc as pcc  # noqa: E402
from patterncc.backends.triton import KernelConfig, TritonAttention, cache, codegen, flex  # noqa: E402
from patterncc.masks import dense_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILES16 = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)

# Pairs that differ only in integers, as users write them.
PAIRS = {
    "strided": ("strided(128)", "strided(256)"),
    "sliding_window": ("sliding_window(1024)", "sliding_window(4096)"),
    "fixed": ("fixed(128, 32)", "fixed(192, 48)"),
    "dilated_sink": ("causal & (dilated(4, 3) | sink(2))", "causal & (dilated(8, 2) | sink(5))"),
}


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setenv("PATTERNCC_SHARED_INTS", "1")


def test_literal_integers_by_default():
    """Literals fold into the code (a division by a literal is a multiply
    and a shift), so each pattern has its own source."""
    a, b = (codegen.generate_source(pcc.parse(text)) for text in PAIRS["strided"])
    assert a != b and "% 128 == 0" in a and "% 256 == 0" in b
    assert codegen.pattern_args(pcc.parse("strided(128)")) == ()


def test_integers_written_with_n_are_shared_by_default():
    """Every length of ``local(isqrt(n))`` binds another integer and
    generates one source: a new length compiles nothing."""
    p = pcc.parse("causal & (local(isqrt(n)) | stride(isqrt(n)))")
    assert codegen.shares_ints(p) and not codegen.shares_ints(pcc.parse("strided(128)"))
    assert codegen.generate_source(p, seq_len=1000) == codegen.generate_source(p, seq_len=5000)
    assert codegen.pattern_args(p, seq_len=1000) == (31, 31)
    assert codegen.pattern_args(p, seq_len=5000) == (70, 70)


@pytest.mark.usefixtures("shared")
@pytest.mark.parametrize("name", list(PAIRS))
def test_patterns_that_differ_in_integers_generate_one_source(name):
    a, b = (pcc.parse(text) for text in PAIRS[name])
    assert codegen.generate_source(a) == codegen.generate_source(b)
    assert codegen.pattern_args(a) != codegen.pattern_args(b)


@pytest.mark.usefixtures("shared")
@pytest.mark.parametrize("name", ["strided", "fixed"])
def test_planned_components_share_too(name):
    """The planner's components (a band, a residue-order or gathered-column
    part written as ``where`` predicates with the pattern's constants) each
    generate one text for both patterns of a pair."""
    a, b = (pcc.plan(text, 4096, heads=16) for text in PAIRS[name])
    assert len(a.components) == len(b.components) >= 2
    for ca, cb in zip(a.components, b.components):
        assert codegen.generate_source(ca.predicate) == codegen.generate_source(cb.predicate)


@pytest.mark.usefixtures("shared")
def test_the_integers_are_not_in_the_text():
    source = codegen.generate_source(pcc.parse("strided(123)"))
    assert "123" not in source
    assert codegen.pattern_args(pcc.parse("strided(123)")) == (123, 123)  # local's, then stride's


def test_literal_integers_on_request(monkeypatch):
    """Even where they are written with ``n``."""
    monkeypatch.setenv("PATTERNCC_LITERAL_INTS", "1")
    p = pcc.parse("local(isqrt(n))")
    assert codegen.generate_source(p, seq_len=1000) != codegen.generate_source(p, seq_len=5000)
    assert codegen.pattern_args(p, seq_len=1000) == ()


@pytest.mark.usefixtures("shared")
def test_integers_beyond_int32_stay_literals():
    """The int32 buffer cannot hold them; the text can (they make int64
    code). The language caps numbers at int32, but a bound ``n`` expression
    (``local(n * n)``) can leave it."""
    p = pcc.ir.Causal() & pcc.ir.Local(3_000_000_000)
    assert "3000000000" in codegen.generate_source(p) and codegen.pattern_args(p) == ()


@pytest.mark.usefixtures("shared")
def test_one_module_one_file_and_exact_results_for_both(tmp_path, monkeypatch):
    """Two patterns that differ in integers, used in turn (forward and
    backward): one loaded module, one disk cache file, each exact."""
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    cache.clear_memory()
    sources = ("causal & (local(5) | stride(5))", "causal & (local(8) | stride(3))")
    attns = [TritonAttention(pcc.parse(text), config=TILES16) for text in sources]
    refs = [pcc.compile(text, backend="reference") for text in sources]
    n, D = 45, 16
    modules = [attn.kernels(n, attn.config_for(D, torch.float32)) for attn in attns]
    assert modules[0].attn_fwd is modules[1].attn_fwd and modules[0].__file__ == modules[1].__file__
    assert [m.PATTERN_ARGS for m in modules] == [(5, 5), (8, 3)]
    assert len(list(tmp_path.glob("k_*.py"))) == 1
    g = torch.Generator().manual_seed(0)
    for turn in (0, 1, 0, 1):  # interleaved: neither pattern's integers may leak into the other's calls
        q, k, v = (torch.randn(2, 2, n, D, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
        o, lse = attns[turn](q, k, v, return_lse=True)
        (o.square().sum() + lse.sum()).backward()
        got = [o, lse, q.grad, k.grad, v.grad]
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        o64, lse64 = refs[turn](q64, k64, v64, return_lse=True)
        (o64.square().sum() + lse64.sum()).backward()
        want = [o64, lse64, q64.grad, k64.grad, v64.grad]
        for i, (x, w) in enumerate(zip(got, want)):
            tol = 2e-5 if i < 2 else 1e-4
            torch.testing.assert_close(x.detach().double(), w.detach(), atol=tol, rtol=0)
    assert len(list(tmp_path.glob("k_*.py"))) == 1


@pytest.mark.usefixtures("shared")
def test_predicate_and_mask_mod_of_each_pattern(tmp_path, monkeypatch):
    """Element by element, in turn: the generated Triton predicate (through
    the mask picture kernel) and the FlexAttention mask_mod of each pattern
    of a pair that shares one module."""
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path))
    n = 50
    pats = [pcc.parse(text) for text in ("fixed(8, 3)", "fixed(16, 5)", "fixed(8, 3)")]
    for p in pats:
        want = dense_mask(p, n, 1)
        got = TritonAttention(p, config=TILES16).mask_picture(n, 1, device=DEVICE)
        np.testing.assert_array_equal(got.cpu().numpy().astype(bool), want)
        mod = flex.mask_mod(p, n)
        pos = torch.arange(n, dtype=torch.int32)
        np.testing.assert_array_equal(mod(0, torch.tensor(0), pos[:, None], pos[None, :]).numpy(), want[0])
    assert len(list(tmp_path.glob("k_*.py"))) == 2  # two configs: TILES16's and flex's default


# ----------------------------------------------------------------------------
# Compiling a first call's kernels ahead, in parallel
# ----------------------------------------------------------------------------

KERNELS = ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")


class _Recorder:
    """A kernel that records its launches (then runs them) and its warm-ups
    (compiling nothing), each as the kernel's name and what Triton
    specializes on: tensors by dtype, shape and strides, the rest by value."""

    def __init__(self, kernel, name, launched, warmed):
        self.kernel, self.name, self.launched, self.warmed = kernel, name, launched, warmed

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(self._signature(grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch

    def warmup(self, *args, grid, **kwargs):
        self.warmed.append(self._signature(grid, args, kwargs))

    def _signature(self, grid, args, kwargs):
        def sig(x):
            if isinstance(x, torch.Tensor):
                return ("tensor", x.dtype, tuple(x.shape), x.stride())
            return x
        return (self.name, grid, tuple(sig(a) for a in args), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))


@pytest.mark.parametrize("source,plan,terms", [("fixed(8, 2)", "planned", False), ("strided(8)", "natural", True)])
def test_compile_ahead_warms_exactly_what_the_call_launches(source, plan, terms, monkeypatch):
    """What compile_ahead warms up (on meta tensors) is what the first
    forward and backward then launch, kernel by kernel and argument by
    argument (but the data): so on the GPU each kernel compiles once, all
    in parallel before the forward. Run on the CPU by turning it on under
    the interpreter, with recording kernels."""
    from patterncc.backends.triton import runtime

    launched, warmed = [], []
    real_with_args = runtime._with_args

    def recording(module, args):
        view = real_with_args(module, args)
        for name in KERNELS:
            setattr(view, name, _Recorder(getattr(view, name), name, launched, warmed))
        return view

    monkeypatch.setattr(runtime, "_with_args", recording)
    monkeypatch.setattr(runtime, "_compiles_ahead", lambda q: True)
    attn = pcc.compile(source, backend="triton", plan=plan, config=TILES16)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 24, 16, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 1, 24, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    extra = dict(alibi_slopes=torch.rand(2).to(DEVICE).requires_grad_(), sinks=torch.randn(2).to(DEVICE)) if terms else {}
    for step in range(2):
        attn(q, k, v, **extra).square().sum().backward()
        if step == 0:
            assert warmed and sorted(map(repr, warmed)) == sorted(map(repr, launched)), "warmed != launched"
            assert {w[0] for w in warmed} >= {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
            warmed_once = len(warmed)
            launched.clear()
    assert len(warmed) == warmed_once  # a shape seen: nothing warmed again
