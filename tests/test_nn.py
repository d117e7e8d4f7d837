"""patterncc.nn: the layers against an explicit float64 masked-softmax
implementation written here, recomputation against storing, init scaling,
the head/layer arrangement of each mode, and the training example end to end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patterncc import ir
from patterncc.nn import (
    SparseSelfAttention,
    SparseTransformer,
    SparseTransformerBlock,
    layer_patterns,
)
from patterncc.pipeline import mask
from stdlib_ir import fixed, strided

ROOT = Path(__file__).resolve().parents[1]


LOCAL = ir.Causal() & ir.Local(3)
STRIDE = ir.Causal() & ir.Stride(3)
SUMMARY = ir.Causal() & ir.Summary(4, 1)  # query 0..2 have no key: rows of zeros


# ----------------------------------------------------------------------------
# The explicit implementation: float64, masks from patterncc.masks
# ----------------------------------------------------------------------------


def masked_attention(q, k, v, allowed):
    """q (B, H, n, D), k and v (B, Hkv, n, D), allowed bool (H, n, n) -> (B, H, n, D).
    Query head h reads kv head h // (H // Hkv); a row with no key gives 0."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, n, n)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))  # no NaN rows
    return p @ v


def explicit_attention_layer(layer: SparseSelfAttention, x, pattern):
    """What SparseSelfAttention means, written out with its weights."""
    B, n, _ = x.shape
    H, Hkv, D = layer.heads, layer.kv_heads, layer.head_dim
    qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias)
    q = qkv[..., : H * D].reshape(B, n, H, D).permute(0, 2, 1, 3)
    k = qkv[..., H * D : (H + Hkv) * D].reshape(B, n, Hkv, D).permute(0, 2, 1, 3)
    v = qkv[..., (H + Hkv) * D :].reshape(B, n, Hkv, D).permute(0, 2, 1, 3)
    if pattern is None:
        allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(H, n, n)
    else:
        allowed = torch.from_numpy(mask(pattern, seq_len=n, heads=H))
    o = masked_attention(q, k, v, allowed).permute(0, 2, 1, 3).reshape(B, n, H * D)
    return F.linear(o, layer.proj.weight, layer.proj.bias)


def explicit_block(block: SparseTransformerBlock, h, pattern):
    """The paper's H + a(H) + b(H) (no dropout), written out."""
    a = explicit_attention_layer(block.attn, F.layer_norm(h, h.shape[-1:], block.norm1.weight, block.norm1.bias), pattern)
    u = F.layer_norm(h + a, h.shape[-1:], block.norm2.weight, block.norm2.bias)
    b = F.linear(F.gelu(F.linear(u, block.ff[0].weight, block.ff[0].bias)), block.ff[2].weight, block.ff[2].bias)
    return h + a + b


def outputs_and_grads(fn, module, x, seed=0):
    """fn(x), and the gradients of a fixed random projection of it w.r.t. x and every parameter."""
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    params = [x, *module.parameters()]
    return y, torch.autograd.grad((y * g).sum(), params)


