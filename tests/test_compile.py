"""patterncc inside torch.compile: the attention ops and what traces them.

The ops (``patterncc.ops``) pass ``torch.library.opcheck`` and agree with
the float64 reference; ``torch.compile(fullgraph=True)`` of the Sparse
Transformer (every head mode, with and without recomputation) and of a
plain function traces without a graph break and gives eager's outputs and
gradients with ``aot_eager`` and inductor (CPU here), also when the
function calls ``pcc.compile(pat)`` itself (text, parsed pattern or .pat
path) and with fewer queries than keys; lengths marked
dynamic do not recompile; and once a shape has been seen a call does no
host-side work (the CUDA-graph rule: tested on the card in
``test_compile_gpu.py``).

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` at small
shapes (n <= 64, tiles of 16); the reference backend is float64 numpy.
Tolerances are the Triton tests' (absolute, standard normal inputs): fp32
2e-5 for o and lse, 1e-4 for gradients; fp16 4e-3 / 3e-2; bf16 3e-2 /
1.5e-1. Compiled against eager: the same op runs in both, so aot_eager is
exact and inductor (which fuses the layers around it) is held to 1e-5.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


from kernel_env import interpreter_and_cache  # noqa: E402,F401 (autouse: the interpreter and a private cache)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


import patterncc as pcc  # noqa: E402
from patterncc import ops, registry  # noqa: E402
from patterncc.backends.triton import KernelConfig  # noqa: E402
from patterncc.nn import MODES, SparseTransformer  # noqa: E402

TILES16 = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 3e-2), torch.bfloat16: (3e-2, 1.5e-1)}
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}  # o.square() makes some large
BACKENDS = ["reference", "triton"]


def _compiled(source: str, backend: str, **options):
    if backend == "triton":
        options.setdefault("config", TILES16)
    return pcc.compile(source, backend=backend, **options)


def _qkv(n=37, H=4, Hkv=2, D=16, dtype=torch.float32, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=g)
    k, v = (torch.randn(B, Hkv, n, D, generator=g) for _ in range(2))
    return tuple(x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v))


def _op_args(attn, q, k, v, scale=None):
    return (q, k, v, attn.key, attn.backend_for(q), scale, None, None, None, None)


def _outputs_and_grads(fn, inputs):
    """fn(*inputs)'s outputs and the gradients of a loss that reaches o and lse."""
    for x in inputs:
        x.grad = None
    o, lse = fn(*inputs)
    finite = torch.isfinite(lse)
    (o.float().square().sum() + torch.where(finite, lse, 0).float().sum()).backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return (o.detach(), lse.detach()), grads


# ----------------------------------------------------------------------------
# The ops: opcheck, and the float64 reference
# ----------------------------------------------------------------------------

# (pattern, plan, q heads, kv heads, head dim, length): natural and planned
# launches, GQA, a padded head dim, n = 1, rows with no allowed key.
CASES = {
    "natural": ("strided(8)", "natural", 2, 2, 16, 37),
    "planned": ("strided(8)", "planned", 2, 2, 16, 37),
    "planned-fixed-gqa": ("fixed(8, 2)", "planned", 4, 2, 16, 40),
    "planned-gqa": ("strided(8)", "planned", 4, 2, 16, 24),
    "padded-head-dim": ("causal & local(5)", "auto", 2, 1, 24, 21),
    "one-token": ("causal & local(5)", "auto", 2, 2, 16, 1),
    "empty-rows": ("causal & summary(8, 1)", "auto", 2, 2, 16, 19),
}


# opcheck runs each op some ten times (schema, fake tensors, autograd,
# AOT dispatch): the cases that differ in what crosses the boundary.
OPCHECKED = [("reference", "padded-head-dim"), ("triton", "planned-gqa"), ("triton", "padded-head-dim"),
             ("triton", "empty-rows")]


