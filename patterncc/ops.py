"""Attention as PyTorch operators: what ``torch.compile`` and CUDA graphs see.

    torch.ops.patterncc.attention(q, k, v, key, backend, scale, softcap, alibi_slopes, sinks, rel_bias,
                                  cu_seqlens=None)
        -> (o [B, H, n, D], lse [B, H, n])
    torch.ops.patterncc.attention_backward(q, k, v, o, lse, do, dlse, key, backend, scale,
                                           softcap, alibi_slopes, sinks, rel_bias, cu_seqlens=None,
                                           term_grads=7)
        -> (dq, dk, dv, [the present terms' gradients, in alibi_slopes, sinks, rel_bias order,
                         those term_grads asks for: bit 1, 2, 4])
    torch.ops.patterncc.attention_packed(...), attention_packed_backward(...)
        the same for a packed batch (cu_seqlens given), tagged cudagraph_unsafe: they read
        the offsets on the host, which inductor must keep out of its CUDA graphs
    torch.ops.patterncc.attention_rows(q, k, v, cache_seqlens, block_table, key, backend, scale,
                                       softcap, alibi_slopes, sinks, rel_bias)
        -> (o [B, H, n_q, D], lse [B, H, n_q]): decoding from a KV cache, no gradient

Each is one opaque ``torch.library`` custom op with a fake (shape-only)
implementation, and the forward's autograd is the backward op, so Dynamo
traces a call as one node whatever the pattern, plan or length, and the
sequence length is read from the inputs when the op runs: a new length
builds its layouts and tables on its first call (outside any trace) and
never recompiles the graph around it.

Only tensors, ints, floats and strings cross the boundary. The compiled
attention (pattern, plan mode, options) travels as ``key``, the text that
describes it (``Attention.key``: its pattern's source and options), so a
graph exported, saved and loaded in another process runs the same
attention there (``registry.find`` makes it from the text if none is
live; ``import patterncc`` after torch registers the ops); ``backend``
is ``"triton"`` (the generated kernels: natural and planned launches, every
dtype, GQA) or ``"reference"`` (float64 numpy on the CPU). ``scale`` None
is ``1/sqrt(D)``. ``cu_seqlens`` (int32 ``[S + 1]``, any device): a packed
batch (``Attention._packed``); its offsets are read on the host inside the
op, which picks the batch's layouts there, so a new batch never retraces
(it costs one device-to-host copy of S + 1 integers, which a CUDA graph
cannot capture; every later read of the same tensor, unchanged, in other
layers and in the backward op, reuses it: ``checks._host_values``).
``lse`` is float32 from the Triton backend and q's dtype from the
reference one, as each backend returns it outside the op.

``Attention.__call__`` takes the op when a call may be traced (under
``torch.compile`` or export, a dispatch mode, tensor subclasses); a plain
eager call runs the same launches without the op's dispatch cost.

Once a shape has been seen, a call reads no device tensor on the host and
makes no host-side tensor: layouts, plans, kernels and device tables are
cached per shape by the backend, so a captured CUDA graph replays the same
launches.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import registry
from .scores import NO_TERMS, ScoreTerms, check_terms

__all__ = ["attention", "attention_backward", "attention_packed", "attention_packed_backward", "attention_rows", "call",
           "call_rows"]


def call(attn, q, k, v, scale=None, return_lse: bool = False, terms: ScoreTerms | None = None, cu_seqlens=None):
    """``attn(q, k, v)`` for torch tensors, through the op (differentiable
    in q, k, v and the terms' tensors); ``cu_seqlens``: a packed batch."""
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor like q, got {type(x).__name__}")
    # Traced, the scale may be symbolic (a module's float under dynamic=True): the op checks its value.
    if scale is not None and not torch.compiler.is_compiling():
        from .backends.reference.checks import check_scale

        scale = check_scale(scale, q.shape[-1])
    terms = terms or NO_TERMS
    if cu_seqlens is not None:
        cu_seqlens = _offsets_tensor(cu_seqlens)
        o, lse = torch.ops.patterncc.attention_packed(q, k, v, attn.key, attn.backend_for(q), scale, terms.softcap,
                                                      *terms.tensors(), cu_seqlens)
        return (o, lse) if return_lse else o
    pad = _short_queries(q, k, v)
    if pad:
        # Queries fewer than keys are the last positions: the op runs on queries padded with zero rows
        # in front, and the padded rows' outputs are dropped. Exact: each row is computed alone, and a
        # dropped row's output gradient is 0, so it adds nothing to dk, dv or the terms' gradients.
        q = F.pad(q, (0, 0, pad, 0))
    o, lse = torch.ops.patterncc.attention(q, k, v, attn.key, attn.backend_for(q), scale, terms.softcap,
                                           *terms.tensors())
    if pad:
        o, lse = o[:, :, pad:], lse[:, :, pad:]
    return (o, lse) if return_lse else o


def call_rows(attn, q, k, v, scale, return_lse: bool, terms: ScoreTerms, cache_seqlens, block_table=None):
    """``attn(q, k_cache, v_cache, cache_seqlens=lens)`` (decoding from a KV
    cache, contiguous or paged) through the ``patterncc::attention_rows`` op:
    forward only, since decoding needs no gradient."""
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, *terms.tensors()))
    if wants_grad:
        raise NotImplementedError("a call with cache_seqlens is traced for decoding only, without gradients: "
                                  "run it under torch.no_grad() (or torch.inference_mode()), or outside the "
                                  "compiled region to train on a cache")
    o, lse = torch.ops.patterncc.attention_rows(q, k, v, _offsets_tensor(cache_seqlens), block_table, attn.key,
                                                attn.backend_for(q), scale, terms.softcap, *terms.tensors())
    return (o, lse) if return_lse else o


