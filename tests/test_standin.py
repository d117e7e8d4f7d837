"""The stand-in kernels (backends/triton/standin.py): any pattern's cells read
from a bitmap, exact against the float64 contract, and the choice a first
call makes between them and the pattern's own kernels."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patterncc import ir
from patterncc.masks import dense_mask
from patterncc.orders import SlotOrder

from kernel_env import interpreter_and_cache  # noqa: F401 (autouse: the interpreter and a private cache)

import patterncc as pcc  # noqa: E402
from patterncc.attention import Attention  # noqa: E402
from patterncc.backends.triton import TritonAttention, standin  # noqa: E402
from patterncc.backends.triton.launch import triton_cdiv  # noqa: E402
from patterncc.backends.triton.runtime import load_bitmap_kernels  # noqa: E402
from patterncc.blocklayout.builder import build as build_layout  # noqa: E402
from patterncc.testing import strategies  # noqa: E402
from stdlib_ir import fixed, sliding_window, strided  # noqa: E402
from test_scores_triton import DEVICE, check  # noqa: E402

C = ir.Causal()


def picture(pattern, n: int, heads: int, block: int) -> np.ndarray:
    """bool [heads, n, n]: the stand-in kernels' predicate, element by element."""
    run = standin.StandIns(pattern, block, load_bitmap_kernels).run(n, heads, heads, 16, torch.float16,
                                                                    torch.device(DEVICE))
    out = torch.zeros((heads, n, n), dtype=torch.int8, device=DEVICE)
    grid = (triton_cdiv(n, 16), triton_cdiv(n, 16), heads)
    run.module.pattern_mask_picture[grid](out, run.tables.random, n, BLOCK_M=16, BLOCK_N=16)
    return out.cpu().numpy().astype(bool)


# ----------------------------------------------------------------------------
# The bitmap is the pattern
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("source, n, heads, block", [
    ("strided(16)", 77, 1, 16),                     # PARTIAL blocks everywhere, a ragged last block
    ("fixed(16, 4)", 100, 2, 32),
    ("cycle(strided(8), local(5))", 70, 4, 16),     # per-head codes
    ("heads { 0..1 => causal, 1..2 => local(3) }", 40, 2, 16),
    ("causal & random(2, 16, 3)", 90, 1, 16),
    ("local(isqrt(n))", 50, 1, 16),                 # an argument bound per length
    ("causal", 1, 1, 16),
    ("none", 20, 1, 16),                            # no block at all
    ("all", 33, 1, 16),                             # FULL blocks only
])
def test_the_bitmap_predicate_is_the_pattern(source, n, heads, block):
    pattern = pcc.parse(source)
    assert (picture(pattern, n, heads, block) == dense_mask(pattern, n, heads)).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.patterns(heads=2, max_depth=2, max_leaves=4), st.integers(1, 70))
def test_the_bitmap_of_any_pattern(pattern, n):
    assert (picture(pattern, n, 2, 16) == dense_mask(pattern, n, 2)).all()


def test_heads_with_one_pattern_share_their_words():
    pattern = ir.Cycle((strided(8), sliding_window(4)))
    lay = build_layout(pattern, 64, 16, 4)
    shared = standin.bitmap_host(lay)
    one_head = standin.bitmap_host(build_layout(strided(8), 64, 16, 1))
    words = lambda bitmap: bitmap.size - bitmap[3] - 16 * 16 // 32  # noqa: E731  (less the padding block)
    assert words(shared) == words(one_head) + words(standin.bitmap_host(build_layout(sliding_window(4), 64, 16, 1)))


def test_the_limit_counts_the_cells_evaluated(monkeypatch):
    lay = build_layout(ir.Cycle((strided(8), sliding_window(4))), 64, 16, 4)
    distinct = sum(build_layout(p, 64, 16, 1).n_partial for p in (strided(8), sliding_window(4))) * 16 * 16
    assert distinct < lay.n_partial * 16 * 16  # four heads, two patterns
    monkeypatch.setattr(standin, "MAX_BITMAP_CELLS", distinct)
    assert standin.bitmap_host(lay) is not None
    monkeypatch.setattr(standin, "MAX_BITMAP_CELLS", distinct - 1)
    assert standin.bitmap_host(lay) is None


