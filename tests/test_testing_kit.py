"""Tests of patterncc.testing, the property-testing kit: its strategies draw
valid patterns and inputs, failures shrink, and every assertion catches the
bug it is there to catch."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, find, given, settings, strategies as st

import patterncc.backends.reference as reference
from patterncc import blocklayout as layout, ir, pipeline, testing
from patterncc.blocklayout import EMPTY, FULL, PARTIAL
from patterncc.masks import eval_expr
from patterncc.testing import (
    AttentionCase,
    assert_layout_sound,
    assert_matches_reference,
    attention_inputs,
    block_classes,
    check_pattern,
    make_tensors,
    patterns,
    run_files,
    where_conditions,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaves(p: ir.Pattern) -> int:
    return sum(1 for node in ir.walk(p) if not ir.children(node) and not isinstance(node, ir.Heads))


# -- strategies ---------------------------------------------------------------------


@FAST
@given(patterns(heads=4), st.integers(1, 40))
def test_patterns_are_valid_ir_with_masks(p, n):
    pipeline.validate(p)  # frozen, hashable, flattened chains, bindable arguments
    assert isinstance(str(p), str) and str(p)
    m = pipeline.mask(p, seq_len=n, heads=4)
    assert m.shape == (4, n, n) and m.dtype == bool


@FAST
@given(patterns(max_depth=2, max_leaves=3))
def test_patterns_respect_depth_and_leaves(p):
    assert leaves(p) <= 3
    depth = max(_depth(p), 0)
    assert depth <= 2 + 1  # a leaf below at most max_depth combinators


def _depth(p, d=0):
    kids = ir.children(p)
    return d if not kids else max(_depth(c, d + 1) for c in kids)


@FAST
@given(patterns(causal_only=True, allow_where=False, allow_random=False), st.integers(1, 30))
def test_causal_only_patterns_are_causal_and_leave_out_where_and_random(p, n):
    assert not any(isinstance(node, (ir.Where, ir.Random)) for node in ir.walk(p))
    m = pipeline.mask(p, seq_len=n)
    assert not np.triu(m[0], 1).any()


def test_patterns_cover_every_primitive_and_combinator():
    seen = set()

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(patterns(heads=4))
    def collect(p):
        seen.update(type(node) for node in ir.walk(p))

    collect()
    wanted = set(ir.PRIMITIVES.values()) | {ir.Where, ir.Union, ir.Intersect, ir.Difference,
                                            ir.Complement, ir.Heads, ir.Cycle}
    assert wanted <= seen, f"never drawn: {sorted(c.__name__ for c in wanted - seen)}"


@FAST
@given(where_conditions(), st.integers(1, 24), st.integers(0, 3))
def test_where_conditions_evaluate_without_error(cond, n, h):
    pos = np.arange(n)
    env = {"q": pos[:, None], "k": pos[None, :], "h": np.int64(h), "n": np.int64(n)}
    out = np.asarray(eval_expr(cond, env))
    assert out.dtype == bool
    for node in _expr_walk(cond):
        if isinstance(node, ir.BinOp) and node.op in ("//", "%"):
            assert isinstance(node.right, ir.Const) and node.right.value > 0


def _expr_walk(e):
    yield e
    for child in ir.expr_children(e):
        yield from _expr_walk(child)


@FAST
@given(patterns(heads=4), st.integers(1, 33))
def test_patterns_print_as_source_that_parses_back(p, n):
    back = pipeline.parse(str(p))
    assert np.array_equal(pipeline.mask(back, seq_len=n, heads=4), pipeline.mask(p, seq_len=n, heads=4)), str(p)
    assert pipeline.parse(str(back)) == back  # printing the parsed pattern is a fixed point


@FAST
@given(st.data())
def test_attention_inputs_are_consistent(data):
    case = data.draw(attention_inputs(dtypes=("float32", "float16"), max_seq_len=20, blocks=(8, 16)))
    assert 1 <= case.n <= 20 and case.H % case.Hkv == 0 and case.block in (8, 16)
    assert case.scale is None or case.scale > 0
    q, k, v, do = make_tensors(case)
    assert q.shape == do.shape == (case.B, case.H, case.n, case.D)
    assert k.shape == v.shape == (case.B, case.Hkv, case.n, case.D)
    assert q.dtype == getattr(torch, case.dtype)
    assert all(x.abs().max() > 0 for x in (q, k, v, do))
    assert torch.equal(make_tensors(case)[0], q)  # the seed decides the data


def test_attention_inputs_reach_mqa_odd_lengths_and_length_one():
    seen = {"mqa": False, "gqa": False, "odd": False, "one": False}

    # derandomized: what 200 draws reach must not depend on a run's luck (random seeds missed n = 1 at times)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(attention_inputs(max_seq_len=48, max_heads=4))
    def collect(case):
        seen["mqa"] |= case.Hkv == 1 and case.H > 1
        seen["gqa"] |= 1 < case.Hkv < case.H
        seen["odd"] |= case.n % case.block != 0
        seen["one"] |= case.n == 1

    collect()
    assert all(seen.values()), seen


def test_attention_inputs_follow_a_heads_block():
    pat = ir.Heads((ir.HeadRange(0, 2, ir.Causal()), ir.HeadRange(2, 6, ir.Local(2))))
    case = find(attention_inputs(pat), lambda c: True)
    assert case.H == 6


# -- shrinking ----------------------------------------------------------------------


def test_a_planted_failure_shrinks_to_a_single_primitive():
    def has_stride(p):
        return any(isinstance(node, ir.Stride) for node in ir.walk(p))

    assert find(patterns(), has_stride, settings=settings(max_examples=2000, database=None)) == ir.Stride(1)


def test_a_semantic_failure_shrinks_to_a_small_pattern():
    # "no pattern lets query 1 see key 3 while query 3 cannot see key 1"
    def asymmetric(p):
        m = pipeline.mask(p, seq_len=6)[0]
        return bool(m[1, 3] and not m[3, 1])

    p = find(patterns(), asymmetric, settings=settings(max_examples=3000, database=None))
    assert leaves(p) <= 2, str(p)


# -- assert_layout_sound ------------------------------------------------------------


def test_block_classes_of_causal():
    assert block_classes(ir.Causal(), seq_len=4, block=2).tolist() == [[[PARTIAL, EMPTY], [FULL, PARTIAL]]]
    # the last block is FULL when every element within seq_len is allowed
    assert block_classes(ir.All(), seq_len=3, block=2).tolist() == [[[FULL, FULL], [FULL, FULL]]]


STANDARD = [
    ir.Causal() & (ir.Local(5) | ir.Stride(5)),
    ir.Causal() & (ir.Block(4) | ir.Summary(4, 1)),
    ir.Local(3) | ir.Global(2),
    ir.Local(3) | ir.Global(2) | ir.Random(2, 4, 7),
    ir.Causal() & ir.Dilated(3, 2),
    ir.Cycle((ir.Causal() & ir.Local(4), ir.Causal() & ir.Stride(4))),
]


@pytest.mark.parametrize("pat", STANDARD, ids=str)
def test_assert_layout_sound_passes_on_standard_patterns(pat):
    for seq_len, block in [(1, 8), (17, 8), (33, 16), (40, 3)]:
        assert_layout_sound(pat, seq_len, block, heads=2)


def _corrupt(monkeypatch, change):
    """Monkeypatch layout.build so that ``change(classes)`` edits its result."""
    real = layout.build

    def build(p, seq_len, block, heads=1):
        lay = real(p, seq_len, block, heads)
        classes = lay.to_dense().copy()
        change(classes)
        return layout.from_dense_classes(lay.pattern, seq_len, block, classes)

    monkeypatch.setattr(layout, "build", build)


def _flip_first(classes, old, new):
    idx = tuple(np.argwhere(classes == old)[0])
    classes[idx] = new


def test_assert_layout_sound_catches_a_full_block_marked_empty(monkeypatch):
    _corrupt(monkeypatch, lambda c: _flip_first(c, FULL, EMPTY))
    with pytest.raises(AssertionError) as info:
        assert_layout_sound(ir.Causal(), seq_len=20, block=4)
    msg = str(info.value)
    assert "unsound" in msg and "query block 1" in msg and "layout says EMPTY, the mask says FULL" in msg
    assert "q     4 ####" in msg  # the block's element mask is drawn


def test_assert_layout_sound_catches_a_partial_block_marked_full(monkeypatch):
    _corrupt(monkeypatch, lambda c: _flip_first(c, PARTIAL, FULL))
    with pytest.raises(AssertionError, match="layout says FULL, the mask says PARTIAL"):
        assert_layout_sound(ir.Causal() & ir.Local(3), seq_len=20, block=4)


def test_assert_layout_sound_tells_inexact_from_unsound(monkeypatch):
    _corrupt(monkeypatch, lambda c: _flip_first(c, EMPTY, PARTIAL))
    assert_layout_sound(ir.Causal(), seq_len=20, block=4, exact=False)  # sound: fine
    with pytest.raises(AssertionError, match="sound but not exact"):
        assert_layout_sound(ir.Causal(), seq_len=20, block=4)


def test_assert_layout_sound_catches_inconsistent_csr(monkeypatch):
    real = layout.build

    def build(p, seq_len, block, heads=1):
        lay = real(p, seq_len, block, heads)
        q_full = lay.q_full.copy()
        q_full[0] = not q_full[0]
        return replace(lay, q_full=q_full)

    monkeypatch.setattr(layout, "build", build)
    with pytest.raises(AssertionError, match="by-key-block CSR disagrees"):
        assert_layout_sound(ir.Causal(), seq_len=20, block=4)


# -- assert_matches_reference -------------------------------------------------------

PAT = ir.Causal() & ir.Local(4) | ir.Sink(1)


class Wrapped:
    """The reference backend with a deliberate bug ``edit(q, k, v, o, lse) -> (o, lse)``."""

    def __init__(self, pat, edit=None, drop_key=None):
        self.attn = reference.ReferenceAttention(pat)
        self.edit, self.drop_key = edit, drop_key

    def __call__(self, q, k, v, scale=None, return_lse=False):
        if self.drop_key is not None:  # a kernel that never loads key drop_key
            keep = torch.ones(k.shape[2], dtype=k.dtype)
            keep[self.drop_key] = 0
            k = k * keep[:, None]
            v = v * keep[:, None]
        o, lse = self.attn(q, k, v, scale=scale, return_lse=True)
        if self.edit is not None:
            o, lse = self.edit(o, lse)
        return (o, lse) if return_lse else o


def _inputs(dtype="float32", n=13, H=4, Hkv=2):
    return make_tensors(AttentionCase(B=2, H=H, Hkv=Hkv, n=n, D=8, dtype=dtype, scale=None, seed=3))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_assert_matches_reference_passes_on_the_reference(dtype):
    q, k, v, do = _inputs(dtype)
    errors = assert_matches_reference(reference.ReferenceAttention(PAT), PAT, q, k, v, do=do)
    assert set(errors) == {"o", "lse", "dq", "dk", "dv"}


def test_assert_matches_reference_catches_a_perturbed_output():
    q, k, v, do = _inputs()
    bad = Wrapped(PAT, edit=lambda o, lse: (o + 1e-3 * (o.detach().abs() > 0.5), lse))
    with pytest.raises(AssertionError) as info:
        assert_matches_reference(bad, PAT, q, k, v, do=do)
    msg = str(info.value)
    assert re.search(r"o: \d+ of \d+ values off; max abs error 0\.001", msg)
    assert "worst at o[" in msg and "max rel error" in msg


def test_assert_matches_reference_catches_a_dropped_key():
    q, k, v, do = _inputs()
    with pytest.raises(AssertionError, match=r"(?s)o: .*dk: "):
        assert_matches_reference(Wrapped(PAT, drop_key=5), PAT, q, k, v, do=do)


def test_assert_matches_reference_catches_nan_and_wrong_empty_rows():
    empty_first_rows = ir.Causal() & (ir.Local(2) - ir.Block(3))  # only rows 3 and 6 have a key
    q, k, v, do = _inputs(n=9)

    def nan_lse(o, lse):
        return o, torch.where(torch.isinf(lse), torch.nan, lse)

    with pytest.raises(AssertionError, match="lse has .* NaN"):
        assert_matches_reference(Wrapped(empty_first_rows, edit=nan_lse), empty_first_rows, q, k, v, do=do)

    def finite_lse(o, lse):
        return o, torch.where(torch.isinf(lse), 0.0, lse)

    with pytest.raises(AssertionError, match="-inf exactly on the rows with no allowed key"):
        assert_matches_reference(Wrapped(empty_first_rows, edit=finite_lse), empty_first_rows, q, k, v, do=do)

    def nonzero_o(o, lse):
        return o + torch.isinf(lse)[..., None] * 1e-30, lse

    with pytest.raises(AssertionError, match="expected exactly 0"):
        assert_matches_reference(Wrapped(empty_first_rows, edit=nonzero_o), empty_first_rows, q, k, v, do=do)


def test_dense_attention_agrees_with_the_reference_backend():
    pat = ir.Cycle((ir.Causal() & ir.Local(3), ir.Causal() & ir.Stride(3) - ir.Sink(2)))
    q, k, v, do = _inputs("float64", n=11)
    assert_matches_reference(reference.ReferenceAttention(pat), pat, q, k, v, do=do, against="dense")


# -- check_pattern and run_files ----------------------------------------------------


@pytest.mark.parametrize("pat", STANDARD[:4], ids=str)
def test_check_pattern_passes_standard_patterns(pat):
    report = check_pattern(pat, backends=["reference"], examples=8, seed=1)
    assert report.ok, report
    assert [(r.check, r.backend, r.status) for r in report.results] == [
        ("layout", None, "passed"), ("kernel", "reference", "passed"), ("packed", "reference", "passed")]


class BrokenAfterRow5(reference.ReferenceAttention):
    """A backend whose output is wrong on query rows 6 and beyond."""

    def __call__(self, q, k, v, scale=None, return_lse=False):
        o, lse = super().__call__(q, k, v, scale=scale, return_lse=True)
        if o.shape[2] > 6:
            o = torch.cat([o[:, :, :6], o[:, :, 6:] * 1.01], dim=2)
        return (o, lse) if return_lse else o


def test_check_pattern_shrinks_to_a_minimal_counterexample(monkeypatch):
    monkeypatch.setattr(reference, "ReferenceAttention", BrokenAfterRow5)
    report = check_pattern(ir.Causal(), backends=["reference"], examples=30, seed=0, packed=False)
    assert not report.ok
    (failure,) = report.failures
    cx = failure.counterexample
    assert (failure.check, failure.backend) == ("kernel", "reference")
    assert (cx.case.n, cx.case.B, cx.case.H, cx.case.Hkv) == (7, 1, 1, 1)
    assert cx.pattern == "causal" and "o: " in cx.error
    assert cx.command.startswith("python -c ") and 'reproduce("causal"' in cx.command
    code = shlex.split(cx.command)[2]
    with pytest.raises(AssertionError, match="disagrees with the dense"):
        exec(code, {})  # the command reproduces the failure (under the same monkeypatch)
    assert "minimal counterexample" in str(report) and "reproduce with" in str(report)


def test_check_pattern_reports_a_layout_counterexample(monkeypatch):
    _corrupt(monkeypatch, lambda c: _flip_first(c, FULL, EMPTY) if (c == FULL).any() else None)
    report = check_pattern(ir.Causal(), backends=[], examples=30, seed=0)
    (failure,) = report.failures
    cx = failure.counterexample
    assert failure.check == "layout" and cx.case is None
    assert cx.seq_len == 1  # the smallest length with a FULL block: the single element
    assert 'check="layout"' in cx.command
    with pytest.raises(AssertionError, match="is unsound"):
        exec(shlex.split(cx.command)[2], {})


def test_check_pattern_refuses_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        check_pattern(ir.Causal(), backends=["nonsense"], examples=2, seed=0)
    # A string is one backend's name, not a list of one-letter names.
    report = check_pattern(ir.Causal(), backends="reference", examples=2, seed=0, packed=False)
    assert [(r.check, r.backend, r.status) for r in report.results] == [
        ("layout", None, "passed"), ("kernel", "reference", "passed")]


def test_check_pattern_fails_a_named_backend_that_cannot_run(monkeypatch):
    monkeypatch.setattr(testing.suite, "available_backends", lambda: {"reference": None, "triton": "no device"})
    report = check_pattern(ir.Causal(), backends=["triton"], examples=2, seed=0)
    assert not report.ok and report.results[-1].status == "failed" and "no device" in report.results[-1].reason
    report = check_pattern(ir.Causal(), examples=2, seed=0)  # not asked for by name: skipped, the rest ran
    assert report.ok and report.results[-1].status == "skipped"


def test_a_report_that_checked_nothing_is_not_ok():
    from patterncc.testing import CheckResult, Report

    report = Report("causal", 0, [CheckResult("kernel", "triton", "skipped", reason="no device")])
    assert not report.ok and "nothing was checked" in str(report)




def test_run_files_tests_every_definition_and_passes(tmp_path, capsys):
    f = tmp_path / "two.pat"
    f.write_text("pattern a(w = 3) = causal & local(w)\npattern b(l) = stride(l)\npattern c() = a(2) | sink(1)\n")
    assert run_files([str(f)], examples=4, backends=["reference"]) == 0
    out = capsys.readouterr().out
    assert f"{f}:a" in out and f"{f}:c" in out and f"{f}:b" not in out  # b has no default
    assert "2 of 2 patterns passed" in out


def test_run_files_reports_a_broken_backend_with_a_reproduce_command(tmp_path, capsys, monkeypatch):
    f = tmp_path / "mine.pat"
    f.write_text("pattern mine(w = 4) = causal & local(w)\n")
    monkeypatch.setattr(reference, "ReferenceAttention", BrokenAfterRow5)
    assert run_files([str(f)], examples=20, backends=["reference"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "0 of 1 patterns passed" in out
    command = re.search(r"reproduce with:\n\s+(python -c .*)", out).group(1)
    assert f'reproduce("{f}", entry="mine"' in command
    with pytest.raises(AssertionError):
        exec(shlex.split(command)[2], {})


def test_run_files_reports_pattern_errors_with_their_location(tmp_path, capsys):
    f = tmp_path / "bad.pat"
    f.write_text("pattern p() = causal & summary(8, 9)\n")
    assert run_files([str(f)], examples=2, backends=["reference"]) == 1
    err = capsys.readouterr().err
    assert f"{f}:1:" in err and "^" in err


def test_patterncc_test_command_runs_the_kit(tmp_path):
    f = tmp_path / "missing.pat"
    proc = subprocess.run([sys.executable, "-m", "patterncc", "test", str(f), "--examples", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "missing.pat" in proc.stderr


@pytest.mark.skipif(testing.available_backends()["triton"] is not None,
                    reason=str(testing.available_backends()["triton"]))
def test_check_pattern_runs_the_triton_kernels_when_they_can_run_here():
    report = check_pattern(STANDARD[0], backends=["triton"], examples=5, seed=2)
    assert report.ok, report
    assert ("kernel", "triton", "passed") in [(r.check, r.backend, r.status) for r in report.results]


def test_reproduce_commands_spell_out_ir_that_the_parser_would_simplify(monkeypatch):
    monkeypatch.setattr(reference, "ReferenceAttention", BrokenAfterRow5)
    pat = ir.Intersect((ir.Causal(), ir.All()))  # parses back as plain `causal`
    (failure,) = check_pattern(pat, backends=["reference"], examples=20, seed=0, packed=False).failures
    command = failure.counterexample.command
    assert "from patterncc.ir import *" in command and "Intersect(parts=(Causal(), All()))" in command
    with pytest.raises(AssertionError, match=r"causal & all"):
        exec(shlex.split(command)[2], {})


# -- packed batches -----------------------------------------------------------------


@FAST
@given(st.data())
def test_packed_inputs_are_consistent(data):
    case = data.draw(testing.packed_inputs(max_len=30, max_count=6, max_total=80, blocks=(8, 16)))
    assert case.B == 1 and case.n == sum(case.lengths) >= 1 and case.block in (8, 16)
    assert 1 <= len(case.lengths) <= 6 and all(0 <= n <= 30 for n in case.lengths) and case.n <= 80
    cu = testing.make_cu_seqlens(case)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *np.cumsum(case.lengths).tolist()]
    q, k, v, do = make_tensors(case)
    assert q.shape == do.shape == (1, case.H, case.n, case.D) and k.shape == (1, case.Hkv, case.n, case.D)


def test_packed_lengths_reach_every_boundary_the_kernels_care_about():
    """Counts 1 and 20, lengths 0, 1 and 300, boundaries on a block edge and
    inside a block, several sequences starting in one block."""
    seen = dict.fromkeys(["one seq", "20 seqs", "empty", "length 1", "length 300", "edge", "inside",
                          "shared block"], False)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(testing.packed_lengths(block=16))
    def collect(lengths):
        assert 1 <= len(lengths) <= 20 and all(0 <= n <= 300 for n in lengths) and sum(lengths) >= 1
        cuts = np.cumsum(lengths)[:-1]
        starts = [c for c, n in zip(cuts, lengths[1:]) if n > 0]
        seen["one seq"] |= len(lengths) == 1
        seen["20 seqs"] |= len(lengths) == 20
        seen["empty"] |= 0 in lengths
        seen["length 1"] |= 1 in lengths
        seen["length 300"] |= 300 in lengths
        seen["edge"] |= any(c > 0 and c % 16 == 0 for c in starts)
        seen["inside"] |= any(c % 16 for c in starts)
        seen["shared block"] |= len(starts) > len({c // 16 for c in starts})

    collect()
    assert all(seen.values()), seen


def test_packed_lengths_keep_to_max_total():
    lengths = find(testing.packed_lengths(block=8, max_total=50), lambda ls: len(ls) >= 3 and sum(ls) >= 40)
    assert sum(lengths) <= 50
    with pytest.raises(ValueError, match="block"):
        testing.packed_lengths(block=0)


PACKED_PAT = ir.Causal() & ir.Local(ir.Call("isqrt", (ir.Var("n"),)))  # n differs per sequence


def _packed_case(dtype="float64", lengths=(5, 0, 9, 1, 16, 3)):
    case = AttentionCase(B=1, H=4, Hkv=2, n=sum(lengths), D=8, dtype=dtype, scale=None, seed=5, block=8,
                         lengths=lengths)
    return case, make_tensors(case), testing.make_cu_seqlens(case)


class IgnoresCuSeqlens(reference.ReferenceAttention):
    """A packed call that runs the pattern over the whole row: tokens attend across sequences."""

    def __call__(self, q, k, v, scale=None, return_lse=False, cu_seqlens=None, **terms):
        return super().__call__(q, k, v, scale, return_lse, **terms)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_assert_packed_matches_reference_passes_on_the_reference(dtype):
    case, (q, k, v, do), cu = _packed_case(dtype)
    terms = testing.make_terms(replace(case, sinks=True, rel_bias_distance=3))
    errors = testing.assert_packed_matches_reference(reference.ReferenceAttention(PACKED_PAT), PACKED_PAT, q, k, v,
                                                     cu, do=do, **terms)
    assert set(errors) == {"o", "lse", "dq", "dk", "dv", "d_sinks", "d_rel_bias"}


def test_assert_packed_matches_reference_catches_attention_across_sequences():
    case, (q, k, v, do), cu = _packed_case()
    with pytest.raises(AssertionError, match=r"(?s)on a packed batch disagrees.*lengths \[5, 0, 9, 1, 16, 3\].*o: "):
        testing.assert_packed_matches_reference(IgnoresCuSeqlens(ir.Causal()), ir.Causal(), q, k, v, cu, do=do,
                                                against="dense")


def test_assert_packed_matches_reference_catches_a_wrong_term_gradient():
    case, (q, k, v, do), cu = _packed_case()
    sinks = testing.make_terms(replace(case, sinks=True))["sinks"]

    class HalfSinkGrad(reference.ReferenceAttention):
        def __call__(self, q, k, v, scale=None, return_lse=False, *, sinks=None, **kw):
            half = sinks / 2 + (sinks / 2).detach()  # the value of sinks, half its gradient
            return super().__call__(q, k, v, scale, return_lse, sinks=half, **kw)

    with pytest.raises(AssertionError, match="d_sinks: "):
        testing.assert_packed_matches_reference(HalfSinkGrad(PACKED_PAT), PACKED_PAT, q, k, v, cu, do=do,
                                                sinks=sinks)


def test_check_pattern_shrinks_a_packed_failure_and_reproduces_it(monkeypatch):
    monkeypatch.setattr(reference, "ReferenceAttention", IgnoresCuSeqlens)
    small = dict(dtypes=("float64",), max_len=40, max_count=6, max_total=120, blocks=(8, 16), head_dims=(8,))
    monkeypatch.setattr(testing.suite, "_packed_shapes", lambda backend: small)  # shrinking reruns many examples
    report = check_pattern(ir.Causal(), backends=["reference"], examples=20, seed=0)
    (failure,) = report.failures  # the plain calls are right
    cx = failure.counterexample
    assert (failure.check, failure.backend) == ("packed", "reference")
    assert sum(1 for n in cx.case.lengths if n) == 2 and cx.case.n <= 3, cx.case  # two tokens, one per sequence
    assert "lengths=[" in str(report) and 'check="packed"' in cx.command
    with pytest.raises(AssertionError, match="on a packed batch disagrees"):
        exec(shlex.split(cx.command)[2], {})


@pytest.mark.skipif(testing.available_backends()["triton"] is not None,
                    reason=str(testing.available_backends()["triton"]))
def test_check_pattern_runs_the_packed_triton_kernels_when_they_can_run_here():
    report = check_pattern(STANDARD[0], backends=["triton"], examples=3, seed=2)
    assert report.ok, report
    assert ("packed", "triton", "passed") in [(r.check, r.backend, r.status) for r in report.results]