def _offsets_tensor(cu_seqlens) -> torch.Tensor:
    """cu_seqlens as the op takes it: a tensor (a list or array of a traced
    call is a constant of its graph; its values are checked in the op)."""
    if isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens
    return torch.as_tensor(np.asarray(cu_seqlens))


def _short_queries(q, k, v) -> int:
    """How many query rows are missing in front: ``n_k - n_q`` where q has
    fewer rows than k, else 0. The op's checks name any bad shape (while
    tracing, its fake implementation's: an error raised here would reach
    the user as Dynamo's own)."""
    if q.dim() == 4 and k.dim() == 4 and k.shape[2] > q.shape[2]:
        return k.shape[2] - q.shape[2]
    return 0


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------


# A packed call reads its offsets on the host when it runs, which a CUDA graph cannot capture: the
# packed calls have ops of their own (the same implementations) that carry torch's cudagraph_unsafe
# tag, so that inductor keeps them out of its CUDA graphs (mode="reduce-overhead") rather than
# capturing a host read. The unpacked ops stay capturable.
_HOST_READ = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, backend: str, scale: float | None,
             softcap: float | None, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
             rel_bias: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    attn = _attention_of(key)
    terms = _terms(q, softcap, alibi_slopes, sinks, rel_bias)
    if cu_seqlens is not None:
        return _packed_forward(attn, q, k, v, scale, terms, cu_seqlens)
    if _backend(backend) == "reference":
        return _reference_forward(attn, q, k, v, scale, terms)
    return _triton_forward(attn, q, k, v, scale, terms)


def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor | None, dlse: torch.Tensor | None, key: str, backend: str,
                 scale: float | None, softcap: float | None, alibi_slopes: torch.Tensor | None,
                 sinks: torch.Tensor | None, rel_bias: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None = None, term_grads: int = 7,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    attn = _attention_of(key)
    terms = _terms(q, softcap, alibi_slopes, sinks, rel_bias).taking(term_grads)
    if cu_seqlens is not None:
        dq, dk, dv, dterms = _packed_backward(attn, backend, q, k, v, o, lse, do, dlse, scale, terms, cu_seqlens)
    elif _backend(backend) == "reference":
        dq, dk, dv, dterms = _reference_backward(attn, q, k, v, o, lse, do, dlse, scale, terms)
    else:
        dq, dk, dv, dterms = _triton_backward(attn, q, k, v, o, lse, do, dlse, scale, terms)
    return dq, dk, dv, [g for i, g in enumerate(dterms) if terms.wants(i)]


attention = torch.library.custom_op("patterncc::attention", mutates_args=())(_forward)
attention_backward = torch.library.custom_op("patterncc::attention_backward", mutates_args=())(_backward_op)
attention_packed = torch.library.custom_op("patterncc::attention_packed", mutates_args=(), tags=_HOST_READ)(_forward)
attention_packed_backward = torch.library.custom_op("patterncc::attention_packed_backward", mutates_args=(),
                                                    tags=_HOST_READ)(_backward_op)


