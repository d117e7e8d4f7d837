"""patterncc inside Hugging Face transformers: the models' own masks, user
patterns, padding, generation and training, against transformers' eager
attention on the same weights (small configs, random weights, nothing
downloaded; the reference backend on the CPU, the Triton kernels on a GPU)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install patterncc[hf]) is not installed")

import patterncc as pcc  # noqa: E402
import patterncc.integrations.transformers as pt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
ATOL = 2e-4 if DEVICE == "cpu" else 2e-2  # float32 eager against float64 reference (CPU) or bf16-free fp32 kernels
pt.register()

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _config(family: str):
    """A small config of each family the installed transformers has (None if it lacks it)."""
    try:
        if family == "llama":
            return transformers.LlamaConfig(**SMALL)
        if family == "mistral":
            return transformers.MistralConfig(**SMALL, sliding_window=7)
        if family == "gemma2":
            return transformers.Gemma2Config(**SMALL, sliding_window=6, attn_logit_softcapping=5.0,
                                             final_logit_softcapping=30.0, query_pre_attn_scalar=16)
        if family == "gemma3":
            return transformers.Gemma3TextConfig(**SMALL, sliding_window=5, sliding_window_pattern=2)
        if family == "gpt_oss":
            return transformers.GptOssConfig(**{**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
                                             sliding_window=6)
        if family == "llama4":
            return transformers.Llama4TextConfig(**{**SMALL, "num_local_experts": 2, "intermediate_size_mlp": 96},
                                                 attention_chunk_size=8, no_rope_layers=[1, 0, 1, 0])
    except (AttributeError, TypeError) as err:  # a family or argument this transformers does not know
        pytest.skip(f"transformers {transformers.__version__} has no {family} of this shape: {err}")
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "gemma2", "gemma3", "gpt_oss", "llama4"]


def _pair(family: str, **overrides):
    """The same weights under eager attention and under patterncc."""
    cfg = _config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    # Each model its own config: from_config writes the attention implementation into the config it is
    # given, so with one shared config the "eager" model would run patterncc too.
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    eager = eager.to(DEVICE, DTYPE).eval()
    if family == "gpt_oss":  # sinks start at zero: make them matter
        with torch.no_grad():
            for layer in eager.model.layers:
                layer.self_attn.sinks.normal_()
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE, DTYPE).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family):
    eager, ours = _pair(family)
    idx = torch.randint(0, 97, (2, 21), device=DEVICE)
    with torch.no_grad():
        want = eager(idx).logits
        got = ours(idx).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_eager(family):
    eager, ours = _pair(family)
    idx = torch.randint(0, 97, (2, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = eager.generate(idx, **kwargs)
        got = ours.generate(idx, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "mistral", "llama4"])
def test_left_padding(family):
    """Rows of different lengths, left-padded as generate pads them: every
    real token's logits equal eager's with the same mask, and generation too."""
    eager, ours = _pair(family)
    idx = torch.randint(1, 97, (3, 13), device=DEVICE)
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        want = eager(idx, attention_mask=mask).logits
        got = ours(idx, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=ATOL)
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(idx, attention_mask=mask, **kwargs),
                           eager.generate(idx, attention_mask=mask, **kwargs))


def test_padded_query_rows_give_zero():
    q = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 1, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = pt.attention_forward(module, q, k, k, pt.Padding(mask, 0, 5, 0))
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
    alone = pcc.compile("causal", backend="reference")(q[1:, :, 2:], k[1:, :, 2:], k[1:, :, 2:])
    torch.testing.assert_close(out[1, 2:], alone[0].transpose(0, 1))


def test_packed_position_ids_run_each_sequence_alone():
    eager, ours = _pair("llama")
    idx = torch.randint(0, 97, (1, 17), device=DEVICE)
    position_ids = torch.tensor([list(range(6)) + list(range(11))], device=DEVICE)
    with torch.no_grad():
        got = ours(idx, position_ids=position_ids).logits
        first = eager(idx[:, :6]).logits
        second = eager(idx[:, 6:]).logits
    torch.testing.assert_close(got, torch.cat([first, second], dim=1), rtol=0, atol=ATOL)


def _cu_seqlens_of_calls(monkeypatch) -> list:
    """The cu_seqlens of every compiled attention's call from now on (None: not packed)."""
    calls = []
    call = pcc.attention.Attention.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pcc.attention.Attention, "__call__", counted)
    return calls


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss"])
def test_packed_rows_run_as_one_packed_call(family, monkeypatch):
    """Two rows of packed sequences (sliding windows, softcap, sinks): one
    cu_seqlens call per layer for both rows, equal to each sequence alone.
    (Not Llama 4: its eager model itself differs between packed rows and each
    sequence alone.)"""
    eager, ours = _pair(family)
    calls = _cu_seqlens_of_calls(monkeypatch)
    splits = [(0, 9, 14), (0, 3, 4, 14)]  # row 0: 9 + 5 tokens; row 1: 3 + 1 + 10
    idx = torch.randint(0, 97, (2, 14), device=DEVICE)
    position_ids = torch.tensor([[p - a for a, b in zip(s, s[1:]) for p in range(a, b)] for s in splits],
                                device=DEVICE)
    with torch.no_grad():
        got = ours(idx, position_ids=position_ids).logits
        want = [torch.cat([eager(idx[r:r + 1, a:b]).logits for a, b in zip(s, s[1:])], dim=1)
                for r, s in enumerate(splits)]
    assert len(calls) == len(ours.model.layers) and all(cu is not None for cu in calls)
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=ATOL)
    assert calls[0].tolist() == [0, 9, 14, 17, 18, 28]