@pytest.mark.parametrize("backend,case", OPCHECKED, ids=["-".join(c) for c in OPCHECKED])
def test_opcheck(backend, case):
    source, plan, H, Hkv, D, n = CASES[case]
    attn = _compiled(source, backend, plan=plan)
    q, k, v = _qkv(n, H, Hkv, D, seed=1)
    torch.library.opcheck(torch.ops.patterncc.attention.default, _op_args(attn, q, k, v))
    with torch.no_grad():
        o, lse = torch.ops.patterncc.attention(*_op_args(attn, q, k, v, scale=0.3))
    do = torch.randn_like(o)
    dlse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0)
    for grads in ((do, None), (None, dlse)):  # (both: test_triton_op_matches_the_reference)
        args = (q.detach(), k.detach(), v.detach(), o, lse, *grads, attn.key, backend, 0.3, None, None, None, None)
        torch.library.opcheck(torch.ops.patterncc.attention_backward.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_op_matches_the_reference(case, dtype):
    source, plan, H, Hkv, D, n = CASES[case]
    inputs = _qkv(n, H, Hkv, D, dtype=dtype, seed=2)
    attn = _compiled(source, "triton", plan=plan)
    got = _outputs_and_grads(lambda q, k, v: torch.ops.patterncc.attention(*_op_args(attn, q, k, v)), inputs)
    ref = pcc.compile(source, backend="reference")
    want = _outputs_and_grads(lambda q, k, v: ref(q.double(), k.double(), v.double(), return_lse=True), inputs)
    tol_o, tol_grad = TOL[dtype]
    torch.testing.assert_close(got[0][0].double(), want[0][0].to(dtype).double(), atol=tol_o, rtol=0)
    torch.testing.assert_close(got[0][1].double(), want[0][1].double(), atol=tol_o, rtol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w.to(dtype).double(), atol=tol_grad, rtol=GRAD_RTOL[dtype])


def test_a_traced_call_is_the_op_and_an_eager_one_is_not(monkeypatch):
    attn = _compiled("strided(8)", "triton", plan="planned")
    q, k, v = _qkv(seed=3)
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda q, k, v: attn(q, k, v))(q, k, v)
    assert [n.target for n in graph.graph.nodes if "patterncc" in str(n.target)] == [
        torch.ops.patterncc.attention.default]

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the op")

    torch.ops.patterncc.attention(*_op_args(attn, q, k, v))  # (the op works here)
    monkeypatch.setattr(ops, "call", refuse)
    attn(q, k, v).sum().backward()  # eager: the launches directly, without the op's dispatch


def test_op_errors_name_the_argument():
    attn = _compiled("strided(8)", "triton")
    q, k, v = _qkv(seed=4)
    with pytest.raises(ValueError, match="v must have k's shape"):
        ops.call(attn, q, k, v[:, :, :5])
    with pytest.raises(TypeError, match="k has dtype torch.float16"):
        ops.call(attn, q, k.half(), v)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        ops.call(attn, q, k, v.numpy(force=True))
    with pytest.raises(TypeError, match="scale must be a real number"):
        ops.call(attn, q, k, v, scale="0.1")
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match="v must have k's shape"):  # the fake's, tracing
        torch.compile(lambda q, k, v: attn(q, k, v), backend="aot_eager", fullgraph=True)(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        torch.ops.patterncc.attention(q, k, v, attn.key, "cuda", None, None, None, None, None)
    with pytest.raises(ValueError, match="names no compiled attention: a key is the text"):
        torch.ops.patterncc.attention(q, k, v, "strided(8)", "triton", None, None, None, None, None)
    broken = registry.PREFIX + '{"pattern": "strided(8"}'
    with pytest.raises(ValueError, match="does not describe a compiled attention"):
        torch.ops.patterncc.attention(q, k, v, broken, "triton", None, None, None, None, None)


def test_an_attention_lives_until_its_backward_pass():
    q, k, v = _qkv(seed=4)
    attn = pcc.compile("strided(8)", backend="reference", dense_limit=11)
    key = attn.key
    out = ops.call(attn, q, k, v)
    del attn  # nothing else holds it now
    gc.collect()
    out.sum().backward()
    assert q.grad.abs().sum() > 0
    assert key not in registry._made  # the backward found it alive, not made again from its key


def test_copies_are_attentions_of_their_own():
    import copy
    import pickle

    attn = _compiled("strided(8)", "reference", plan="planned")
    for other in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert other is not attn and other.impl("reference") is not attn.impl("reference")  # caches of its own
        assert (other.pattern, other.plan_mode, other.options) == (attn.pattern, attn.plan_mode, attn.options)
        assert other.key == attn.key and ops._attention_of(other.key).key == attn.key  # one function, one name


def test_no_host_work_once_a_shape_is_seen(monkeypatch):
    """The CUDA-graph rule, checked where it can be on the CPU: the second
    call of a shape builds no plan, layout, module or table, eager or
    through the op, and no op in the op's body reads a tensor on the host
    (``.item()``, ``bool(t)``, ``.cpu()``)."""
    from patterncc.backends.triton import runtime
    from patterncc.scores import ScoreTerms
    from torch.utils._python_dispatch import TorchDispatchMode

    attn = _compiled("fixed(8, 2)", "triton", plan="planned")
    q, k, v = _qkv(seed=5)
    o, lse = attn(q, k, v, return_lse=True)
    (o.sum() + lse.sum()).backward()

    def refuse(*args, **kwargs):
        raise AssertionError("host-side setup on a call of a shape already seen")

    for owner, name in ((runtime.TritonAttention, "prepare"), (runtime.TritonAttention, "layout"),
                        (runtime.TritonAttention, "kernels"), (runtime._DeviceTables, "build"),
                        (attn.impl("triton"), "make_inner"), (torch, "from_numpy"), (torch, "tensor")):
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr("patterncc.planned.build_plan", refuse)
    o, lse = attn(q, k, v, return_lse=True)  # the eager path (no dispatch mode: see below)
    (o.sum() + lse.sum()).backward()
    seen = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops():
        o, lse = ops._triton_forward(attn, q, k, v, None, ScoreTerms())
        for do, dlse in ((torch.ones_like(o), None), (torch.ones_like(o), torch.ones_like(lse))):
            ops._triton_backward(attn, q, k, v, o, lse, do, dlse, None, ScoreTerms())
    host = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
            torch.ops.aten._to_copy.default, torch.ops.aten.lift_fresh.default, torch.ops.aten.nonzero.default}
    assert not seen & host, seen & host