@torch.library.custom_op("patterncc::attention_rows", mutates_args=())
def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_seqlens: torch.Tensor,
                   block_table: torch.Tensor | None, key: str, backend: str, scale: float | None,
                   softcap: float | None, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                   rel_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at the end of each row's cache (``Attention.__call__`` with
    ``cache_seqlens``), as an eager call runs them: on the Triton backend,
    lengths on the device stay there (the query-rows kernel reads them), so
    a CUDA graph can capture the op; a list or CPU tensor is read on the host."""
    attn = _attention_of(key)
    terms = _terms(q, softcap, alibi_slopes, sinks, rel_bias)
    with torch.no_grad():
        o, lse = attn.eager_call(q, k, v, scale, True, _given(terms), cache_seqlens, block_table)
    return o.contiguous(), lse.to(_lse_dtype(q, _backend(backend))).contiguous()


@attention_rows.register_fake
def _attention_rows_fake(q, k, v, cache_seqlens, block_table, key, backend, scale, softcap, alibi_slopes, sinks,
                         rel_bias):
    _terms(q, softcap, alibi_slopes, sinks, rel_bias)
    if q.dim() != 4 or cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != q.shape[0]:
        raise ValueError(f"cache_seqlens must be a 1-D tensor of one length per row of q {tuple(q.shape)}, got "
                         f"{tuple(cache_seqlens.shape)}")
    B, H, n, D = q.shape
    return q.new_empty((B, H, n, D)), q.new_empty((B, H, n), dtype=_lse_dtype(q, backend))


def _attention_fake(q, k, v, key, backend, scale, softcap, alibi_slopes, sinks, rel_bias, cu_seqlens=None):
    _check(_backend(backend), q, k, v)
    _check_packed_shapes(q, k, v, cu_seqlens)
    _terms(q, softcap, alibi_slopes, sinks, rel_bias)
    B, H, n, D = q.shape
    return q.new_empty((B, H, n, D)), q.new_empty((B, H, n), dtype=_lse_dtype(q, backend))


def _attention_backward_fake(q, k, v, o, lse, do, dlse, key, backend, scale, softcap, alibi_slopes, sinks,
                             rel_bias, cu_seqlens=None, term_grads=7):
    _check(_backend(backend), q, k, v)
    terms = _terms(q, softcap, alibi_slopes, sinks, rel_bias).taking(term_grads)
    grads = [t.new_empty(t.shape) for i, t in enumerate(terms.tensors()) if terms.wants(i)]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grads


def _setup_context(ctx, inputs, output):
    q, k, v, key, backend, scale, softcap, alibi_slopes, sinks, rel_bias, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, alibi_slopes, sinks, rel_bias)
    ctx.key, ctx.backend, ctx.scale, ctx.softcap = key, backend, scale, softcap
    # The registry holds attentions weakly: keep this one alive until the
    # backward pass (``pcc.compile(pat)(q, k, v).sum().backward()``), which
    # would otherwise make it again from its key, its caches empty.
    ctx.attention = _attention_of(key)
    # An output no gradient reached stays None: the Triton backward then
    # skips its work (no lse gradient: delta comes with dQ, no pass of its own).
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens, *term_tensors = ctx.saved_tensors
    nothing = (None,) * 7 + (None,) * len(term_tensors) + (None,)
    if do is None and dlse is None:
        return nothing
    # a fixed term tensor (ALiBi's standard slopes) gets no gradient, and the kernels skip its sum
    terms = ScoreTerms(ctx.softcap, *term_tensors).taking(ctx.needs_input_grad[7:10])
    op = torch.ops.patterncc.attention_backward if cu_seqlens is None else torch.ops.patterncc.attention_packed_backward
    dq, dk, dv, present = op(q, k, v, o, lse, do, dlse, ctx.key, ctx.backend, ctx.scale, ctx.softcap, *term_tensors,
                             cu_seqlens, terms.grad_mask())
    given = iter(present)
    dterms = [next(given) if terms.wants(i) else None for i in range(len(term_tensors))]
    return dq, dk, dv, None, None, None, None, *dterms, None


for _op, _op_backward in ((attention, attention_backward), (attention_packed, attention_packed_backward)):
    _op.register_fake(_attention_fake)
    _op_backward.register_fake(_attention_backward_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# The backends behind the ops
# ----------------------------------------------------------------------------


def _triton_forward(attn, q, k, v, scale, terms):
    from .backends.triton.runtime import launches_forward

    q, k, v, scale, D = _triton_inputs(q, k, v, scale)
    o, lse = launches_forward(_triton_launches(attn, q, k), q, k, v, scale, terms)
    return _unpadded(o, D), lse


def _triton_backward(attn, q, k, v, o, lse, do, dlse, scale, terms, offsets=None):
    """The backward launches of a call, or of a packed batch's (``offsets``)."""
    from .backends.triton.runtime import launches_backward

    q, k, v, scale, D = _triton_inputs(q, k, v, scale)
    o, do = (x if x is None else _padded(x, q.shape[-1]) for x in (o, do))
    launches = _triton_launches(attn, q, k) if offsets is None else attn.impl("triton").packed_launches(q, k, offsets)
    dq, dk, dv, dterms = launches_backward(launches, q, k, v, o, lse, do, dlse, scale, terms)
    return _unpadded(dq, D), _unpadded(dk, D), _unpadded(dv, D), dterms