def _flattened_batch(lengths):
    """What DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives a model."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    g = torch.Generator().manual_seed(len(lengths))
    batch = collator([{"input_ids": torch.randint(0, 97, (n,), generator=g).tolist()} for n in lengths])
    return {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
            for name, value in batch.items() if name != "labels"}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_a_flattened_batch_is_one_packed_call(family, monkeypatch):
    """transformers' flattened batch (cu_seq_lens_q/k): one cu_seqlens call
    per layer, equal to each sequence alone."""
    eager, ours = _pair(family)
    calls = _cu_seqlens_of_calls(monkeypatch)
    lengths = [5, 1, 9, 3]
    batch = _flattened_batch(lengths)
    cuts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.no_grad():
        got = ours(**batch).logits
        want = torch.cat([eager(batch["input_ids"][:, a:b]).logits for a, b in zip(cuts, cuts[1:])], dim=1)
    assert len(calls) == len(ours.model.layers) and all(cu is batch["cu_seq_lens_q"] for cu in calls)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_a_flattened_batch_compiles_into_one_graph():
    """Under torch.compile the flattened batch's offsets enter the attention
    op as a tensor: no graph break, the eager logits and gradients, and a
    batch of other lengths does not recompile (dynamic)."""
    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.num_hidden_layers = 2
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE, DTYPE)
    batch = _flattened_batch([6, 2, 9])
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for lengths in ([6, 2, 9], [3, 11, 1, 4], [7, 7]):
        batch = _flattened_batch(lengths)
        want = model(**batch).logits
        want.sum().backward()
        want_grad = model.model.embed_tokens.weight.grad.clone()
        model.zero_grad()
        got = compiled(**batch).logits
        got.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.model.embed_tokens.weight.grad, want_grad, rtol=1e-5, atol=1e-5)
        model.zero_grad()
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} times for three batches"


def test_a_flattened_batch_refuses_what_it_cannot_mean():
    eager, ours = _pair("llama")
    batch = _flattened_batch([5, 4])
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        ours(**{**batch, "cu_seq_lens_k": torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)})
    with pytest.raises(ValueError, match="only one of cu_seq_lens_q and cu_seq_lens_k"):
        ours(**{name: value for name, value in batch.items() if name != "cu_seq_lens_k"})
    two_rows = {**batch, **{name: batch[name].repeat(2, 1) for name in ("input_ids", "position_ids")}}
    with pytest.raises(ValueError, match="one row of packed sequences"):
        ours(**two_rows)


def test_rows_declared_unpacked_compile_into_one_graph(monkeypatch):
    """register(packed_rows=False): the positions are never read, so a
    compiled model is one graph; a row that restarts anyway fails the step
    (a device-side check), never runs as one sequence."""
    monkeypatch.setitem(pt._BACKEND, "packed_rows", False)
    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.num_hidden_layers = 2
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE, DTYPE)
    idx = torch.randint(0, 97, (2, 16), device=DEVICE)
    explained = torch._dynamo.explain(model)(idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
    packed = torch.tensor([list(range(9)) + list(range(7))] * 2, device=DEVICE)
    for run in (model, compiled):
        with pytest.raises(RuntimeError, match="register.packed_rows=False. said rows are never packed"):
            run(idx, position_ids=packed)
    with pytest.raises(TypeError, match="packed_rows must be True or False"):
        pt.register(packed_rows="no")


def test_packed_position_ids_are_read_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids: one read on the host (a
    device sync on the GPU) per forward, and a new read once they change.
    (A CPU tensor is read every time, never kept: the test treats CPU reads
    as a device's.)"""
    from patterncc.backends.reference import checks

    monkeypatch.setattr(checks, "_reads_wait", lambda t: True)
    eager, ours = _pair("mistral")
    reads = []
    real = pt._segments

    def counted(position_ids, n):
        reads.append(position_ids)
        return real(position_ids, n)

    monkeypatch.setattr(pt, "_segments", counted)
    idx = torch.randint(0, 97, (1, 14), device=DEVICE)
    position_ids = torch.tensor([list(range(9)) + list(range(5))], device=DEVICE)
    with torch.no_grad():
        first = ours(idx, position_ids=position_ids).logits
        assert len(reads) == 1 < len(ours.model.layers)
        position_ids[0, 9:12] = torch.arange(9, 12)  # changed in place: sequences of 12 and 2 tokens now
        position_ids[0, 12:] = torch.arange(2)
        second = ours(idx, position_ids=position_ids).logits
        assert len(reads) == 2
        want = torch.cat([eager(idx[:, a:b]).logits for a, b in ((0, 12), (12, 14))], dim=1)
    torch.testing.assert_close(second, want, rtol=0, atol=ATOL)
    assert not torch.equal(first, second)