# ----------------------------------------------------------------------------
# torch.compile: graph breaks, eager equality, recompiles
# ----------------------------------------------------------------------------


def _model(backend: str, mode: str = "interleaved", recompute: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    patterns = ["causal & local(5)", "causal & stride(4)"]
    return SparseTransformer(31, 16, 2, 2, patterns, mode=mode, max_len=128, recompute=recompute,
                             backend=backend).to(DEVICE)


def _model_step(model, idx):
    """Logits and parameter gradients of one step."""
    model.zero_grad()
    logits = model(idx)
    logits.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return logits.detach(), grads


def _idx(n: int, seed: int = 0):
    return torch.randint(0, 31, (2, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("mode", MODES)
def test_model_traces_without_graph_breaks(mode, recompute):
    model = _model("reference", mode, recompute)
    explained = torch._dynamo.explain(model)(_idx(24))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    calls = [node for graph in explained.graphs for sub in graph.modules() if isinstance(sub, torch.fx.GraphModule)
             for node in sub.graph.nodes if node.op == "call_function" and "patterncc" in str(node.target)]
    assert len(calls) == 2  # one attention op per layer (inside the checkpoint's body when recomputed)


def test_triton_model_traces_without_graph_breaks():
    explained = torch._dynamo.explain(_model("triton", "multihead", True))(_idx(20))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# inductor on the CPU compiles C++ for up to a minute: the model once, on the
# reference op (the same fake implementation and registration as the Triton one's).
COMPILERS = [("reference", "aot_eager"), ("triton", "aot_eager"), ("reference", "inductor")]


@pytest.mark.parametrize("backend,compiler", COMPILERS, ids=["-".join(c) for c in COMPILERS])
def test_compiled_model_equals_eager(backend, compiler):
    mode, recompute = ("multihead", True) if backend == "triton" else ("merged", False)
    model = _model(backend, mode, recompute)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    idx = _idx(29, seed=1)
    got, want = _model_step(compiled, idx), _model_step(model, idx)
    tol = dict(atol=0, rtol=0) if compiler == "aot_eager" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("backend,compiler", COMPILERS + [("triton", "inductor")],
                         ids=["-".join(c) for c in COMPILERS + [("triton", "inductor")]])
def test_compiled_function_equals_eager(backend, compiler):
    attn = _compiled("fixed(8, 2)", backend, plan="planned")

    def f(q, k, v):
        o, lse = attn(q, k, v, scale=0.2, return_lse=True)
        return torch.tanh(o), lse

    inputs = _qkv(24, 4, 2, 16, seed=6)
    explained = torch._dynamo.explain(f)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    got = _outputs_and_grads(torch.compile(f, fullgraph=True, backend=compiler), inputs)
    want = _outputs_and_grads(f, inputs)
    tol = dict(atol=0, rtol=0) if compiler == "aot_eager" else dict(atol=1e-5, rtol=1e-5)
    for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
        torch.testing.assert_close(g, w, **tol)


def test_a_pattern_with_a_softcap_traces():
    """A pattern that carries a score term (``with softcap(c)``): one graph, eager's outputs and gradients."""
    attn = _compiled("strided(8) with softcap(3)", "reference")

    def f(q, k, v):
        return attn(q, k, v, return_lse=True)

    inputs = _qkv(21, 4, 2, 16, seed=15)
    explained = torch._dynamo.explain(f)(*inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    got = _outputs_and_grads(torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True), inputs)
    want = _outputs_and_grads(f, inputs)
    for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend,how", [("reference", "dynamic=True"), ("reference", "mark_dynamic"),
                                         ("triton", "dynamic=True")])
def test_new_lengths_do_not_recompile(backend, how):
    """Three lengths, one compilation: the op reads the length from its inputs."""
    model = _model(backend, "interleaved", backend == "reference")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True if how == "dynamic=True" else None)
    lengths = (20, 33, 47)
    frames = []
    for i, n in enumerate(lengths):
        idx = _idx(n, seed=i)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(idx, 1)
        got, want = _model_step(compiled, idx), _model_step(model, idx)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * len(lengths), frames