def test_a_bitmap_over_the_limits_is_none(monkeypatch):
    lay = build_layout(strided(16), 256, 16, 1)
    assert standin.bitmap_host(lay) is not None
    monkeypatch.setattr(standin, "MAX_BITMAP_CELLS", lay.n_partial * 16 * 16 - 1)
    assert standin.bitmap_host(lay) is None
    monkeypatch.undo()
    monkeypatch.setattr(standin, "MAX_BITMAP_CODES", 16 * 16 - 1)
    assert standin.bitmap_host(lay) is None


# ----------------------------------------------------------------------------
# The stand-in kernels against the float64 contract (PATTERNCC_STANDIN=always)
# ----------------------------------------------------------------------------


class Spy:
    """Counts the calls that ran on the stand-in kernels."""

    def __init__(self, monkeypatch):
        self.runs = []
        self.ran = []  # the launch lists run
        original = standin.always

        def spying(launches, standins, q, k):
            got = original(launches, standins, q, k)
            self.runs.append(got is not launches)
            self.ran.append(got)
            assert standin.is_standin(got) is (got is not launches) and not standin.is_standin(launches)
            return got

        monkeypatch.setattr(standin, "always", spying)
        monkeypatch.setenv("PATTERNCC_STANDIN", "always")


ALL_TERMS = {"softcap": None, "alibi_slopes": None, "sinks": None, "rel_bias": 3}