def test_user_patterns_by_type_and_index(tmp_path):
    """apply(): a pattern per layer type and per index, against eager with the
    same pattern as an explicit 4-D mask."""
    eager, ours = _pair("mistral")
    changed = pt.apply(ours, {0: "strided(4)", 2: "causal & (local(3) | sink(2))"})
    assert changed == [0, 2]
    idx = torch.randint(0, 97, (1, 19), device=DEVICE)
    with torch.no_grad():
        got = ours(idx).logits
    # eager with the same patterns: a 4-D additive mask per layer
    masks = {0: pcc.mask("strided(4)", 19)[0], 2: pcc.mask("causal & (local(3) | sink(2))", 19)[0],
             1: pcc.mask("sliding_window(7)", 19)[0], 3: pcc.mask("sliding_window(7)", 19)[0]}
    if getattr(eager.config, "layer_types", None) is None or eager.config.layer_types[1] != "sliding_attention":
        masks[1] = masks[3] = pcc.mask("causal" if eager.config.sliding_window is None else "sliding_window(7)", 19)[0]

    def eager_layer(module, query, key, value, attention_mask, **kwargs):
        allowed = torch.from_numpy(masks[module.layer_idx]).to(query.device)
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
        from transformers.models.mistral.modeling_mistral import eager_attention_forward

        return eager_attention_forward(module, query, key, value, bias[None, None], **kwargs)

    transformers.AttentionInterface.register("patterncc_test_masks", eager_layer)
    eager.config._attn_implementation = "patterncc_test_masks"
    with torch.no_grad():
        want = eager(idx).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # from a .pat file: one definition per layer type
    pat = tmp_path / "layers.pat"
    pat.write_text("pattern full_attention = causal & local(5)\n")
    cfg = _config("llama")
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME)
    if getattr(model.config, "layer_types", None):
        assert pt.apply(model, str(pat)) == [0, 1, 2, 3]
        assert all(str(layer.self_attn.patterncc_pattern) == "causal & local(5)" for layer in model.model.layers)


@pytest.mark.parametrize("family", ["mistral", "gemma3", "llama4"])
def test_user_pattern_generation_with_the_cache_equals_recomputing(family):
    """A user pattern on a layer of a windowed model (Mistral has no layer
    types; Gemma 3 and Llama 4 do): generation with transformers' cache
    gives the tokens that recomputing the whole sequence at each step gives,
    though the pattern reads further back than the model's window."""
    cfg = _config(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE).eval()
    pt.apply(model, {0: "strided(3)", 1: "causal & (local(2) | sink(2))"})
    idx = torch.randint(1, 97, (1, 6), device=DEVICE)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(idx, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(idx, use_cache=False, **kwargs))


