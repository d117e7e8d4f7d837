"""Packed batches (``cu_seqlens``) on the Triton backend against the float64
reference run on each sequence alone, and the packed layouts they walk.

Without a GPU the kernels run under ``TRITON_INTERPRET=1``: layout block 16
with every tile 16 (and one configuration whose tiles are 32, so sequences
start on multiples of 32 while blocks are 16), totals of tens to a few
hundred tokens, sequence boundaries inside blocks and on block edges, empty
and length-1 sequences. Tolerances as in test_triton.py (absolute, inputs
standard normal): float32 2e-5 for o and lse, 1e-4 for gradients; float16
4e-3 / 3e-2; bfloat16 3e-2 / 1.5e-1 (lse is fp32 in every dtype).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import patterncc as pcc
from patterncc import planner
from patterncc.blocklayout import FULL, build as build_layout
from patterncc.masks import dense_mask
from patterncc.packing import PackedSlots, packed_layout

from kernel_env import interpreter_and_cache  # noqa: F401 (autouse: the interpreter and a private cache)
from kernel_env import triton_specializations

from patterncc.backends.triton import KernelConfig, runtime  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIG = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
MERGED = KernelConfig(block=16, block_m=32, block_n=16, block_m1=16, block_n1=32, block_m2=32, block_n2=16)

TOL = {  # dtype -> (o, lse, gradients), absolute
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (4e-3, 2e-3, 3e-2),
    torch.bfloat16: (3e-2, 1e-2, 1.5e-1),
}


def _inputs(lengths, H, Hkv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = int(sum(lengths))
    q, k, v = (torch.randn(1, h, total, D, generator=gen).to(DEVICE, dtype).requires_grad_() for h in (H, Hkv, Hkv))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def _each_alone(pattern, q, k, v, cu, do, **terms):
    """o, lse and the gradients of q, k, v of the float64 reference on each sequence alone."""
    ref = pcc.compile(pattern, backend="reference")
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    terms = {name: t.detach().cpu().double().requires_grad_() for name, t in terms.items()}
    outs, lses = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a < b:
            o, lse = ref(qd[:, :, a:b], kd[:, :, a:b], vd[:, :, a:b], return_lse=True, **terms)
            outs.append(o)
            lses.append(lse)
    o, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    grads = torch.autograd.grad((o * do.cpu().double()).sum(), (qd, kd, vd, *terms.values()))
    return o, lse, grads


def check_packed(pattern, lengths, *, H=2, Hkv=2, D=16, dtype=torch.float32, config=CONFIG, plan="auto",
                 seed=0, attn=None, fixed=(), **terms):
    """The packed call's o, lse and gradients (q, k, v and the terms') equal the
    reference's on each sequence alone; returns the compiled attention (or runs ``attn``).
    The term tensors named in ``fixed`` want no gradient and must get none."""
    pattern = pcc.parse(pattern) if isinstance(pattern, str) else pattern
    q, k, v, cu = _inputs(lengths, H, Hkv, D, dtype, seed)
    attn = attn or pcc.compile(pattern, backend="triton", config=config, plan=plan)
    terms = {name: t.to(DEVICE).requires_grad_(name not in fixed) for name, t in terms.items()}
    learned = [name for name in terms if name not in fixed]
    o, lse = attn(q, k, v, return_lse=True, cu_seqlens=cu, **terms)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    (o * do).sum().backward()
    assert all(terms[name].grad is None for name in fixed), "a fixed term tensor got a gradient"
    grads = [q.grad, k.grad, v.grad, *(terms[name].grad for name in learned)]
    o_ref, lse_ref, grads_ref = _each_alone(pattern, q, k, v, cu, do, **terms)
    grads_ref = [*grads_ref[:3], *(g for name, g in zip(terms, grads_ref[3:]) if name not in fixed)]
    tol_o, tol_lse, tol_g = TOL[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    o, lse, grads = o.cpu(), lse.cpu(), [g.cpu() for g in grads]
    torch.testing.assert_close(o.double(), o_ref, atol=tol_o, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # empty rows: -inf in both
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), lse_ref.nan_to_num(neginf=0), atol=tol_lse, rtol=0)
    for name, g, g_ref in zip(("dq", "dk", "dv", *learned), grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=tol_g * max(1.0, g_ref.abs().max().item() / 4), rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    return attn


# -- natural order: boundaries inside blocks and on block edges, empty and length-1 sequences

BOUNDARIES = [5, 0, 17, 32, 1, 40, 16]  # starts at 0, 5, 22 (inside blocks), 54, 55, 95 ...; 32 and 16 whole blocks


@pytest.mark.parametrize("pattern", ["causal", "sliding_window(7)", "local(5) | sink(3)", "all"])
def test_natural_order_equals_each_sequence_alone(pattern):
    check_packed(pattern, BOUNDARIES)


def test_tiles_wider_than_blocks():
    """Tiles of 32 over blocks of 16: sequences start on multiples of 32 in slot space."""
    check_packed("causal & (local(6) | global(4))", BOUNDARIES, config=MERGED)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gqa_and_16_bit(dtype):
    check_packed("sliding_window(12)", [16, 16, 3, 0, 29], H=4, Hkv=2, dtype=dtype)


def test_single_token_and_empty_sequences():
    check_packed("causal", [0, 1, 0])
    check_packed("causal", [1, 1, 1, 0, 2])


def test_rows_with_no_allowed_key():
    """``where q >= 2``: the first two rows of every sequence are empty (o = 0, lse = -inf, no NaN)."""
    check_packed("causal & (where q >= 2)", [3, 1, 18, 0, 7])


def test_heads_and_cycle():
    check_packed("heads { 0..1 => causal, 1..3 => sliding_window(4) }", [9, 20, 2], H=3, Hkv=3)
    check_packed("cycle(causal, local(3) | sink(2))", [9, 20, 2], H=4, Hkv=2)


@pytest.mark.parametrize("pattern, plan", [("causal", "auto"), ("strided(16)", "planned")])
def test_default_tiles(pattern, plan):
    """The default configuration: block 64 under tiles up to 128 (sequences
    start on multiples of 128), FULL runs walked unmasked."""
    check_packed(pattern, [150, 1, 0, 70, 260], D=64, dtype=torch.bfloat16, config=None, plan=plan)


# -- planned components: their token orders apply within each sequence


@pytest.mark.parametrize("pattern, dtype", [("strided(8)", torch.float32), ("fixed(8, 2)", torch.float32),
                                            ("strided(4)", torch.bfloat16)])
def test_planned_components_run_within_each_sequence(pattern, dtype):
    lengths = [5, 0, 17, 32, 1, 41]
    attn = check_packed(pattern, lengths, plan="planned", dtype=dtype)
    plan = attn.impl("triton").packed_plan(np.cumsum([0, *lengths]), 2)
    assert any(c.reordered for c in plan.components), plan.describe()  # the batch really ran reordered


def test_residue_classes_on_block_edges():
    """190 tokens in residue(4): classes of 48 slots, FULL blocks inside them,
    the last two classes ending in a padding slot (one layout per class size)."""
    check_packed("strided(4)", [190, 3, 64], H=1, Hkv=1, plan="planned")


def test_planned_components_with_merged_tiles_and_gqa():
    lengths = [33, 7, 64]
    attn = check_packed("strided(8)", lengths, H=4, Hkv=1, plan="planned", config=MERGED)
    plan = attn.impl("triton").packed_plan(np.cumsum([0, *lengths]), 4)
    assert any(c.q_order.kind == "residue" for c in plan.components), plan.describe()


# -- patterns that use n: grouped by length, each sequence at its own n


def test_length_dependent_patterns():
    check_packed("local(isqrt(n))", [5, 0, 17, 17, 1, 40])
    check_packed("causal & (where k >= n - 6)", [12, 3, 12, 20])


# -- score terms at positions relative to each sequence


def test_softcap_and_sinks():
    sinks = torch.tensor([0.5, -1.0])
    check_packed(pcc.parse("sliding_window(9) with softcap(5)"), [7, 0, 20, 1, 18], sinks=sinks)


def test_alibi_planned():
    check_packed(pcc.parse("strided(4) with alibi"), [9, 21, 2], plan="planned")


def test_rel_bias():
    rel = torch.randn(2, 2 * 5 + 1, generator=torch.Generator().manual_seed(3))
    check_packed("causal", [9, 21, 2], rel_bias=rel)


@pytest.mark.parametrize("fixed", ["alibi_slopes", "rel_bias"])
def test_a_fixed_term_tensor_beside_a_learned_one(fixed):
    """The dQ kernels then sum one term's gradient and not the other's."""
    rel = torch.randn(2, 2 * 5 + 1, generator=torch.Generator().manual_seed(3))
    check_packed("sliding_window(9)", [9, 0, 21, 2], fixed=(fixed,), alibi_slopes=torch.tensor([0.3, 0.1]),
                 rel_bias=rel)


# -- property: lengths 1..300, counts 1..20


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=20), seed=st.integers(0, 2**16))
def test_hypothesis_lengths(lengths, seed):
    check_packed("sliding_window(10) | sink(2)", lengths, H=1, Hkv=1, seed=seed)


# -- the layouts


def _slot_mask(pattern, packing: PackedSlots, heads: int) -> np.ndarray:
    """bool [H, slots, slots]: each sequence's mask at its own length, placed at its first slot."""
    out = np.zeros((heads, packing.total, packing.total), dtype=bool)
    for s, n in enumerate(np.diff(packing.offsets)):
        if n:
            a = packing.first[s]
            out[:, a:a + n, a:a + n] = dense_mask(pattern, int(n), heads)
    return out