@pytest.mark.parametrize("name, pattern, kw", [
    ("strided", strided(8), dict(n=37)),
    ("fixed_gqa", fixed(16, 4), dict(n=45, H=4, Hkv=2, terms={})),
    ("cycle", ir.Cycle((strided(8), sliding_window(5))), dict(n=40, H=2, terms={"softcap": None})),
    ("empty_rows", C - ir.Block(4), dict(n=21, terms={"alibi_slopes": None, "rel_bias": 2})),
    ("length_1", C, dict(n=1)),
    ("length_block", sliding_window(8), dict(n=32, terms={"sinks": None})),
])
def test_the_standin_is_exact(name, pattern, kw, monkeypatch):
    spy = Spy(monkeypatch)
    check(TritonAttention(pattern, block=16), pattern, **{"terms": ALL_TERMS, **kw})
    assert spy.runs == [True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_standin_in_16_bits(dtype, monkeypatch):
    spy = Spy(monkeypatch)
    check(TritonAttention(strided(8), block=16), strided(8), n=40, dtype=dtype, terms={"softcap": None})
    assert spy.runs == [True]


def test_a_planned_pattern_runs_the_standin_in_natural_order(monkeypatch):
    spy = Spy(monkeypatch)
    attn = Attention(strided(8), backend="triton", plan="planned", block=16).impl("triton")
    assert attn.plan(48, 2).strategy == "planned"
    check(attn, strided(8), n=48, terms={"softcap": None, "sinks": None})
    (ran,) = spy.ran
    assert spy.runs == [True] and len(ran) == 1 and ran[0][1] == SlotOrder()


@pytest.mark.parametrize("source, n, H, Hkv, terms, dtype", [
    ("strided(8)", 45, 2, 2, {"softcap": None, "sinks": None}, torch.float32),  # residue order, padding slots
    ("fixed(8, 2)", 48, 4, 2, {"alibi_slopes": None, "rel_bias": 2}, torch.float32),  # gathered columns, GQA
    ("strided(8)", 64, 2, 2, {}, torch.bfloat16),  # a multiple of the block
    ("cycle(strided(8), fixed(8, 2))", 48, 2, 1, {"sinks": None}, torch.float32),  # both orders, per head, MQA
])
def test_a_plan_over_the_natural_limits_runs_a_standin_per_component(source, n, H, Hkv, terms, dtype, monkeypatch):
    spy = Spy(monkeypatch)
    pattern = pcc.parse(source)
    attn = Attention(pattern, backend="triton", plan="planned", block=16).impl("triton")
    plan = attn.plan(n, H)
    assert plan.strategy == "planned" and any(c.reordered for c in plan.components)
    monkeypatch.setattr(attn._standins, "launches", lambda q, k: None)  # the natural bitmap over its limits
    check(attn, pattern, n=n, H=H, Hkv=Hkv, terms=terms, dtype=dtype)
    assert spy.runs == [True]
    (ran,) = spy.ran
    assert standin.is_standin(ran) and len(ran) == len(plan.components)
    assert [order for _, order in ran] == [SlotOrder.of(c.q_order, c.k_order, n) for c in plan.components]


def test_the_standin_walks_full_steps_one_by_one():
    """Whatever the layout, the stand-in's tables list FULL steps one by one, never as runs: each of
    its kernels then has one specialization for every pattern, to compile or to warm ahead."""
    attn = TritonAttention(C, block=16)
    own = attn.launcher(256, 2, 2, 16, torch.float32, "cpu")
    assert (own.tables.fwd_walk, own.tables.dq_walk, own.tables.dkdv_walk) == ("runs",) * 3  # the pattern's own
    q = torch.zeros(1, 2, 256, 16)
    ((run, _),) = attn._standins.launches(q, q)
    assert (run.tables.fwd_walk, run.tables.dq_walk, run.tables.dkdv_walk) == ("steps",) * 3


def test_warming_runs_the_standin_of_every_kind_of_call_asked_for(monkeypatch):
    """``warmup.warm`` (``patterncc warmup``) runs one stand-in forward and backward per head dim,
    dtype, score term, KV head count and kind of pattern, through the stand-in's launches alone;
    terms and head counts it cannot take are refused by name."""
    ran = []
    original = standin.StandIns.launches

    def spying(self, q, k):
        got = original(self, q, k)
        ran.append((q.shape[-1], q.dtype, q.shape[1], k.shape[1], standin.is_standin(got)))
        return got

    monkeypatch.setattr(standin.StandIns, "launches", spying)
    from patterncc.backends.triton import warmup

    done = warmup.warm(head_dims=(16,), dtypes=("float32",), terms=("sinks",), heads=2, kv_heads=(2, 1),
                        device="cpu")
    assert len(done) == len(warmup.WARM_PATTERNS) * 2 and all("D=16 float32" in line for line in done)
    assert {(D, H, Hkv) for D, _, H, Hkv, _ in ran} == {(16, 2, 2), (16, 2, 1)} and all(s for *_, s in ran)
    with pytest.raises(ValueError, match="unknown score term 'bias'"):
        warmup.warm(terms=("bias",), device="cpu")
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=16"):
        warmup.warm(kv_heads=(3,), device="cpu")


def test_over_the_limits_everywhere_no_standin(monkeypatch):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(standin, "MAX_BITMAP_CODES", 0)
    attn = Attention(strided(8), backend="triton", plan="planned", block=16).impl("triton")
    check(attn, strided(8), n=48, terms={})
    assert spy.runs == [False]  # the pattern's own kernels


def test_with_a_config_of_the_callers_no_standin(monkeypatch):
    from test_scores_triton import TILES16

    spy = Spy(monkeypatch)
    check(TritonAttention(C, config=TILES16), C, n=20, terms={})
    check(Attention(strided(8), backend="triton", plan="planned", config=TILES16).impl("triton"), strided(8), n=40,
          terms={})
    assert spy.runs == []


def test_deterministic_algorithms_run_the_own_kernels_only(monkeypatch):
    monkeypatch.delenv("PATTERNCC_STANDIN", raising=False)
    assert standin.mode() == "auto"
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert standin.mode() == "0"
    finally:
        torch.use_deterministic_algorithms(saved)
    monkeypatch.setenv("PATTERNCC_STANDIN", "0")
    assert standin.mode() == "0"


# ----------------------------------------------------------------------------
# Which kernels a first call runs
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FakeRun:
    """What compile_key reads of a run."""

    name: str
    module: object = None
    config: object = None
    head_dim: int = 64
    dtype: object = torch.bfloat16
    H: int = 4
    Hkv: int = 4
    n: int = 64
    tables: object = None

    def __post_init__(self):
        walks = SimpleNamespace(layout_heads=1, fwd_walk="steps", dq_walk="steps", dkdv_walk="steps")
        object.__setattr__(self, "module", SimpleNamespace(__name__=self.name))
        object.__setattr__(self, "tables", walks)


ORDER = SimpleNamespace(q=0, k=0)


class Compiles:
    """A stand-in for compile_ahead: each launch list's compile takes the
    seconds ``delays`` gives its first run (none: it fails) and marks its runs ready."""

    def __init__(self, delays: dict):
        self.delays = delays
        self.ready: set = set()
        self.calls: list = []

    def __call__(self, launches, *args, strict=False):
        run = launches[0][0]
        self.calls.append(run)
        if self.delays[run] is not None:
            time.sleep(self.delays[run])
            self.ready.update(r for r, _ in launches)

    def is_ready(self, run) -> bool:
        return run in self.ready


class FakeStandIns:
    def __init__(self, run):
        self.made = 0
        self._run = run

    def launches(self, q, k):
        self.made += 1
        return None if self._run is None else [(self._run, SlotOrder())]


def choose(launches, standins, compiles):
    q = torch.zeros(1, 4, 64, 64)
    return standin.while_compiling(launches, standins, q, q, q, 1.0, None, compile=compiles,
                                   ready=compiles.is_ready)


def wait_until_idle():
    deadline = time.time() + 10
    while standin.pending() and time.time() < deadline:
        time.sleep(0.01)
    assert not standin.pending()


def test_ready_kernels_run_at_once():
    own, sub = FakeRun("ready"), FakeRun("sub")
    compiles = Compiles({own: 0.0, sub: 0.0})
    compiles.ready.add(own)
    standins = FakeStandIns(sub)
    assert choose([(own, ORDER)], standins, compiles) == [(own, ORDER)]
    assert standins.made == 0 and compiles.calls == []


def test_a_new_pattern_runs_the_standin_until_its_own_kernels_are_ready():
    own, sub = FakeRun("new"), FakeRun("sub")
    compiles = Compiles({own: 0.5, sub: 0.0})
    standins = FakeStandIns(sub)
    launches = [(own, ORDER)]
    started = time.perf_counter()
    assert choose(launches, standins, compiles) == [(sub, SlotOrder())]
    assert choose(launches, standins, compiles) == [(sub, SlotOrder())]  # still compiling: no second compile
    assert time.perf_counter() - started < 0.3 and standin.pending()
    standin.settle(launches)  # waits for the compile in flight
    assert compiles.is_ready(own)
    assert choose(launches, standins, compiles) == launches
    assert compiles.calls == [sub, own]
    wait_until_idle()


def test_kernels_compiled_before_run_without_a_standin():
    own, sub = FakeRun("seen"), FakeRun("sub")
    compiles = Compiles({own: 0.0, sub: 0.0})
    choose([(own, ORDER)], FakeStandIns(sub), compiles)
    wait_until_idle()
    again = FakeRun("seen")  # a new process: the same kernels, nothing ready in memory
    compiles = Compiles({again: 0.0, sub: 0.0})
    standins = FakeStandIns(sub)
    assert choose([(again, ORDER)], standins, compiles) == [(again, ORDER)]
    assert standins.made == 0 and compiles.calls == []
    other = FakeRun("seen", dtype=torch.float16)  # another dtype compiles other kernels
    compiles = Compiles({other: 0.0, sub: 0.0})
    assert choose([(other, ORDER)], FakeStandIns(sub), compiles) == [(sub, SlotOrder())]
    wait_until_idle()


def test_launch_lists_of_the_same_kernels_compile_them_once():
    a, b, sub = FakeRun("twice"), FakeRun("twice"), FakeRun("sub")  # two layers of one pattern, say
    compiles = Compiles({a: 0.3, b: 0.3, sub: 0.0})
    assert choose([(a, ORDER)], FakeStandIns(sub), compiles)[0][0] is sub
    assert choose([(b, ORDER)], FakeStandIns(sub), compiles)[0][0] is sub
    wait_until_idle()
    assert compiles.calls.count(a) + compiles.calls.count(b) == 1


def test_no_standin_within_the_limits_runs_the_own_kernels():
    own = FakeRun("big")
    compiles = Compiles({own: 0.0})
    assert choose([(own, ORDER)], FakeStandIns(None), compiles) == [(own, ORDER)]
    assert compiles.calls == [] and not standin.pending()  # they compile as they launch, as without this


def test_a_standin_that_fails_to_compile_runs_the_own_kernels():
    own, sub = FakeRun("own"), FakeRun("broken")
    compiles = Compiles({own: 0.0, sub: None})
    assert choose([(own, ORDER)], FakeStandIns(sub), compiles) == [(own, ORDER)]
    assert not standin.pending()


def test_a_standin_that_raises_is_not_tried_again(recwarn):
    own, sub = FakeRun("own kernels"), FakeRun("raising stand-in")
    calls = []

    def compile(launches, *args, strict=False):
        calls.append((launches[0][0], strict))
        if launches[0][0] is sub:
            raise RuntimeError("the compiler failed")

    q = torch.zeros(1, 4, 64, 64)
    for _ in range(2):
        got = standin.while_compiling([(own, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compile,
                                      ready=lambda run: False)
        assert got == [(own, ORDER)]
    assert calls == [(sub, True)] and not standin.pending()  # tried once, strictly: compiling ahead stays on
    assert any("stand-in kernels failed" in str(w.message) for w in recwarn.list)


def test_a_compile_that_raises_is_not_tried_again(recwarn):
    own, sub = FakeRun("raises"), FakeRun("sub")
    calls = []

    def compile(launches, *args, strict=False):
        calls.append(launches[0][0])
        if launches[0][0] is own:
            raise RuntimeError("no more compiles")
        ready.add(sub)

    ready = set()
    q = torch.zeros(1, 4, 64, 64)
    for _ in range(3):
        got = standin.while_compiling([(own, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compile,
                                      ready=ready.__contains__)
        assert got == [(sub, SlotOrder())]
        wait_until_idle()
    assert calls == [sub, own]
    assert any("own kernels failed" in str(w.message) for w in recwarn.list)


class _Backward(torch.autograd.Function):
    """A backward that reports itself as the attention's does, and records
    which compiles had started while it ran."""

    @staticmethod
    def forward(ctx, x, seen):
        ctx.seen = seen
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        standin.backward_ran()
        time.sleep(0.2)  # the rest of the backward pass: a held compile must not start in it
        ctx.seen.append(list(ctx.seen[0]))
        return grad, None


def test_a_compile_is_held_until_the_calls_backward_is_over():
    own, sub = FakeRun("held"), FakeRun("sub")
    compiles = Compiles({own: 0.0, sub: 0.0})
    q = torch.zeros(1, 4, 64, 64, requires_grad=True)
    got = standin.while_compiling([(own, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                                  ready=compiles.is_ready)
    assert got == [(sub, SlotOrder())]
    time.sleep(0.2)
    assert compiles.calls == [sub] and standin.pending()  # held: no backward yet
    seen = [compiles.calls]
    _Backward.apply(q, seen).sum().backward()
    assert seen[1] == [sub]  # still held while the backward pass ran
    over = time.perf_counter()
    wait_until_idle()
    assert time.perf_counter() - over < standin.HOLD_SECONDS / 2  # released by the pass's end, not the timeout
    assert compiles.calls == [sub, own] and compiles.is_ready(own)


def test_a_held_compile_starts_without_a_backward(monkeypatch):
    monkeypatch.setattr(standin, "HOLD_SECONDS", 0.2)
    own, sub = FakeRun("never backward"), FakeRun("sub")
    compiles = Compiles({own: 0.0, sub: 0.0})
    q = torch.zeros(1, 4, 64, 64, requires_grad=True)
    standin.while_compiling([(own, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                            ready=compiles.is_ready)
    wait_until_idle()
    assert compiles.calls == [sub, own]


def test_settle_starts_a_held_compile_and_waits_for_it():
    own, sub = FakeRun("settled"), FakeRun("sub")
    compiles = Compiles({own: 0.1, sub: 0.0})
    q = torch.zeros(1, 4, 64, 64, requires_grad=True)
    launches = [(own, ORDER)]
    standin.while_compiling(launches, FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                            ready=compiles.is_ready)
    started = time.perf_counter()
    standin.settle(launches)  # a CUDA graph's capture, say: the own kernels must be there
    assert compiles.is_ready(own) and time.perf_counter() - started < standin.HOLD_SECONDS
    wait_until_idle()


def test_waiting_for_kernels_starts_the_held_compiles_and_waits_for_all():
    """What a benchmark calls after a first call: every own compile in flight is over when it returns,
    a held one included, so that the calls it then times run the pattern's own kernels."""
    held, free, sub = FakeRun("held for a backward"), FakeRun("compiling"), FakeRun("sub")
    compiles = Compiles({held: 0.1, free: 0.3, sub: 0.0})
    q = torch.zeros(1, 4, 64, 64, requires_grad=True)
    standin.while_compiling([(held, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                            ready=compiles.is_ready)
    with torch.no_grad():
        standin.while_compiling([(free, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                                ready=compiles.is_ready)
    assert standin.pending() and not compiles.is_ready(held)
    started = time.perf_counter()
    pcc.wait_for_kernels()
    assert compiles.is_ready(held) and compiles.is_ready(free) and not standin.pending()
    assert time.perf_counter() - started < standin.HOLD_SECONDS  # the hold was released, not waited out
    assert choose([(held, ORDER)], FakeStandIns(sub), compiles) == [(held, ORDER)]
    pcc.wait_for_kernels()  # nothing in flight: returns at once


def test_without_gradients_the_compile_starts_at_once():
    own, sub = FakeRun("no grad"), FakeRun("sub")
    compiles = Compiles({own: 0.3, sub: 0.0})
    q = torch.zeros(1, 4, 64, 64, requires_grad=True)
    with torch.no_grad():
        standin.while_compiling([(own, ORDER)], FakeStandIns(sub), q, q, q, 1.0, None, compile=compiles,
                                ready=compiles.is_ready)
    time.sleep(0.1)
    assert compiles.calls == [sub, own]  # started, still compiling
    standin.backward_ran()  # outside a backward pass: releases at once, nothing held here
    wait_until_idle()


def test_a_term_that_wants_a_gradient_holds_the_compile():
    from patterncc.scores import ScoreTerms

    q = torch.zeros(1, 4, 64, 64)
    sinks = torch.zeros(4, requires_grad=True)
    assert not standin._backward_follows(q, q, q, None)
    assert standin._backward_follows(q, q, q, ScoreTerms(sinks=sinks))
    with torch.no_grad():
        assert not standin._backward_follows(q, q, q, ScoreTerms(sinks=sinks))


def test_the_key_reads_the_score_terms():
    from patterncc.scores import ScoreTerms

    launches = [(FakeRun("terms"), ORDER)]
    slopes = torch.ones(4)
    keys = {standin.compile_key(launches, terms) for terms in (
        None, ScoreTerms(softcap=5.0), ScoreTerms(alibi_slopes=slopes),
        ScoreTerms(alibi_slopes=slopes.clone().requires_grad_()))}
    assert len(keys) == 4


# ----------------------------------------------------------------------------
# On the card: a new pattern's first call on the stand-in, then its own kernels
# ----------------------------------------------------------------------------

_ON_THE_CARD = """
import json, sys, time
import torch
import patterncc as pcc
from patterncc.backends.triton import runtime, standin

chosen = []  # which kernels each forward ran (not compile_ahead's warm-up on meta tensors)
original = runtime.launches_forward
def spying(launches, q, *args, **kwargs):
    if q.device.type != "meta":
        chosen.append("standin" if standin.is_standin(launches) else "own")
    return original(launches, q, *args, **kwargs)
runtime.launches_forward = spying

torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
attn = pcc.compile(sys.argv[1])

def step():
    o = attn(q, k, v)
    o.float().square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return [o.detach(), *grads]

first = step()
standin.settle(attn.impl("triton").launches_for(q, k))
deadline = time.time() + 120
while standin.pending() and time.time() < deadline:
    time.sleep(0.05)
second = step()
errors = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)).item()
          for a, b in zip(first, second)]
print("RESULT " + json.dumps(dict(chosen=chosen, errors=errors)))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiling ahead is CUDA's")
def test_on_the_card_a_new_pattern_starts_on_the_standin(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PATTERNCC_CACHE_DIR=str(tmp_path / "pcc"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)

    def first_calls(source: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", _ON_THE_CARD, source], env=env, capture_output=True,
                              text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        return json.loads(lines[0][len("RESULT "):])

    first_calls("strided(128)")  # fills the caches: the stand-in's kernels among them
    new = first_calls("fixed(128, 32)")  # a new pattern: its own kernels are not in any cache
    assert new["chosen"][0] == "standin" and new["chosen"][-1] == "own", new
    assert max(new["errors"]) < 2e-2, new  # bf16: o and the gradients of two kernel sets, relative to their size
    warm = first_calls("fixed(128, 32)")  # a new process, the pattern seen before
    assert set(warm["chosen"]) == {"own"}, warm