def test_training_steps_with_a_user_pattern():
    torch.manual_seed(0)
    cfg = _config("llama")
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE)
    pt.apply(model, {i: "strided(4)" for i in range(0, cfg.num_hidden_layers, 2)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 97, (4, 24), device=DEVICE)
    losses = []
    for _ in range(8):
        loss = model(idx, labels=idx).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_refusals_name_the_feature():
    cfg = _config("llama")
    cfg.attention_dropout = 0.1
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE).train()
    idx = torch.randint(0, 97, (1, 8), device=DEVICE)
    with pytest.raises(ValueError, match="attention dropout"):
        model(idx)
    model.eval()
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    with pytest.raises(ValueError, match="not one run of real tokens"):
        model(idx, attention_mask=holes)
    with pytest.raises(ValueError, match="prepared attention mask"):
        model(idx, attention_mask=torch.zeros(1, 1, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="no layer has type"):
        pt.apply(model, {"sliding_attention_typo": "causal"})
    with pytest.raises(ValueError, match="does not exist"):
        pt.apply(model, {17: "causal"})


def test_training_under_torch_compile_matches_eager(monkeypatch):
    """A user pattern on every other layer, compiled with aot_eager: the same
    losses step by step as eager (the same kernels or reference run in both;
    what may differ is float32 rounding where AOT decomposes the model's own
    ops, a few ulps of a loss near 4, far below the 1e-2 that a wrong mask
    moves it by). And patterncc's attention puts no graph break of its own
    in the model: with the packed-row check (a data-dependent branch on
    position_ids) out of the trace, the whole step is one graph."""
    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.num_hidden_layers = 2
    idx = torch.randint(0, 97, (2, 16), device=DEVICE)

    def losses(model, steps=3):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        out = []
        for _ in range(steps):
            loss = model(idx, labels=idx).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    def model():
        torch.manual_seed(1)
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE)
        pt.apply(m, {0: "strided(4)"})
        return m

    torch._dynamo.reset()
    eager = losses(model())
    compiled = losses(torch.compile(model(), backend="aot_eager"))
    assert eager[-1] < eager[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 if DEVICE == "cpu" else 1e-3)

    torch._dynamo.reset()
    monkeypatch.setattr(pt, "_packed_segments", lambda *args: None)  # these rows are not packed
    explained = torch._dynamo.explain(model())(idx, labels=idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_transformers.py"
    spec = importlib.util.spec_from_file_location("bench_transformers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module, path


def test_bench_smoke_runs_every_row():
    """bench/bench_transformers.py --smoke (a tiny model on the CPU, patterncc's
    reference backend): every row but Flex is measured and in the table, and
    patterncc's causal row generates sdpa's greedy tokens."""
    _, path = _bench_module()
    run = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = run.stdout[run.stdout.index("| attention |"):]
    for name in ("sdpa", "patterncc", "patterncc strided(128) / causal", "patterncc sliding_window(4096)"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        fwd_bwd, prefill, per_token = (float(x) for x in row.split("|")[2:5])  # per token: a difference, noisy here
        assert fwd_bwd > 0 and prefill > 0 and "failed" not in row, row
    assert "| flex_attention | - | - | - |" in table and "skipped" in table
    assert "greedy tokens as sdpa's: the first 4 of 4" in table  # the patterncc row, its own causal masking


def test_bench_row_that_fails_leaves_its_error():
    bench, _ = _bench_module()
    torch.manual_seed(0)
    cfg = _config("llama")
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    args = argparse.Namespace(context=8, new_tokens=2, repeats=1, warmup=0, checkpointing="auto")
    row = bench.Row("bad", "patterncc", {0: "causal & local(0)"})
    bench.measure(model, row, torch.randint(1, 97, (1, 8)), args, bench.Clock(torch, "cpu"), torch, pt)
    assert row.ms == {} and row.notes[0].startswith("failed: PatternValueError:"), row.notes
    assert "local: `w` must be >= 1, got w=0" in row.notes[0], row.notes
    good = bench.Row("patterncc", "patterncc")
    bench.measure(model, good, torch.randint(1, 97, (1, 8)), args, bench.Clock(torch, "cpu"), torch, pt)
    assert set(good.ms) == {"fwd+bwd", "prefill", "per token"}, good.notes