def _triton_inputs(q, k, v, scale):
    """Checked inputs, padded to the kernels' head dim, their scale and true head dim."""
    from .backends.reference.checks import check_scale
    from .backends.triton.config import padded_head_dim
    from .backends.triton.runtime import _float32_scale, check_inputs

    q, k, v = check_inputs(q, k, v)
    D = q.shape[-1]
    scale = _float32_scale(check_scale(scale, D))
    Dp = padded_head_dim(D)
    return _padded(q, Dp), _padded(k, Dp), _padded(v, Dp), scale, D


def _triton_launches(attn, q, k):
    return attn.impl("triton").launches_for(q, k)


def _padded(x, Dp: int):
    """Zero columns up to ``Dp``: they add nothing to q.k, and o's are sliced away."""
    return x if x.shape[-1] == Dp else F.pad(x, (0, Dp - x.shape[-1]))


def _unpadded(x, D: int):
    # contiguous: the op's outputs are fresh tensors in the shape the fake gives
    return x if x.shape[-1] == D else x[..., :D].contiguous()


def _packed_forward(attn, q, k, v, scale, terms, cu_seqlens):
    """A packed batch: the eager packed call itself (``Attention.packed_run``:
    its checks, layouts and launches), with no autograd of its own: the op's
    is the backward op."""
    from .backends.reference.checks import check_packed

    offsets = check_packed(q, k, v, cu_seqlens)
    with torch.no_grad():
        o, lse = attn.packed_run(q, k, v, scale, True, offsets, _given(terms))
    return o.contiguous(), lse.to(_lse_dtype(q, attn.backend_for(q))).contiguous()


def _packed_backward(attn, backend, q, k, v, o, lse, do, dlse, scale, terms, cu_seqlens):
    """A packed batch's gradients from the saved o and lse. A pattern whose
    mask does not depend on n, on the Triton backend, runs its forward's
    fused launches backward (kept per batch). Otherwise (the reference
    backend; patterns that read n) the sequences of each length run as one
    batch of their own, which is what a packed batch means: each sequence
    attended alone (its tokens gathered, its gradients scattered back)."""
    from .backends.reference.checks import check_packed
    from .backends.triton.planned import length_free

    offsets = check_packed(q, k, v, cu_seqlens)  # the forward's read, kept (checks._host_values)
    if _backend(backend) == "triton" and length_free(attn.pattern):
        return _triton_backward(attn, q, k, v, o, lse, do, dlse, scale, terms, offsets)
    backward = _reference_backward if backend == "reference" else _triton_backward
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    dterms = [None if t is None else torch.zeros_like(t) for t in terms.tensors()]
    lengths = offsets[1:] - offsets[:-1]
    for n in sorted(set(lengths.tolist()) - {0}):
        starts = offsets[:-1][lengths == n]
        idx = torch.as_tensor((starts[:, None] + np.arange(n)).ravel(), device=q.device)
        group = [None if x is None else _gathered(x, idx, n) for x in (q, k, v, o, lse, do, dlse)]
        *g, dt = backward(attn, *group, scale, terms)
        for whole, part in zip(grads, g):
            whole[0][:, idx] = part.transpose(0, 1).reshape(whole.shape[1], -1, *whole.shape[3:])
        for i, part in enumerate(dt):
            if part is not None:
                dterms[i] += part
    return (*grads, tuple(dterms))