@pytest.mark.parametrize("pattern", ["causal", "sliding_window(7) | sink(2)", "fixed(8, 3)",
                                     "heads { 0..1 => causal, 1..2 => local(4) }"])
def test_packed_layout_is_sound_and_crops_exactly(pattern):
    """Every allowed pair lies in a non-empty block, FULL blocks hold only allowed
    pairs inside a sequence, and the crop of the longest sequence's layout is the
    layout each sequence has alone, but for its last block row and column."""
    p = pcc.parse(pattern)
    lengths = np.array([5, 0, 17, 32, 1, 40, 16])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packing = PackedSlots.of(offsets, lengths, np.ones_like(lengths), 32)
    longest = build_layout(p, int(lengths.max()), 16, 2)
    lay = packed_layout(p, [longest], np.zeros(lengths.size, dtype=np.int64), packing)
    dense = lay.to_dense()
    mask = _slot_mask(p, packing, lay.heads)
    nb = packing.total // 16
    blocks = mask.reshape(lay.heads, nb, 16, nb, 16)
    assert not (blocks.any(axis=(2, 4)) & (dense == 0)).any()  # sound: nothing allowed is EMPTY
    assert blocks.all(axis=(2, 4))[dense == FULL].all()  # FULL: every slot allowed (so inside the sequence)
    for s, n in enumerate(lengths):
        if n:
            b = packing.first[s] // 16
            alone = build_layout(p, int(n), 16, 2).to_dense()
            m = alone.shape[1]
            got = dense[:, b:b + m, b:b + m]
            if n % 16:  # the last block row and column are PARTIAL when not whole
                alone[:, -1, :] = np.minimum(alone[:, -1, :], 1)
                alone[:, :, -1] = np.minimum(alone[:, :, -1], 1)
            np.testing.assert_array_equal(got, alone)
    # both orientations hold the same pairs
    rows = lay.kv_rows()
    cols = np.repeat(np.arange(lay.heads * nb), np.diff(lay.q_ptr, axis=1).ravel())
    kv = set(zip(rows // nb, rows % nb, lay.kv_idx, lay.kv_full))
    qv = set(zip(cols // nb, lay.q_idx, cols % nb, lay.q_full))
    assert kv == qv


@pytest.mark.parametrize("pattern", ["strided(4)", "fixed(8, 3)", "causal & (local(4) | dilated(3, 4))"])
def test_reordered_packed_layouts_are_sound(pattern):
    """A reordered component's packed layout against each sequence's exact slot
    mask (its slot pattern at its own length, padding slots never allowed):
    nothing allowed is EMPTY, FULL blocks are all allowed. Residue layouts are
    shared per class size, with the blocks of padding slots never FULL."""
    attn = pcc.compile(pcc.parse(pattern), backend="triton", config=CONFIG, plan="planned")
    impl = attn.impl("triton")
    # classes of 33 to 51 slots: FULL blocks inside them, and classes with a padding slot
    # (190 in residue(4): classes of 48, a multiple of the block, the last two with one)
    lengths = np.array([5, 0, 130, 1, 190, 64, 63, 17])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    plan = impl.packed_plan(offsets, 1)
    comps = [c for c in plan.components if c.reordered]
    assert comps, plan.describe()
    for comp in comps:
        packing, sources, source_of, unfull = impl.packing_of(comp, offsets, 16)
        lay = packed_layout(comp.slot_pattern, sources, source_of, packing, unfull)
        mask = np.zeros((1, packing.total, packing.total), dtype=bool)
        for s, n in enumerate(lengths):
            if n:
                exact = planner.component_at(comp, int(n), 16).slot_pattern
                a, slots = packing.first[s], packing.slots[s]
                mask[:, a:a + slots, a:a + slots] = dense_mask(exact, int(slots), 1)
        nb = packing.total // 16
        blocks = mask.reshape(1, nb, 16, nb, 16)
        dense = lay.to_dense()
        assert not (blocks.any(axis=(2, 4)) & (dense == 0)).any()
        assert blocks.all(axis=(2, 4))[dense == FULL].all()


@pytest.mark.parametrize("pattern", ["causal", "all", "sliding_window(7) | sink(2)",
                                     "heads { 0..1 => causal, 1..2 => local(4) }"])
@pytest.mark.parametrize("tile, step", [(16, 16), (32, 16), (16, 32), (64, 32)])
def test_cropped_step_lists_cover_exactly_what_is_allowed(pattern, tile, step):
    """``tables.crop_steps``: every allowed pair of a sequence lies in one of
    its tile's listed steps, and a FULL step holds only allowed pairs, its keys
    inside the sequence (the kernels walk it unmasked)."""
    from patterncc.backends.triton import tables

    p = pcc.parse(pattern)
    lengths = np.array([5, 0, 17, 32, 1, 40, 16, 64])
    first = np.concatenate([[0], np.cumsum(-(-lengths // 64) * 64)])[:-1]
    total = int((-(-lengths // 64) * 64).sum())
    source = build_layout(p, 64, 16, 2)
    src = tables.kernel_steps(source.kv_ptr, source.kv_idx, source.kv_full, 64, 16, tile, step)
    lists = tables.crop_steps(src, lengths, first, tile, step, total)
    for s, n in enumerate(lengths):
        if not n:
            continue
        mask = dense_mask(p, int(n), source.heads)
        for h in range(source.heads):
            covered = np.zeros((n, n), dtype=bool)
            for t in range(-(-n // tile)):
                row = h * lists.n_tiles + first[s] // tile + t
                rows = slice(t * tile, min(n, (t + 1) * tile))
                for steps, full in ((lists.full_steps[lists.full_ptr[row]:lists.full_ptr[row + 1]], True),
                                    (lists.part_steps[lists.part_ptr[row]:lists.part_ptr[row + 1]], False)):
                    assert np.all(np.diff(steps) > 0)
                    for st in steps:
                        keys = slice(st * step, (st + 1) * step)
                        if full:
                            assert (st + 1) * step <= n and mask[h, rows, keys].all()
                        covered[rows, keys] = True
            assert not (mask[h] & ~covered).any()


def test_a_new_batch_compiles_nothing(monkeypatch):
    """Kernels are generated for the pattern once; a batch of other lengths
    builds layouts and tables only."""
    attn = pcc.compile(pcc.parse("strided(8)"), backend="triton", config=CONFIG, plan="planned")
    calls = []
    real = runtime.load_kernels

    def counted(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(runtime, "load_kernels", counted)
    q, k, v, cu = _inputs([9, 30, 2], 2, 2, 16, torch.float32)
    attn(q, k, v, cu_seqlens=cu).sum().backward()
    first, variants = len(calls), triton_specializations()
    assert first >= 1
    # totals 41, 33, 55, then 32, 32, 64 and 1: Triton would specialize a length argument on its
    # divisibility by 16 (and on 1); no kernel leaves one to it (next test), and lse's and delta's
    # rows are padded to a multiple of 16 at every length (launch.aligned_rows)
    for lengths in ([40, 1], [3, 3, 3, 3, 21], [17, 5, 33], [3, 3, 3, 3, 20], [16, 16], [30, 2, 32], [1]):
        q, k, v, cu = _inputs(lengths, 2, 2, 16, torch.float32)
        attn(q, k, v, cu_seqlens=cu).sum().backward()
    assert len(calls) == first
    # nor a second specialization of a kernel it has (the tables' pointers keep their alignment)
    assert triton_specializations() == variants


def test_batches_on_either_side_of_the_planners_line_share_kernels():
    """Under plan="auto" the planner runs strided(8) (blocks of 16) in natural order up to 128 tokens
    and planned from 256: every packed batch takes the strategy of the planner's settled choice
    (planned here), so a batch of short sequences and one of long ones run the same kernels, and
    both are exact (a short sequence under the planned components)."""
    attn = check_packed("strided(8)", [20, 3, 1, 9])
    plan = attn.impl("triton").packed_plan(np.array([0, 20]), 2)
    assert plan.strategy == "planned" and len(plan.components) == 2
    variants = triton_specializations()
    check_packed("strided(8)", [260, 7], seed=1, attn=attn)
    check_packed("strided(8)", [1], seed=2, attn=attn)
    assert triton_specializations() == variants


def test_unpacked_lengths_compile_no_kernel():
    """The same for plain calls: forward and backward at lengths that are and are not multiples of 16,
    and 1, specialize no kernel again after the first (tests/test_compile_gpu.py: the card's own count)."""
    attn = pcc.compile("sliding_window(8)", backend="triton", config=CONFIG)
    seen = []
    for n in (40, 48, 1, 33, 64):
        q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE, requires_grad=True) for _ in range(3))
        attn(q, k, v).sum().backward()
        seen.append(triton_specializations())
    assert seen[0] > 0 and seen == [seen[0]] * len(seen), seen


def test_no_kernel_specializes_on_a_length():
    """Every kernel argument that carries a length (N, N_TOK, the decode kernels' NQ) is named in
    do_not_specialize: Triton would otherwise compile a kernel again when a new length is, or stops
    being, a multiple of 16 (or is 1), which a new batch, a new sequence length or a new decode step
    must never do. (The row length of lse and delta, LSE_LEN, is specialized: the host makes it a
    multiple of 16 at every length.) Read from the kernel templates' source, so no GPU is needed."""
    import ast
    from pathlib import Path

    import patterncc.backends.triton as backend

    lengths = {"N", "N_TOK", "NQ"}
    checked = 0
    for name in ("kernels.py", "kernels_backward.py", "decode_kernels.py"):
        tree = ast.parse((Path(backend.__file__).parent / name).read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                continue  # helpers are inlined into the kernels that call them
            jit = [d for d in fn.decorator_list if "jit" in ast.unparse(d)]
            if not jit:
                continue
            held = lengths & {a.arg for a in fn.args.args}
            unspecialized = set()
            for d in jit:
                for kw in getattr(d, "keywords", []):
                    if kw.arg == "do_not_specialize":
                        unspecialized |= set(ast.literal_eval(kw.value))
            assert held <= unspecialized, f"{name}:{fn.name} specializes on {sorted(held - unspecialized)}"
            checked += bool(held)
    assert checked >= 5  # attn_fwd, attn_bwd_preprocess, attn_bwd_dkdv, attn_bwd_dq, the decode kernels


# -- bad input


def test_bad_cu_seqlens_are_named():
    attn = pcc.compile(pcc.parse("causal"), backend="triton", config=CONFIG)
    q, k, v, cu = _inputs([4, 4], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the packed length 8"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="non-decreasing"):
        attn(q, k, v, cu_seqlens=torch.tensor([0, 5, 4, 8], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
        attn(q, k, v, cu_seqlens=torch.tensor([0.0, 8.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"q \[1, H, total, D\]"):
        attn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu_seqlens=cu)


@pytest.mark.skipif(DEVICE == "cuda", reason="the dry run is the CPU's; on a GPU run the benchmark itself")
def test_benchmark_runs_a_tiny_case(capsys):
    """bench/bench_packed.py's harness runs (the lead runs it on the GPU): one
    pattern at a tiny total on the CPU, Flex left out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    try:
        import bench_packed
    finally:
        sys.path.pop(0)
    assert sum(bench_packed.draw_lengths(131072)) == 131072
    assert bench_packed.main(["--smoke", "--patterns", "sliding_window(1024)", "--reps", "1"]) == 0
    table = capsys.readouterr().out
    assert "| 96 | 7 | sliding_window(16) | 16 |" in table


def test_traced_packed_calls_take_the_op():
    """Under a tracer (fake tensors) a packed call is the op's fake: its shapes,
    no value read (torch.compile of packed calls, values and gradients: test_compile.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    attn = pcc.compile(pcc.parse("causal"), backend="triton", config=CONFIG)
    with FakeTensorMode() as mode:
        q = mode.from_tensor(torch.randn(1, 2, 8, 16, device=DEVICE))
        cu = mode.from_tensor(torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE))
        o, lse = attn(q, q, q, cu_seqlens=cu, return_lse=True)
        assert (tuple(o.shape), tuple(lse.shape), lse.dtype) == ((1, 2, 8, 16), (1, 2, 8), torch.float32)