def test_plain_function_over_lengths_does_not_recompile():
    attn = _compiled("strided(8)", "triton", plan="planned")
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k, v: attn(q, k, v, return_lse=True), fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for n in (19, 33, 50):
        inputs = _qkv(n, 2, 2, 16, seed=n)
        got, want = _outputs_and_grads(f, inputs), _outputs_and_grads(lambda *x: attn(*x, return_lse=True), inputs)
        for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        frames.append(counter.frame_count)
    assert frames == [frames[0]] * 3, frames


# ----------------------------------------------------------------------------
# pcc.compile inside the compiled function, short queries
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["text", "parsed", "path"])
def test_compile_inside_the_compiled_function(given, tmp_path):
    """``pcc.compile(pat)(q, k, v)`` in the function itself, the pattern as
    source text, a parsed pattern or a .pat path: one graph, no break (the
    parser and the layout code run beside the trace, not in it), eager's
    outputs and gradients, and no recompile for new lengths."""
    path = tmp_path / "strided8.pat"
    path.write_text("pattern strided8(l = 8) = causal & (local(l) | stride(l))\n")
    pat = {"text": "strided(8)", "parsed": pcc.parse("strided(8)"), "path": path}[given]
    # The kernels once (the interpreter is slow); the compiling is the same for every backend.
    options = dict(backend="triton", plan="planned", config=TILES16) if given == "text" else dict(backend="reference")

    def f(q, k, v):
        o, lse = pcc.compile(pat, **options)(q, k, v, return_lse=True)
        return torch.tanh(o), lse

    explained = torch._dynamo.explain(f)(*_qkv(24, 4, 2, 16, seed=7))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for n in (24, 37, 50):
        gc.collect()  # the attention made while tracing must outlive the trace: its graph names it
        inputs = _qkv(n, 4, 2, 16, seed=n)
        got, want = _outputs_and_grads(compiled, inputs), _outputs_and_grads(f, inputs)
        for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        frames.append(counter.frame_count)
    assert frames == [1, 1, 1], frames


SHORT = [("reference", 5, 37), ("triton", 1, 20)]  # the kernels once: the interpreter is slow