def assert_all_close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------
# SparseSelfAttention
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, heads, kv_heads",
    [
        (strided(4), 4, 4),
        (fixed(4, 2), 4, 2),
        (SUMMARY, 2, 1),
        (ir.Heads((ir.HeadRange(0, 2, LOCAL), ir.HeadRange(2, 4, STRIDE))), 4, 2),
        (ir.Cycle((LOCAL, fixed(5, 2))), 4, 4),
        (ir.Local(3), 2, 2),  # non-causal is fine for a bare attention layer
        (None, 4, 2),  # dense causal through SDPA
    ],
    ids=["strided", "fixed-gqa", "empty-rows", "heads", "cycle", "bidirectional", "dense"],
)
def test_attention_equals_masked_softmax(pattern, heads, kv_heads):
    torch.manual_seed(0)
    layer = SparseSelfAttention(24, heads, pattern, kv_heads=kv_heads, backend="reference").double()
    x = torch.randn(2, 13, 24, dtype=torch.float64, requires_grad=True)
    got = outputs_and_grads(layer, layer, x)
    want = outputs_and_grads(lambda x: explicit_attention_layer(layer, x, pattern), layer, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert_all_close(got[1], want[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pattern", [None, strided(4)], ids=["dense", "strided"])
def test_attention_shapes(pattern):
    layer = SparseSelfAttention(32, 4, pattern, kv_heads=2, head_dim=12, backend="reference", bias=False)
    assert layer.qkv.weight.shape == ((4 + 2 * 2) * 12, 32)
    assert layer.proj.weight.shape == (32, 4 * 12)
    assert layer.qkv.bias is None
    y = layer(torch.randn(3, 9, 32))
    assert y.shape == (3, 9, 32) and y.dtype == torch.float32


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=4"):
        SparseSelfAttention(32, 4, None, kv_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        SparseSelfAttention(30, 4, None)
    with pytest.raises(ValueError, match="backend"):
        SparseSelfAttention(32, 4, None, backend="cuda")


def test_attention_auto_backend_is_reference_on_cpu(monkeypatch):
    # Even under TRITON_INTERPRET=1, "auto" in patterncc.nn means: Triton on CUDA only.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = SparseSelfAttention(16, 2, strided(4))
    assert layer.backend_for(torch.zeros(1)) == "reference"


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton backend runs on CUDA, or on the CPU under TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("pattern", [strided(16), fixed(16, 4)], ids=["strided", "fixed"])
def test_triton_block_matches_reference_block(pattern):
    # float32 Triton kernels (ieee dots), recomputing, against the float64 reference.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(9)
    ref = SparseTransformerBlock(32, 2, pattern, kv_heads=1, backend="reference").double()
    tri = copy.deepcopy(ref).float().to(device)
    tri.attn.backend, tri.recompute = "triton", True
    x = torch.randn(2, 72, 32, dtype=torch.float64, requires_grad=True)
    want = outputs_and_grads(ref, ref, x)
    got = outputs_and_grads(tri, tri, x.detach().float().to(device).requires_grad_())
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------
# SparseTransformerBlock
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [fixed(4, 1), None], ids=["fixed", "dense"])
def test_block_equals_explicit_residual(pattern):
    torch.manual_seed(1)
    block = SparseTransformerBlock(16, 2, pattern, depth_for_init=3, backend="reference").double()
    with torch.no_grad():  # make the norms' affine parameters matter
        for p in (block.norm1.weight, block.norm2.weight, block.norm1.bias, block.norm2.bias):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    got = outputs_and_grads(block, block, x)
    want = outputs_and_grads(lambda x: explicit_block(block, x, pattern), block, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert_all_close(got[1], want[1], rtol=1e-9, atol=1e-11)


def _count_attention_calls(block):
    calls = []
    attend = block.attn.attend

    def counted(*args, **kwargs):
        calls.append(1)
        return attend(*args, **kwargs)

    block.attn.attend = counted
    return calls


@pytest.mark.parametrize("pattern", [strided(3), None], ids=["strided", "dense"])
def test_recompute_gives_the_same_gradients_with_dropout(pattern):
    torch.manual_seed(2)
    stored = SparseTransformerBlock(16, 2, pattern, dropout=0.3, backend="reference").double()
    recomputed = copy.deepcopy(stored)
    recomputed.recompute = True
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    calls_stored = _count_attention_calls(stored)
    calls_recomputed = _count_attention_calls(recomputed)

    torch.manual_seed(123)
    y_stored, g_stored = outputs_and_grads(stored, stored, x)
    torch.manual_seed(123)
    y_recomputed, g_recomputed = outputs_and_grads(recomputed, recomputed, x)

    assert len(calls_stored) == 1 and len(calls_recomputed) == 2  # attention really ran again
    assert torch.equal(y_stored, y_recomputed)
    for a, b in zip(g_stored, g_recomputed, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # dropout was active: the eval-mode output differs
        assert not torch.allclose(stored.eval()(x), y_stored)


def test_recompute_through_the_whole_model():
    torch.manual_seed(3)
    model = SparseTransformer(64, 16, 2, 2, [LOCAL, STRIDE], max_len=16, dropout=0.2, backend="reference").double()
    twin = copy.deepcopy(model)
    twin.recompute = True
    idx = torch.randint(0, 64, (2, 16))
    grads = []
    for m in (model, twin):
        torch.manual_seed(7)
        m.loss(idx[:, :-1], idx[:, 1:]).backward()
        grads.append([p.grad for p in m.parameters()])
    assert twin.recompute and not model.recompute
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_output_projections_scaled_by_inverse_sqrt_two_depth():
    blocks = {}
    for depth in (1, 8):
        torch.manual_seed(4)
        blocks[depth] = SparseTransformerBlock(256, 4, None, depth_for_init=depth)
    one, eight = blocks[1], blocks[8]
    ratio = math.sqrt(2 * 1) / math.sqrt(2 * 8)
    for proj in ("attn.proj", "ff.2"):
        w1 = one.get_submodule(proj).weight
        w8 = eight.get_submodule(proj).weight
        torch.testing.assert_close(w8, w1 * ratio)
        assert w8.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
        assert torch.count_nonzero(eight.get_submodule(proj).bias) == 0
    # everything else is the unscaled GPT-2 init
    assert torch.equal(one.attn.qkv.weight, eight.attn.qkv.weight)
    assert torch.equal(one.ff[0].weight, eight.ff[0].weight)
    assert eight.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_model_passes_its_depth_to_the_init():
    torch.manual_seed(5)
    model = SparseTransformer(256, 256, 6, 4, None, max_len=8)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.05)
        assert block.ff[2].weight.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.05)


# ----------------------------------------------------------------------------
# SparseTransformer: modes, causality, shapes
# ----------------------------------------------------------------------------


def _masks(model, n, heads):
    return [mask(p, seq_len=n, heads=heads) for p in model.layer_patterns]


def test_interleaved_mode_alternates_layers():
    model = SparseTransformer(32, 16, 3, 4, [LOCAL, STRIDE], mode="interleaved", max_len=32)
    want = [mask(p, seq_len=20, heads=4) for p in (LOCAL, STRIDE, LOCAL)]
    for got, w in zip(_masks(model, 20, 4), want, strict=True):
        assert np.array_equal(got, w)


def test_merged_mode_gives_every_head_the_union():
    model = SparseTransformer(32, 16, 2, 4, [LOCAL, STRIDE], mode="merged", max_len=32)
    union = mask(LOCAL, seq_len=20) | mask(STRIDE, seq_len=20)  # (1, n, n)
    for got in _masks(model, 20, 4):
        assert np.array_equal(got, np.broadcast_to(union, got.shape))


def test_multihead_mode_splits_heads_into_contiguous_ranges():
    model = SparseTransformer(32, 24, 2, 6, [LOCAL, STRIDE, SUMMARY], mode="multihead", max_len=32)
    a, b, c = (mask(p, seq_len=20)[0] for p in (LOCAL, STRIDE, SUMMARY))
    for got in _masks(model, 20, 6):
        for h, want in enumerate([a, a, b, b, c, c]):
            assert np.array_equal(got[h], want), f"head {h}"
    assert isinstance(model.layer_patterns[0], ir.Heads)


def test_multihead_mode_needs_heads_divisible_by_patterns():
    with pytest.raises(ValueError, match="heads=4 is not divisible by 3 patterns"):
        SparseTransformer(32, 16, 2, 4, [LOCAL, STRIDE, SUMMARY], mode="multihead", max_len=32)


def test_dense_and_bad_modes():
    assert layer_patterns(None, "multihead", 3, 4) == [None, None, None]
    with pytest.raises(ValueError, match="mode='mixed'"):
        layer_patterns([LOCAL], "mixed", 2, 4)
    with pytest.raises(ValueError, match="empty"):
        layer_patterns([], "interleaved", 2, 4)


@pytest.mark.parametrize(
    "patterns, mode",
    [
        (ir.Local(3), "interleaved"),
        ([LOCAL, ir.Stride(3)], "interleaved"),
        ([LOCAL, ir.Causal() | ir.Local(2)], "multihead"),
        ([LOCAL, ir.Global(1)], "merged"),
    ],
    ids=["local", "one-of-two-layers", "one-head-range", "merged"],
)
def test_non_causal_patterns_are_rejected(patterns, mode):
    with pytest.raises(ValueError, match="is not causal"):
        SparseTransformer(32, 16, 2, 2, patterns, mode=mode, max_len=64)


def test_non_causal_beyond_the_first_positions_is_rejected():
    late = ir.Causal() | ir.Where(ir.Compare("==", ir.Var("k"), ir.BinOp("+", ir.Var("q"), ir.Const(300))))
    with pytest.raises(ValueError, match="query 0 may attend to the later key 300"):
        SparseTransformer(32, 16, 1, 2, late, max_len=4096)


def test_model_shapes_and_loss():
    torch.manual_seed(6)
    model = SparseTransformer(50, 16, 2, 2, [fixed(4, 1)], max_len=24, kv_heads=1, backend="reference")
    idx = torch.randint(0, 50, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 50)
    assert model.head.weight is model.tok_emb.weight  # tied by default
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and abs(loss.item() - math.log(50)) < 0.5  # near uniform at init
    with pytest.raises(ValueError, match="longer than the model's max_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    untied = SparseTransformer(50, 16, 1, 2, None, max_len=8, tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight


def test_sparse_model_is_causal_end_to_end():
    # Changing a later token must not change earlier logits.
    torch.manual_seed(8)
    model = SparseTransformer(40, 16, 2, 2, [LOCAL, STRIDE], mode="multihead", max_len=16, backend="reference")
    idx = torch.randint(0, 40, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 40
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9], b[:, 9])


def test_patterns_as_source_text_and_files(tmp_path):
    pytest.importorskip("patterncc.parser", reason="the parser has not landed")
    path = tmp_path / "span.pat"
    path.write_text("pattern span(w = 3) = causal & local(w)\n")
    model = SparseTransformer(32, 16, 3, 2, ["causal & stride(3)", str(path), path], max_len=32)
    for got, want in zip(_masks(model, 20, 2), (STRIDE, LOCAL, LOCAL), strict=True):
        assert np.array_equal(got, mask(want, seq_len=20, heads=2))
    with pytest.raises(FileNotFoundError, match="missing.pat"):
        SparseSelfAttention(16, 2, str(tmp_path / "missing.pat"))


# ----------------------------------------------------------------------------
# The training example
# ----------------------------------------------------------------------------


def test_tiny_training_run_writes_its_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_char_lm.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["model"] for r in results["train"]]
    assert names[0] == "dense" and {"strided", "fixed", "strided-interleaved", "fixed-multihead"} <= set(names)
    for r in results["train"]:
        assert len(r["train_bpc"]) == r["steps"] == 16
        assert r["val_bpc"] < 8.0 and r["train_bpc"][-1] < r["train_bpc"][0]  # it learned something
        assert r["step_time_ms_median"] > 0 and r["peak_memory_bytes"] > 0
    by_name = {r["model"]: r for r in results["train"]}
    assert by_name["fixed-multihead"]["layer_patterns"][0].startswith("heads {")
    assert 0 < by_name["fixed"]["density_vs_causal"] < 1 == by_name["dense"]["density_vs_causal"]
    sweep = results["sweep"]
    assert {(r["context"], r["recompute"]) for r in sweep} == {(n, rc) for n in (32, 64, 128) for rc in (False, True)}
    assert all(r["status"] == "ok" and r["step_time_ms"] > 0 for r in sweep)
    md = (tmp_path / "results.md").read_text()
    assert "| fixed-multihead |" in md and "| 128 | fixed | True |" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "sweep.png").stat().st_size > 0
