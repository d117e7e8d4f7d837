"""``model.generate`` with ``attn_implementation="patterncc"`` on the Triton
backend (the interpreter on the CPU, the card with CUDA): each new token's
attention is served by the query-rows kernel from transformers' cache, not
by recomputing the sequence, and the greedy tokens equal eager attention's."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install patterncc[hf]) is not installed")

import patterncc.integrations.transformers as pt  # noqa: E402
from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend():
    pt.register(backend="triton")
    yield
    pt.register()


@pytest.mark.parametrize("user_pattern", [None, "strided(4)"])
def test_generate_takes_the_query_rows_kernel(triton_backend, monkeypatch, user_pattern):
    """Mistral (a sliding window of 7, shorter than the 9 + 8 tokens) and,
    on layer 0, a user pattern: every decode step of every layer is one
    query-rows call with one query over the layer's cache (the last keys of
    a sliding layer, as much as transformers keeps; every key so far on the
    user pattern's layer); the prompt's forward is not. Greedy output equals
    eager's (with a user pattern: the reference backend's, same pattern)."""
    from patterncc.backends.triton.decode import RowsAttention

    calls = []
    original = RowsAttention.__call__

    def counted(self, q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return original(self, q, k, v, *args, **kwargs)

    monkeypatch.setattr(RowsAttention, "__call__", counted)
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=64, sliding_window=7)
    torch.manual_seed(0)
    want_impl = "eager" if user_pattern is None else pt.NAME
    want_model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=want_impl).to(DEVICE).eval()
    ours = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=pt.NAME).to(DEVICE).eval()
    ours.load_state_dict(want_model.state_dict())
    if user_pattern is not None:
        pt.apply(ours, {0: user_pattern})
        pt.apply(want_model, {0: user_pattern})
    idx = torch.randint(0, 97, (1, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(idx, **kwargs)
        assert len(calls) == 7 * cfg.num_hidden_layers  # new tokens after the first, per layer
        pt.register(backend="reference")
        want = want_model.generate(idx, **kwargs)
    assert all(n_q == 1 for n_q, _ in calls), calls
    layer0 = [n_k for _, n_k in calls[::cfg.num_hidden_layers]]  # the layers run in order at each step
    if user_pattern is not None:
        assert layer0 == list(range(10, 17))
    assert all(7 <= n_k <= 16 for _, n_k in calls), calls
    assert torch.equal(got, want)