@pytest.mark.parametrize("backend,n_q,n_k", SHORT, ids=[f"{b}-{q}-of-{k}" for b, q, k in SHORT])
def test_short_queries_are_traced(backend, n_q, n_k):
    """Queries fewer than keys (the last positions) inside a compiled
    function: one graph, no break, the float64 reference's outputs and
    gradients (exactly eager's on aot_eager), one compilation for new
    lengths (n_q = 1 stays 1: torch specializes sizes 0 and 1)."""
    attn = _compiled("fixed(8, 2)", backend, plan="planned")
    ref = pcc.compile("fixed(8, 2)", backend="reference")

    def f(q, k, v):
        return attn(q, k, v, return_lse=True)

    def inputs(n_q, n_k, seed):
        q, k, v = _qkv(n_k, 4, 2, 16, seed=seed)
        return q.detach()[:, :, n_k - n_q:].clone().requires_grad_(), k, v

    explained = torch._dynamo.explain(f)(*inputs(n_q, n_k, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    for step, (nq, nk) in enumerate(((n_q, n_k), (n_q + 2 * (n_q > 1), n_k + 3))):
        x = inputs(nq, nk, seed=step)
        got, eager = _outputs_and_grads(compiled, x), _outputs_and_grads(f, x)
        for g, w in zip((*got[0], *got[1]), (*eager[0], *eager[1])):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        want = _outputs_and_grads(lambda q, k, v: ref(q.double(), k.double(), v.double(), return_lse=True), x)
        for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
            torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-5)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------
# Packed batches (cu_seqlens) inside the compiled function
# ----------------------------------------------------------------------------


def _packed(lengths, H=4, Hkv=2, D=16, seed=0):
    """q, k, v [1, H, total, D] of a packed batch, and its int32 cu_seqlens."""
    q, k, v = _qkv(sum(lengths), H, Hkv, D, B=1, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return (q, k, v), cu


# (pattern, backend): a fused packed batch on the Triton backend (strided: planned, length-free), one whose
# pattern reads n (run one length at a time: the op's backward recomputes), and the reference backend.
PACKED = [("strided(8)", "triton"), ("causal & local(isqrt(n))", "triton"), ("strided(8)", "reference")]


@pytest.mark.parametrize("source,backend", PACKED, ids=["-".join(c) for c in PACKED])
def test_packed_batches_are_traced(source, backend):
    """``attn(q, k, v, cu_seqlens=cu)`` in a compiled function: one graph, no
    break, eager's outputs and gradients exactly (the same op runs), and one
    compilation for batches of other totals and counts (the op reads the
    offsets when it runs). A sequence of length 1 and an empty one included."""
    attn = _compiled(source, backend, plan="planned")

    def f(q, k, v, cu):
        o, lse = attn(q, k, v, cu_seqlens=cu, return_lse=True)
        return torch.tanh(o), lse

    # counts of sequences that make cu_seqlens no size q has (Dynamo would guard on a coincidence)
    inputs, cu = _packed([9, 1, 14, 5], seed=10)
    explained = torch._dynamo.explain(f)(*inputs, cu)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    for step, lengths in enumerate(([9, 1, 14, 5], [20, 0, 3, 11, 2, 6], [7, 30])):
        inputs, cu = _packed(lengths, seed=step)
        got = _outputs_and_grads(lambda q, k, v: compiled(q, k, v, cu), inputs)
        want = _outputs_and_grads(lambda q, k, v: f(q, k, v, cu), inputs)
        for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_model_is_traced(backend):
    """A Sparse Transformer on packed batches, compiled whole (fullgraph):
    eager's logits and parameter gradients exactly, one compilation for
    batches of other totals and counts."""
    model = _model(backend, "interleaved", backend == "reference")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda idx, cu: model(idx, cu_seqlens=cu), fullgraph=True, backend=counter,
                             dynamic=True)

    def step(run, idx, cu):
        model.zero_grad()
        logits = run(idx, cu)
        logits.float().square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return logits.detach(), grads

    frames = []
    for i, lengths in enumerate(([9, 1, 14, 5, 3], [20, 0, 3, 11, 2, 6, 7], [30, 8])):
        idx = _idx(sum(lengths), seed=i)[:1]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        got, want = step(compiled, idx, cu), step(lambda idx, cu: model(idx, cu_seqlens=cu), idx, cu)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        frames.append(counter.frame_count)
    # (the first call may count twice: Dynamo restarts its analysis of a frame once)
    assert frames[0] >= 1 and frames == [frames[0]] * 3, frames


def test_packed_dense_model_is_traced():
    """A dense model (``patterns=None``) on a packed batch: eagerly SDPA per
    sequence; compiled (fullgraph), the causal pattern's packed op, with no
    graph break and the same logits and gradients (to float32 rounding: two
    kernels)."""
    torch.manual_seed(3)
    model = SparseTransformer(31, 16, 2, 2, None, max_len=128, backend="reference").to(DEVICE)
    compiled = torch.compile(lambda idx, cu: model(idx, cu_seqlens=cu), fullgraph=True, backend="aot_eager",
                             dynamic=True)
    lengths = [9, 0, 14, 5, 3]
    idx = _idx(sum(lengths), seed=4)[:1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    explained = torch._dynamo.explain(lambda idx, cu: model(idx, cu_seqlens=cu))(idx, cu)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    results = []
    for run in (compiled, lambda idx, cu: model(idx, cu_seqlens=cu)):
        model.zero_grad()
        logits = run(idx, cu)
        logits.float().square().mean().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_packed_batches_through_the_op_match_each_sequence_alone():
    """The op's packed result against each sequence's own call (reference,
    float64), output, lse and gradients, including a score term's."""
    attn = pcc.compile("causal & local(isqrt(n))", backend="reference")
    lengths = [6, 1, 13]
    (q, k, v), cu = _packed(lengths, seed=11)
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda q, k, v, s: attn(q, k, v, cu_seqlens=cu, sinks=s, return_lse=True),
                             fullgraph=True, backend="aot_eager")
    got = _outputs_and_grads(lambda q, k, v: compiled(q, k, v, sinks), (q, k, v))

    def alone(q, k, v):
        outs = [attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], sinks=sinks, return_lse=True)
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat([o for o, _ in outs], 2), torch.cat([lse for _, lse in outs], 2)

    sinks.grad = None
    compiled(q, k, v, sinks)[0].sum().backward()
    got_sinks = sinks.grad.clone()
    sinks.grad = None
    alone(q, k, v)[0].sum().backward()
    torch.testing.assert_close(got_sinks, sinks.grad, atol=1e-12, rtol=1e-10)
    want = _outputs_and_grads(alone, (q, k, v))
    for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_packed_op_opcheck():
    attn = _compiled("strided(8)", "reference")
    (q, k, v), cu = _packed([5, 1, 9], seed=12)
    for op in (torch.ops.patterncc.attention_packed, torch.ops.patterncc.attention):  # (the plain op takes cu too)
        torch.library.opcheck(op.default, (*_op_args(attn, q, k, v), cu))
    with torch.no_grad():
        o, lse = torch.ops.patterncc.attention_packed(*_op_args(attn, q, k, v), cu)
    args = (q.detach(), k.detach(), v.detach(), o, lse, torch.randn_like(o), None, attn.key, "reference", None,
            None, None, None, None, cu)
    torch.library.opcheck(torch.ops.patterncc.attention_packed_backward.default, args)


