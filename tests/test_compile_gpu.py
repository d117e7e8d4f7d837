"""patterncc on the card inside torch.compile and CUDA graphs (skips without CUDA).

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_compile_gpu.py

- ``torch.compile(fullgraph=True)`` with inductor of the Sparse Transformer
  and of a plain function that calls ``pcc.compile(pat)(q, k, v)`` itself,
  with queries as many as the keys and fewer (the last positions): one
  graph, eager's outputs and gradients;
- lengths 1000, 3000 and 5000 with ``dynamic=True``: one compilation;
- a whole training step (forward, backward, Adam) captured with
  ``torch.cuda.graphs`` and replayed on new batches, and a model compiled
  with ``mode="reduce-overhead"`` (CUDA graph trees, no skips), both against
  the same steps run eagerly;
- packed batches (``cu_seqlens``) through a compiled model, and a decoding
  step from a KV cache (device lengths) under ``mode="reduce-overhead"``;
- warm eager calls of the record's five patterns, forward and backward,
  under the profiler: no host wait for the card and no host-device copy.

Eager and compiled run the same op (the same kernels, in the same order);
what inductor fuses around it (LayerNorm, GELU, the loss) differs in its
last bits, hence 1e-4 (float32; relative and absolute) on logits, gradients
and parameters after the steps. The patterns are planned ones (strided and
fixed: components in residue order, gathered summary columns), so every
launch kind is captured.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import patterncc as pcc  # noqa: E402
from patterncc.nn import SparseTransformer  # noqa: E402

from kernel_env import triton_specializations  # noqa: E402

VOCAB = 97
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed=0, recompute=False, mode="interleaved", max_len=5120):
    torch.manual_seed(seed)
    return SparseTransformer(VOCAB, 128, 2, 4, ["strided(128)", "fixed(128, 32)"], mode=mode, max_len=max_len,
                             recompute=recompute, backend="triton").cuda()


def _batch(n, seed, B=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, n), device="cuda", generator=g)
    return idx, torch.randint(0, VOCAB, (B, n), device="cuda", generator=g)


def _loss(model, idx, targets):
    return F.cross_entropy(model(idx).float().flatten(0, 1), targets.flatten())


def _grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, idx, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("mode,recompute", [("interleaved", False), ("merged", True), ("multihead", True)])
def test_inductor_model_equals_eager(mode, recompute):
    model = _model(mode=mode, recompute=recompute)
    idx, targets = _batch(1000, seed=1)
    explained = torch._dynamo.explain(model)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got, want = _grads(compiled, idx, targets), _grads(model, idx, targets)
    torch.testing.assert_close(got[0], want[0], **TOL)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_inductor_function_equals_eager(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 8, 3000, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 3000, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
            for _ in range(2))

    def f(q, k, v):
        attn = pcc.compile("fixed(128, 32)")  # inside: Dynamo takes it as a constant, the parser is not traced
        o, lse = attn(q, k, v, return_lse=True)
        short = attn(q[:, :, -700:], k, v)  # the last 700 queries of the 3000 keys
        return (o.float().square().sum() + lse.sum() + short.float().square().sum()) / q.numel()

    def run(fn):
        for x in (q, k, v):
            x.grad = None
        loss = fn(q, k, v)
        loss.backward()
        return loss.detach(), [x.grad.clone() for x in (q, k, v)]

    explained = torch._dynamo.explain(f)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    got, want = run(torch.compile(f, fullgraph=True, backend="inductor")), run(f)
    torch.testing.assert_close(got[0], want[0], **TOL)
    # The same kernels; dO comes from inductor's fused loss gradient, rounded to the dtype.
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tol)


def test_lengths_1000_3000_5000_compile_once():
    model = _model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for n in (1000, 3000, 5000):
        idx, targets = _batch(n, seed=n)
        got, want = _grads(compiled, idx, targets), _grads(model, idx, targets)
        torch.testing.assert_close(got[0], want[0], **TOL)
        frames.append(counter.frame_count)
    assert frames == [frames[0]] * 3, frames


def test_new_lengths_compile_no_kernel():
    """Eager forward and backward at lengths that are and are not multiples of 16, and 1: after the
    first, Triton compiles nothing (no kernel specializes on a length: test_packed_triton.py checks
    the arguments from the source; lse's and delta's rows are padded to a multiple of 16)."""
    attn = pcc.compile("sliding_window(256)")  # (one set of kernels at every length: nothing planned per length)
    seen = []
    for n in (1000, 1024, 1, 3000, 4096, 77):
        q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        attn(q, k, v).float().sum().backward()
        pcc.wait_for_kernels()  # a first call's stand-in kernels ran while the pattern's own compiled
        seen.append(triton_specializations())
    assert seen[0] > 0 and seen == [seen[0]] * len(seen), seen


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)


def test_training_step_captured_in_a_cuda_graph():
    model = _model(max_len=1024)
    eager = copy.deepcopy(model)
    opt, eager_opt = _adam(model), _adam(eager)
    static_idx, static_targets = _batch(1000, seed=3)

    def step(model, opt, idx, targets):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, idx, targets)
        loss.backward()
        opt.step()
        return loss

    # Warm up on a side stream (first calls build layouts, tables and kernels), eagerly on the copy too.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, opt, static_idx, static_targets)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, eager_opt, static_idx, static_targets)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _loss(model, static_idx, static_targets)
        static_loss.backward()
        opt.step()

    for seed in (4, 5, 6):
        idx, targets = _batch(1000, seed=seed)
        static_idx.copy_(idx)
        static_targets.copy_(targets)
        graph.replay()
        want = step(eager, eager_opt, idx, targets)
        torch.testing.assert_close(static_loss, want, **TOL)
    for p, w in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, w, **TOL)


def test_captured_tables_outlive_the_caches(monkeypatch):
    """A replay reads the device tables it was captured with, whatever the
    per-shape caches have evicted since (a replay holds no reference)."""
    from patterncc.backends.triton import planned, runtime

    model = _model(max_len=2048)
    idx, targets = _batch(1000, seed=7)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(idx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(idx)
        graph.replay()
        want = static_logits.clone()
        monkeypatch.setattr(runtime, "_CACHE_ENTRIES", 1)
        monkeypatch.setattr(planned, "_LAUNCH_ENTRIES", 1)
        for n in (1500, 2000):  # other lengths evict length 1000's tables from every cache
            model(_batch(n, seed=n)[0])
        torch.cuda.empty_cache()
        junk = torch.full((1 << 28,), -1, dtype=torch.int32, device="cuda")  # reuse freed memory
        del junk
        graph.replay()
    torch.testing.assert_close(static_logits, want, atol=0, rtol=0)


def test_reduce_overhead_training_step():
    from torch._dynamo.utils import counters

    model = _model(max_len=1024)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=1e-2)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for seed in range(5):
        idx, targets = _batch(1000, seed=10 + seed)
        torch.compiler.cudagraph_mark_step_begin()
        losses = []
        for m, o in ((compiled, opt), (eager, eager_opt)):
            o.zero_grad(set_to_none=True)
            loss = _loss(m, idx, targets)
            loss.backward()
            o.step()
            losses.append(loss.detach().clone())
        torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for p, w in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, w, **TOL)


def test_packed_batches_under_inductor_compile_once():
    """Packed batches (cu_seqlens on the device) through a compiled model:
    eager's loss and gradients, one compilation for batches of other totals
    and counts."""
    model = _model()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda idx, cu: model(idx, cu_seqlens=cu), fullgraph=True, backend=counter,
                             dynamic=True)

    def grads(run, idx, targets, cu):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(run(idx, cu).float().flatten(0, 1), targets.flatten())
        loss.backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.detach(), out

    frames = []
    for seed, lengths in enumerate(([700, 1, 1300, 45, 333], [2048, 0, 999, 17, 600, 1200, 5])):
        idx, targets = _batch(sum(lengths), seed=seed, B=1)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        got = grads(compiled, idx, targets, cu)
        want = grads(lambda idx, cu: model(idx, cu_seqlens=cu), idx, targets, cu)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, **TOL)
        frames.append(counter.frame_count)
    assert frames == [frames[0]] * 2, frames


def test_packed_batches_under_reduce_overhead():
    """Packed batches through a model compiled with mode="reduce-overhead":
    the packed ops read their offsets on the host, and their cudagraph_unsafe
    tag keeps them out of the captured graphs, so the steps run (eager's
    outputs) instead of failing at capture."""
    model = _model()
    compiled = torch.compile(lambda idx, cu: model(idx, cu_seqlens=cu), mode="reduce-overhead")
    for seed, lengths in enumerate(([700, 1, 1300, 45, 333],) * 3 + ([2048, 0, 999, 17],)):
        idx, _ = _batch(sum(lengths), seed=seed, B=1)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        with torch.no_grad():
            got = compiled(idx, cu).clone()
            want = model(idx, cu_seqlens=cu)
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("source", ["strided(128)", "sliding_window(256) with softcap(30)"])
def test_decoding_step_under_reduce_overhead(source):
    """A decoding step from a KV cache (lengths on the device) compiled with
    mode="reduce-overhead" (CUDA graph trees): the eager step's output, step
    after step as the lengths (one device tensor, updated in place) grow."""
    attn = pcc.compile(source)
    B, H, Hkv, D, max_len = 2, 8, 2, 64, 4096
    g = torch.Generator(device="cuda").manual_seed(3)
    k, v = (torch.randn(B, Hkv, max_len, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([1500, 3001], dtype=torch.int32, device="cuda")
    step = torch.compile(lambda q, lens: attn(q, k, v, cache_seqlens=lens), mode="reduce-overhead",
                         fullgraph=True, dynamic=False)
    with torch.no_grad():
        for i in range(4):
            q = torch.randn(B, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
            got = step(q, lens).clone()
            want = attn(q, k, v, cache_seqlens=lens)
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
            lens += 1  # in place: the captured graph reads the same tensor


# The runtime API calls that hold the host until the card catches up, or move
# bytes between host and device; a warm call (its length seen before) makes none.
_HOST_WAITS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaHostAlloc", "cudaMallocHost")


def _waits_in(fn) -> Counter:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if any(w in e.name for w in _HOST_WAITS))


def _host_waits(fn) -> dict:
    """The host waits and copies of three calls of ``fn``, less those the
    profiler makes itself (it synchronizes the device as it starts and stops)."""
    fn()
    torch.cuda.synchronize()
    return dict(_waits_in(fn) - _waits_in(lambda: None))


@pytest.mark.parametrize("pattern", ["causal", "sliding_window(1024)", "local_global(512,64)",
                                     "fixed(128,32)", "strided(128)"])
def test_warm_calls_neither_wait_for_the_card_nor_copy(pattern):
    """A seen length's forward and backward (natural order and planned) only
    launch kernels: a host wait or a table upload per call would make the
    call host-bound and could not be captured."""
    attn = pcc.compile(pattern, backend="triton")
    q, k, v = (torch.randn(1, 4, 2000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def step():
        attn(q, k, v).backward(do)

    assert _host_waits(lambda: q.sum().item()) != {}  # the probe sees a host wait where there is one
    assert _host_waits(lambda: attn(q.detach(), k.detach(), v.detach())) == {}
    assert _host_waits(step) == {}


_SAVE_ON_THE_CARD = """
import sys
import torch
import patterncc as pcc
from patterncc.nn import SparseTransformer