def _gathered(x, idx, n: int):
    """The tokens ``idx`` of a packed ``[1, H, total, ...]`` tensor, G sequences
    of n each, as a batch ``[G, H, n, ...]``."""
    part = x[0][:, idx]  # [H, G * n, ...]
    return part.reshape(part.shape[0], -1, n, *part.shape[2:]).transpose(0, 1).contiguous()


def _given(terms: ScoreTerms) -> dict:
    """The terms as ``Attention._packed`` takes them: keyword arguments, only the present ones."""
    named = dict(softcap=terms.softcap, alibi_slopes=terms.alibi_slopes, sinks=terms.sinks, rel_bias=terms.rel_bias)
    return {name: value for name, value in named.items() if value is not None}


def _lse_dtype(q, backend: str):
    return q.dtype if backend == "reference" else torch.float32


def _check_packed_shapes(q, k, v, cu_seqlens) -> None:
    """What a packed batch's shapes must be, checkable without its values (at trace time)."""
    if cu_seqlens is None:
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of cumulative lengths, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"a packed batch has batch size 1 (q [1, H, total, D]), got q {tuple(q.shape)}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"a packed batch is its own keys: q, k and v hold the same tokens, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _reference_forward(attn, q, k, v, scale, terms):
    from .backends.reference import _torch

    _check("reference", q, k, v)
    o, lse = attn.impl("reference").forward(*(_torch._numpy(x) for x in (q, k, v)), scale, _numpy_terms(terms))
    return _fresh(o, q), _fresh(lse, q)


def _reference_backward(attn, q, k, v, o, lse, do, dlse, scale, terms):
    from .backends.reference import _torch

    _check("reference", q, k, v)
    ref = attn.impl("reference")
    q64, k64, v64 = (_torch._numpy(x) for x in (q, k, v))
    terms64 = _numpy_terms(terms)
    # o and lse again in float64, exactly as the reference computes them
    # outside the op (the saved ones are rounded to q's dtype).
    o64, lse64 = ref.forward(q64, k64, v64, scale, terms64)
    do64 = _torch._numpy(do) if do is not None else 0.0 * o64
    dlse64 = _torch._numpy(dlse) if dlse is not None and bool(dlse.any()) else None
    dq, dk, dv, dterms = ref.backward(q64, k64, v64, o64, lse64, do64, scale, dlse64, terms=terms64)
    return (*(_fresh(g, q) for g in (dq, dk, dv)),
            tuple(None if g is None else _fresh(g, t) for g, t in zip(dterms, terms.tensors())))


def _numpy_terms(terms: ScoreTerms) -> ScoreTerms:
    """The terms as the numpy reference takes them (float64 arrays)."""
    from .backends.reference import _torch

    return ScoreTerms(terms.softcap, *(None if t is None else _torch._numpy(t) for t in terms.tensors()))


def _fresh(x, like):
    """A float64 result as a contiguous tensor of ``like``'s dtype and device
    (numpy keeps the inputs' memory order; the fake gives contiguous ones)."""
    from .backends.reference import _torch

    return _torch._tensor(x, like.dtype, like.device).contiguous()


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def _attention_of(key: str):
    return registry.find(key)


def _backend(backend: str) -> str:
    if backend not in ("reference", "triton"):
        raise ValueError(f"{backend=} is not one of reference, triton")
    return backend


def _check(backend: str, q, k, v) -> None:
    """The backend's input checks (shapes, dtypes, devices): the same error
    from the fake implementation at trace time as from the real one."""
    if backend == "reference":
        from .backends.reference import _torch

        _torch.check_tensors(q, k, v)
    else:
        from .backends.triton.runtime import check_inputs

        check_inputs(q, k, v)


def _terms(q, softcap, alibi_slopes, sinks, rel_bias) -> ScoreTerms:
    return check_terms(ScoreTerms(softcap, alibi_slopes, sinks, rel_bias), q.shape[1], q.device)