def test_packed_calls_stay_out_of_cuda_graphs():
    """A packed call reads its offsets on the host: its ops carry the tag by
    which inductor keeps an op out of its CUDA graphs; unpacked calls' ops
    do not, and a traced packed call, forward and backward, uses the packed ones."""
    unsafe = torch.Tag.cudagraph_unsafe
    assert unsafe in torch.ops.patterncc.attention_packed.default.tags
    assert unsafe in torch.ops.patterncc.attention_packed_backward.default.tags
    for name in ("attention", "attention_backward", "attention_rows"):
        assert unsafe not in getattr(torch.ops.patterncc, name).default.tags
    attn = _compiled("strided(8)", "triton", plan="planned")
    (q, k, v), cu = _packed([9, 1, 14, 5], seed=13)
    graphs = []

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    run = torch.compile(lambda q, k, v, cu: attn(q, k, v, cu_seqlens=cu), backend=backend, fullgraph=True)
    run(q, k, v, cu).sum().backward()
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert "patterncc.attention_packed.default" in targets and "patterncc.attention_packed_backward.default" in targets
    assert not any(t in ("patterncc.attention.default", "patterncc.attention_backward.default") for t in targets)


def test_traced_packed_calls_name_their_errors():
    attn = _compiled("strided(8)", "reference")
    (q, k, v), cu = _packed([5, 9], seed=13)
    run = torch.compile(lambda q, k, v, cu: attn(q, k, v, cu_seqlens=cu), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="batch size 1"):
        run(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu)
    with pytest.raises(Exception, match="cu_seqlens"):
        run(q, k, v, torch.tensor([0, 5, 13], dtype=torch.int32))  # ends short of the 14 tokens


DECODE = [("strided(8)", "reference"), ("strided(8)", "triton"), ("causal & local(6) with softcap(3)", "triton")]


def _pages(x, page: int, order: torch.Tensor):
    """A cache ``[B, Hkv, max_len, D]`` as a page pool in the given page order, and its int32 table."""
    B, Hkv, max_len, D = x.shape
    pages = max_len // page
    pool = x.view(B, Hkv, pages, page, D).transpose(1, 2).reshape(B * pages, Hkv, page, D)
    shuffled = torch.empty_like(pool)
    shuffled[order] = pool
    return shuffled, order.view(B, pages).to(torch.int32)