torch.manual_seed(0)
model = SparseTransformer(97, 128, 2, 4, ["strided(128)", "fixed(128, 32)"], mode="interleaved", max_len=5120,
                          backend="triton").cuda().eval()
idx = torch.randint(0, 97, (1, 3000), device="cuda")
n = torch.export.Dim("n", min=2, max=5120)
with torch.no_grad():
    program = torch.export.export(model, (idx,), dynamic_shapes={"idx": {1: n}})
    other = torch.randint(0, 97, (1, 4321), device="cuda")
    torch.save(dict(idx=idx, other=other, want=model(idx), want_other=model(other)), sys.argv[2])
torch.export.save(program, sys.argv[1])
"""

_LOAD_ON_THE_CARD = """
import sys
import torch
import patterncc as pcc  # after torch: the ops are registered

decoys = [pcc.compile(text, backend="triton") for text in ("causal", "fixed(128, 32)", "strided(128)")]
program = torch.export.load(sys.argv[1]).module()
saved = torch.load(sys.argv[2])
with torch.no_grad():
    for name in ("idx", "other"):
        err = (program(saved[name]) - saved["want" if name == "idx" else "want_other"]).abs().max().item()
        print(name, err)
        assert err <= 1e-4, err
"""


def test_an_exported_model_runs_on_the_card_in_another_process(tmp_path):
    """torch.export of the model with the Triton kernels, saved, and loaded
    in a process that made other attentions first: the same outputs (the
    op names its attention by its text, not by a per-process number)."""
    import os
    import subprocess
    import sys

    paths = [str(tmp_path / "model.pt2"), str(tmp_path / "io.pt")]
    for script in (_SAVE_ON_THE_CARD, _LOAD_ON_THE_CARD):
        done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True,
                              env=dict(os.environ), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