@pytest.mark.parametrize("source,backend", DECODE, ids=["-".join(c) for c in DECODE])
def test_decoding_from_a_cache_is_traced(source, backend):
    """``attn(q, k_cache, v_cache, cache_seqlens=lens)`` under torch.no_grad
    in a compiled function: one graph, no break, eager's output and lse
    exactly, and one compilation while the lengths (a tensor) change step by
    step, rows of different lengths included (the op reads them when it runs)."""
    attn = _compiled(source, backend, plan="planned")

    def step(q, k, v, lens):
        return attn(q, k, v, cache_seqlens=lens, return_lse=True)

    B, H, Hkv, D, max_len = 2, 4, 2, 16, 40
    g = torch.Generator().manual_seed(14)
    k, v = (torch.randn(B, Hkv, max_len, D, generator=g).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        first = (torch.randn(B, H, 1, D, generator=g).to(DEVICE), torch.tensor([9, 23], dtype=torch.int32))
        explained = torch._dynamo.explain(step)(first[0], k, v, first[1])
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=True)
        frames = []
        for lens in ([9, 23], [10, 24], [31, 2]):
            q = torch.randn(B, H, 1, D, generator=g).to(DEVICE)
            lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            got, want = compiled(q, k, v, lens), step(q, k, v, lens)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
            frames.append(counter.frame_count)
        assert frames[0] >= 1 and frames == [frames[0]] * 3, frames
        # a paged cache (block_table) through the same op: the contiguous cache's result
        order = torch.randperm(B * max_len // 8, generator=g).to(DEVICE)
        (k_pool, table), (v_pool, _) = _pages(k, 8, order), _pages(v, 8, order)
        paged = torch.compile(lambda q, lens: attn(q, k_pool, v_pool, cache_seqlens=lens, block_table=table,
                                                   return_lse=True), fullgraph=True, backend="aot_eager")
        got, want = paged(q, lens), step(q, k, v, lens)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_decoding_steps_of_the_model(backend):
    """The model's cached forward, compiled whole: the prompt's step and every
    new token's step give eager's logits, greedy tokens match, and the steps
    after the first decode one do not recompile as the cache grows."""
    model = _model(backend).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda idx, cache: model(idx, cache), fullgraph=True, backend=counter)
    prompt = _idx(7, seed=16)
    with torch.no_grad():
        caches = model.new_cache(2), model.new_cache(2)
        step = (prompt, prompt)
        frames = []
        # Triton: the traced step passes the lengths as a device tensor, the eager one as host
        # integers, and the query-rows kernel splits the two differently: fp32 rounding apart.
        tol = dict(atol=0, rtol=0) if backend == "reference" else dict(atol=1e-6, rtol=1e-6)
        for _ in range(6):
            got, want = compiled(step[0], caches[0]), model(step[1], caches[1])
            torch.testing.assert_close(got, want, **tol)
            step = (got[:, -1:].argmax(-1), want[:, -1:].argmax(-1))
            assert torch.equal(step[0], step[1])
            frames.append(counter.frame_count)
    assert caches[0].length == caches[1].length == 7 + 5
    # the prompt's shape, then one decode step whose cache length Dynamo then keeps symbolic
    assert frames[2:] == [frames[2]] * 4 and frames[2] <= 3, frames


def test_traced_calls_name_what_they_cannot_take():
    attn = _compiled("strided(8)", "reference")
    q, k, v = _qkv(20, seed=9)
    with pytest.raises(Exception, match="q's sequence length 20 is longer than k's and v's 12"):
        torch.compile(lambda q, k, v: attn(q, k, v), backend="aot_eager", fullgraph=True)(q, k[:, :, :12], v[:, :, :12])
    lens = torch.tensor([20, 15], dtype=torch.int32)
    decode = lambda q, k, v: attn(q[:, :, -1:], k, v, cache_seqlens=lens)  # noqa: E731
    with pytest.raises(NotImplementedError, match="traced for decoding only, without gradients"):
        torch.compile(decode, backend="aot_eager")(q, k, v)
    with pytest.raises(Exception, match="traced for decoding only, without gradients"):
        torch.compile(decode, backend="aot_eager", fullgraph=True)(q, k, v)  # (Dynamo's error quotes it)
    with pytest.raises(Exception, match="unknown name `locl`"):  # the parser's error, raised while tracing
        torch.compile(lambda q, k, v: pcc.compile("causal & locl(4)")(q, k, v), backend="aot_eager",
                      fullgraph=True)(q, k, v)


@pytest.mark.parametrize("traced", [False, True], ids=["op", "compiled"])
def test_packed_offsets_are_read_once_per_tensor(monkeypatch, traced):
    """Reading a device tensor on the host waits for the GPU: the offsets of
    one cu_seqlens tensor are read once, then reused by every layer's forward
    and by the backward ops; another tensor, or the same one changed in
    place, is read again. (A CPU tensor is a view, never kept: the test
    treats CPU reads as a device's.)"""
    from patterncc import ops
    from patterncc.backends.reference import checks

    reads = []
    real = torch.Tensor.cpu

    def counted(t, *args, **kwargs):
        reads.append(t)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(checks, "_reads_wait", lambda t: True)
    attn = _compiled("strided(8)", "triton", plan="planned")
    (q, k, v), cu = _packed([9, 1, 14, 5], seed=13)

    def f(q, k, v, cu):  # two layers on one batch
        o, _ = ops.call(attn, q, k, v, return_lse=True, cu_seqlens=cu)
        return ops.call(attn, o, k, v, return_lse=True, cu_seqlens=cu)

    run = torch.compile(f, fullgraph=True, backend="aot_eager") if traced else f
    want = _outputs_and_grads(lambda q, k, v: f(q, k, v, cu), (q, k, v))
    run(q, k, v, cu)  # (a compile's own first pass)
    fresh = cu.clone()
    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    o, _ = run(q, k, v, fresh)
    o.sum().backward()
    assert [t.data_ptr() == fresh.data_ptr() for t in reads] == [True], "read more than once"
    monkeypatch.setattr(torch.Tensor, "cpu", real)
    q.grad = k.grad = v.grad = None
    got = _outputs_and_grads(lambda q, k, v: run(q, k, v, fresh), (q, k, v))
    for g, w in zip((*got[0], *got[1]), (*want[0], *want[1])):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    # changed in place: read again
    fresh.copy_(torch.as_tensor([0, 4, 24, 29, 29], dtype=fresh.dtype))
    assert checks.check_packed(q, k, v, fresh).tolist() == [0, 4, 24, 29, 29]


# ----------------------------------------------------------------------------
# The key: what an attention computes, written out, so a saved graph means the same thing anywhere
# ----------------------------------------------------------------------------


def test_the_key_is_the_attentions_text():
    cfg = KernelConfig(block=16, block_m=16, block_n=16)
    attn = pcc.compile("strided(8) with softcap(2.5)", backend="triton", plan="planned", config=cfg)
    assert attn.key.startswith(registry.PREFIX) and "softcap(2.5)" in attn.key
    assert pcc.compile("strided(8) with softcap(2.5)", backend="triton", plan="planned", config=cfg).key == attn.key
    for other in (pcc.compile("strided(9) with softcap(2.5)", backend="triton", plan="planned", config=cfg),
                  pcc.compile("strided(8) with softcap(2.5)", backend="triton", plan="natural", config=cfg),
                  pcc.compile("strided(8) with softcap(2.5)", backend="triton", plan="planned",
                              config=KernelConfig(block=16, block_m=16, block_n=32)),
                  pcc.compile("strided(8)", backend="triton", plan="planned", config=cfg, softcap=2.5000001)):
        assert other.key != attn.key
    # made again from its text alone, as in a process that loads a saved graph
    made = registry.maker(*registry.fields_of(attn.key))
    assert made is not attn and made.key == attn.key
    assert (made.pattern, made.backend, made.plan_mode, made.dense_sdpa, made.options) == (
        attn.pattern, attn.backend, attn.plan_mode, attn.dense_sdpa, attn.options)


def test_a_key_finds_a_live_attention_then_one_made_from_its_text():
    first, second = (pcc.compile("local(5) | global(2)", backend="reference", dense_limit=7) for _ in range(2))
    key = first.key
    assert ops._attention_of(key) in (first, second)
    del first
    gc.collect()
    assert ops._attention_of(key) is second
    del second
    gc.collect()
    made = ops._attention_of(key)  # none live: made from the text, and kept for the next call
    assert made.key == key and made.options == {"dense_limit": 7} and ops._attention_of(key) is made


def test_options_without_text_name_an_attention_of_this_process_only():
    class Opaque:
        pass

    key = registry.key_of(pcc.parse("causal"), "reference", "auto", True, {"dense_limit": Opaque()})
    with pytest.raises(ValueError, match="another process whose options have no text"):
        registry.find(key)


_SAVED = """
import sys
import torch
import patterncc as pcc
from patterncc.nn import SparseTransformer

torch.manual_seed(0)
model = SparseTransformer(50, 32, 2, 4, patterns=["strided(8)", "fixed(8, 2)"], mode="interleaved", max_len=128)
model.eval()
x = torch.randint(0, 50, (1, 45))
n = torch.export.Dim("n", min=2, max=128)
program = torch.export.export(model, (x,), dynamic_shapes={"idx": {1: n}})
torch.export.save(program, sys.argv[1])
y = torch.randint(0, 50, (1, 77))
torch.save(dict(x=x, y=y, want_x=model(x), want_y=model(y)), sys.argv[2])
"""

_LOADED = """
import sys
import torch
import patterncc as pcc  # after torch: the ops are registered, so the program loads

# this process makes other attentions first: a key counted per process would name one of them
decoy = [pcc.compile(text) for text in ("causal", "local(3)", "fixed(8, 2)")]
program = torch.export.load(sys.argv[1]).module()
saved = torch.load(sys.argv[2])
for name in ("x", "y"):
    err = (program(saved[name]) - saved["want_" + name]).abs().max().item()
    print(name, err)
    assert err == 0.0, err
"""


def test_an_exported_program_runs_its_own_patterns_in_another_process(tmp_path):
    import subprocess
    import sys

    paths = [str(tmp_path / "model.pt2"), str(tmp_path / "io.pt")]
    env = {**os.environ, "PATTERNCC_CACHE_DIR": str(tmp_path / "cache")}
    for script in (_SAVED, _LOADED):
        done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
