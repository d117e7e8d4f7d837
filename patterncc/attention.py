"""The object ``pcc.compile`` returns: one pattern, any backend, any length.

Backends are built lazily and kept, so layouts and kernels are cached per
compiled attention; ``backend="auto"`` picks per call from the inputs' device.
The Triton backend runs the planner's plan (``plan="auto"``): strided and
fixed patterns as components in their own token orders, merged by
log-sum-exp. The reference backend computes the pattern directly: it is the
definition of correct.

Score terms (patterncc/scores.py): the pattern's own (``A with softcap(c),
alibi``), ``compile``'s ``softcap=``, and the call's tensors. Backends get the
mask pattern alone and every term as a keyword argument of the call: alibi is
on for a backend iff it gets ``alibi_slopes``, so ``with alibi`` becomes the
standard slopes here unless the call gives its own.
"""

from __future__ import annotations

import sys

from . import ir, registry
from .scores import ScoreTerms, alibi_slopes, check_terms

BACKENDS = ("auto", "reference", "triton")
PLAN_MODES = ("auto", "planned", "natural")
# The keyword arguments of ``pcc.compile`` beyond ``backend``, ``plan`` and ``dense_sdpa``,
# per backend that reads them.
BACKEND_OPTIONS = {"triton": ("block", "config"), "reference": ("dense_limit",)}


def choose_backend(backend: str, q) -> str:
    """The backend a call runs on, the one rule for ``"auto"`` everywhere
    (``pcc.compile``, ``patterncc.nn``): the generated Triton kernels for CUDA
    tensors, the float64 reference for anything else. Under
    ``TRITON_INTERPRET=1`` the kernels run on the CPU too, but only when asked
    for by name: on the CPU the reference is the faster and exact one."""
    if backend != "auto":
        return backend
    return "triton" if getattr(getattr(q, "device", None), "type", None) == "cuda" else "reference"


def check_options(options: dict) -> None:
    """Unknown keyword arguments are errors (a typo such as ``blok=64`` is never ignored)."""
    allowed = [name for names in BACKEND_OPTIONS.values() for name in names]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"compile() got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; the allowed ones are backend, plan, dense_sdpa, "
                        f"{', '.join(allowed)}")


class Attention:
    """``attn(q, k, v, scale=None, return_lse=False, *, alibi_slopes=None,
    sinks=None, rel_bias=None, cache_seqlens=None, cu_seqlens=None)``.

    q ``[B, H, n, D]``; k, v ``[B, Hkv, n, D]`` with ``Hkv`` dividing ``H``.
    Returns ``o`` ``[B, H, n, D]`` (and ``lse`` ``[B, H, n]``, natural log,
    ``-inf`` for rows with no allowed key; the sink's value there with
    ``sinks``).

    Score terms: ``softcap`` (``compile``'s option; it replaces the pattern's
    ``softcap(c)``), the pattern's ``alibi`` (standard slopes, see
    ``scores.alibi_slopes``), and per call ``alibi_slopes`` (``[H]``, turns
    ALiBi on with these slopes), ``sinks`` (``[H]``) and ``rel_bias`` (``[H,
    2 * max_distance + 1]``), floating-point tensors on q's device, learnable.

    Options: ``plan`` (``"auto"``: the cost model decides; ``"planned"``;
    ``"natural"`` or ``False``: no reordering), ``dense_sdpa`` (default
    True: a plain ``causal``/``all`` pattern runs SDPA on CUDA where the
    cost model predicts it cheaper than the generated kernels, i.e. at short
    lengths, and for float32 inputs, when ``lse`` is not asked for), and
    the Triton backend's ``block`` and ``config``; the reference backend's
    ``dense_limit``.
    """

    def __init__(self, pattern: ir.Pattern, backend: str = "auto", *, plan="auto", dense_sdpa: bool = True,
                 softcap: float | None = None, **options):
        if backend not in BACKENDS:
            raise ValueError(f"{backend=} is not one of {', '.join(BACKENDS)}")
        check_options(options)
        plan = "natural" if plan is False else ("auto" if plan is True else plan)
        if plan not in PLAN_MODES:
            raise ValueError(f"{plan=} is not one of {', '.join(PLAN_MODES)} (or True/False)")
        self.mask_pattern, self.terms = ir.split_terms(pattern)
        if softcap is not None:
            self.terms = ir.Terms(ir.check_softcap(softcap), self.terms.alibi)
        # The pattern with the terms in effect (compile's softcap included).
        self.pattern = ir.Scored(self.mask_pattern, self.terms, pattern.loc) if self.terms else self.mask_pattern
        self.backend = backend
        self.plan_mode = plan
        self.dense_sdpa = dense_sdpa
        self.options = options
        self._impls: dict[str, object] = {}
        self._rows_impl = None  # the query-rows kernel, built on the first call that needs it
        self._slopes = {}  # (heads, device) -> the standard ALiBi slopes, float32
        self.key = registry.register(self)  # the ops find this attention by its key

    def __reduce__(self):
        # Copies and pickles are new compiled attentions of the same pattern
        # and options: each has its own key and (empty) caches.
        return _rebuilt, (self.pattern, self.backend, self.plan_mode, self.dense_sdpa, self.options)

    def __repr__(self) -> str:
        return f"Attention({str(self.pattern)!r}, backend={self.backend!r}, plan={self.plan_mode!r})"

    def __call__(self, q, k, v, scale=None, return_lse: bool = False, *, alibi_slopes=None, sinks=None,
                 rel_bias=None, cache_seqlens=None, block_table=None, cu_seqlens=None):
        """Queries may be fewer than keys (``n_q <= n_k``): they are then the
        last ``n_q`` positions. ``cache_seqlens`` (int32 ``[B]`` or a list):
        ``k``, ``v`` are caches ``[B, Hkv, max_len, D]`` and row ``b``'s
        queries the last of its first ``cache_seqlens[b]`` positions.
        ``block_table`` (int32 ``[B, max_pages]``, with ``cache_seqlens``):
        ``k``, ``v`` are page pools ``[num_pages, Hkv, page, D]`` and row
        ``b``'s position ``t`` is slot ``t % page`` of page
        ``block_table[b, t // page]``.
        ``cu_seqlens`` (int32 ``[S + 1]``): a packed batch, see ``_packed``.
        Under ``torch.autocast`` q, k and v run in its dtype (``_autocast``)."""
        q, k, v = _autocast(q, k, v)
        terms = self.call_terms(q, ScoreTerms(self.terms.softcap, alibi_slopes, sinks, rel_bias))
        given = dict(softcap=terms.softcap, alibi_slopes=terms.alibi_slopes, sinks=terms.sinks, rel_bias=terms.rel_bias)
        # Only the terms in use: a call without terms is the plain call.
        given = {name: value for name, value in given.items() if value is not None}
        if block_table is not None and cache_seqlens is None:
            raise ValueError("block_table needs cache_seqlens: the length of each row's paged cache")
        if cu_seqlens is not None:
            return self._packed(q, k, v, scale, return_lse, cu_seqlens, given, cache_seqlens)
        if _is_torch(q) and _traced(q):
            from . import ops

            if cache_seqlens is not None:  # decoding: one opaque op, the lengths a tensor it reads when it runs
                return ops.call_rows(self, q, k, v, scale, return_lse, terms, cache_seqlens, block_table)
            return ops.call(self, q, k, v, scale, return_lse, terms)  # one opaque op in the graph
        return self.eager_call(q, k, v, scale, return_lse, given, cache_seqlens, block_table)

    def eager_call(self, q, k, v, scale, return_lse, given: dict, cache_seqlens=None, block_table=None):
        """``__call__`` as it runs untraced (also inside the ``patterncc::attention_rows`` op)."""
        name = self.backend_for(q)
        rows = cache_seqlens is not None or _shape(q, 2) != _shape(k, 2)
        if not rows or name == "reference":
            if cache_seqlens is not None:
                given["cache_seqlens"] = cache_seqlens
            if block_table is not None:
                given["block_table"] = block_table
            return self.impl(name)(q, k, v, scale=scale, return_lse=return_lse, **given)
        o, lse = self._rows(q, k, v, scale, cache_seqlens, block_table, given)
        return (o, lse) if return_lse else o

    def _packed(self, q, k, v, scale, return_lse, cu_seqlens, terms: dict, cache_seqlens=None):
        """A packed batch: q ``[1, H, total, D]``, k, v ``[1, Hkv, total, D]``,
        ``cu_seqlens`` int32 ``[S + 1]``, cumulative lengths from 0 to
        ``total`` (empty sequences allowed). The pattern applies to each
        sequence alone, ``q``, ``k`` and ``n`` counted within it: the result
        is each sequence's own call concatenated (``o``, ``lse``, gradients).
        Everything is checked before any work."""
        from .backends.reference.checks import check_packed

        if _is_torch(q) and _traced(q):  # one opaque op: its offsets are read and checked when it runs
            if cache_seqlens is not None:
                check_packed(q, k, v, cu_seqlens, cache_seqlens)  # (the message for combining them)
            from . import ops

            return ops.call(self, q, k, v, scale, return_lse, ScoreTerms(**terms), cu_seqlens=cu_seqlens)
        return self.packed_run(q, k, v, scale, return_lse, cu_seqlens, terms, cache_seqlens)

    def packed_run(self, q, k, v, scale, return_lse, cu_seqlens, terms: dict, cache_seqlens=None):
        """``_packed`` as it runs (also inside the ``patterncc::attention`` op): checks, then the backend."""
        from .backends.reference.checks import check_packed

        offsets = check_packed(q, k, v, cu_seqlens, cache_seqlens)  # int64 numpy [S + 1]
        name = self.backend_for(q)
        if name == "reference":
            return self.impl(name)(q, k, v, scale=scale, return_lse=return_lse, cu_seqlens=offsets, **terms)
        return self.impl("triton").packed(q, k, v, offsets, scale=scale, return_lse=return_lse, **terms)

    def _rows(self, q, k, v, scale, cache_seqlens, block_table, terms: dict):
        """Queries at the end of their keys on the Triton backend: the
        query-rows kernel (reads only the key blocks the pattern allows
        there, with the score terms, from a contiguous or a paged cache) when
        no gradient is needed; otherwise the training kernels on queries
        padded with zero rows in front, whose outputs are dropped: a padded
        row's output gradient is 0, so it adds nothing to dk, dv or the
        terms' tensors (exact; it costs the padded rows' work). A paged
        cache takes that way as the contiguous cache it stands for."""
        import torch
        import torch.nn.functional as F

        from .backends.triton.decode import check_device_lens, check_paged, check_rows

        needs_grad = torch.is_grad_enabled() and any(getattr(x, "requires_grad", False)
                                                     for x in (q, k, v, *terms.values()))
        if block_table is not None and needs_grad:
            from .backends.reference.attention import pages_as_cache

            check_paged(q, k, v, cache_seqlens, block_table)  # the Triton backend's own rules first
            k, v = pages_as_cache(q, k, v, cache_seqlens, block_table)
            block_table = None
        # Before anything reads q.shape: a non-tensor or a bad shape is named here. (The
        # training kernels copy a last dimension that is not contiguous; the query-rows kernel refuses it.)
        device_lens = False
        if block_table is None and not needs_grad and isinstance(cache_seqlens, torch.Tensor):
            check_rows(q, k, v, None)  # the tensors themselves, before their devices are compared
            device_lens = check_device_lens(cache_seqlens, q)
        if block_table is not None:
            lens = check_paged(q, k, v, cache_seqlens, block_table)
        elif device_lens:
            # lengths left on the device (a CUDA graph may capture the call): their values are
            # checked on the CPU only (decode.check_device_lens)
            if q.device.type == "cpu":
                check_rows(q, k, v, cache_seqlens)
            lens = cache_seqlens
        else:
            lens = check_rows(q, k, v, cache_seqlens, copies_strided=needs_grad)
        if not needs_grad:
            if self._rows_impl is None:
                from .backends.triton.decode import RowsAttention

                self._rows_impl = RowsAttention(self.mask_pattern, block=self.options.get("block"))
            return self._rows_impl(q, k, v, lens, scale, block_table=block_table, **terms)
        triton = self.impl("triton")
        if cache_seqlens is None or not q.shape[0]:  # (a batch of no rows: one empty call)
            batch = [(q, k, v)]
        else:
            batch = [(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]) for b, n in enumerate(lens)]
        outs = []
        for qb, kb, vb in batch:
            pad = kb.shape[2] - qb.shape[2]
            o, lse = triton(F.pad(qb, (0, 0, pad, 0)), kb, vb, scale=scale, return_lse=True, **terms)
            outs.append((o[:, :, pad:], lse[:, :, pad:]))
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])

    def call_terms(self, q, terms: ScoreTerms) -> ScoreTerms:
        """A call's terms as the backends take them: checked, and the standard
        ALiBi slopes where the pattern says ``alibi`` and the call gives none:
        float32 values (what a model holds; every backend sees the same
        numbers), on q's device (float64 numpy for numpy inputs)."""
        if getattr(q, "ndim", None) != 4:
            return terms  # the backend's shape check names the problem
        heads = q.shape[1]
        torch = sys.modules.get("torch")  # loaded already if q is a tensor
        if torch is not None and isinstance(q, torch.Tensor):
            terms = check_terms(terms, heads, q.device)
            # made once per device: a copy from the host every call would cost a decode step's
            # time and could not be captured in a CUDA graph
            def make(slopes):
                if _traced(q):  # a traced call's constant belongs to its graph, not to eager calls
                    return torch.tensor(slopes, dtype=torch.float32, device=q.device)
                if (heads, q.device) not in self._slopes:
                    self._slopes[heads, q.device] = torch.tensor(slopes, dtype=torch.float32, device=q.device)
                return self._slopes[heads, q.device]
        else:
            import numpy as np

            make = lambda slopes: np.array(slopes, dtype=np.float32).astype(np.float64)
        if terms.alibi_slopes is None and self.terms.alibi:
            slopes = make(alibi_slopes(heads))
            terms = ScoreTerms(terms.softcap, slopes, terms.sinks, terms.rel_bias)
        return terms

    def backend_for(self, q) -> str:
        return choose_backend(self.backend, q)

    def plan(self, seq_len: int, heads: int = 1):
        """The Plan the Triton backend runs at this length (its block, its plan
        mode): what ``pcc.plan`` and ``patterncc explain`` show by default."""
        return self.impl("triton").plan(seq_len, heads)

    def impl(self, name: str):
        if name not in self._impls:
            self._impls[name] = self._reference() if name == "reference" else self._triton()
        return self._impls[name]

    def _reference(self):
        from .backends.reference import ReferenceAttention

        keep = {k: v for k, v in self.options.items() if k in BACKEND_OPTIONS["reference"]}
        return ReferenceAttention(self.mask_pattern, **keep)

    def _triton(self):
        from .backends.triton.codegen import shares_ints
        from .backends.triton.planned import TritonPlannedAttention
        from .backends.triton.runtime import TritonAttention
        from .planner import DEFAULT_BLOCK

        options = {k: v for k, v in self.options.items() if k in BACKEND_OPTIONS["triton"]}
        block = options.get("block") or getattr(options.get("config"), "block", None) or DEFAULT_BLOCK

        def make_inner(component, heads):
            # the same kernels for every length, with the pattern's integers literal unless written with n
            attn = TritonAttention(component.predicate, shared_ints=shares_ints(self.mask_pattern), **options)
            attn.use_layout(component.layout, heads)
            return attn

        return TritonPlannedAttention(self.mask_pattern, make_inner, block=block, mode=self.plan_mode,
                                      dense=sdpa_dense if self.dense_sdpa else None,
                                      standins=options.get("config") is None)


def sdpa_dense(pattern: ir.Pattern, q, k, v, scale):
    """Dense causal (or full) attention through PyTorch's SDPA (flash on a GPU);
    None where it does not apply, and the kernels run instead."""
    import torch.nn.functional as F

    if q.device.type != "cuda" or not isinstance(pattern, (ir.Causal, ir.All)):
        return None
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=isinstance(pattern, ir.Causal), scale=scale,
                                          enable_gqa=gqa)


def _shape(x, dim: int):
    """``x.shape[dim]``, or None for what is not an array of that rank (the
    backend's own checks then name the problem)."""
    shape = getattr(x, "shape", None)
    return shape[dim] if shape is not None and len(shape) > dim else None


def _rebuilt(pattern, backend, plan, dense_sdpa, options) -> Attention:
    return Attention(pattern, backend, plan=plan, dense_sdpa=dense_sdpa, **options)


def _traced(q) -> bool:
    """Whether a torch call may be traced (torch.compile, export, make_fx:
    any dispatch mode, or a tensor subclass such as fake tensors): it then
    goes through the ``patterncc::attention`` op (ops.py), which tracers see
    as one node. Plain eager calls run the same launches directly, without
    the op's dispatch cost, and may take SDPA's dense path, which the op
    never does (whether it pays depends on the length, and a graph must not)."""
    import torch

    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(q) not in (torch.Tensor, torch.nn.Parameter))


def _autocast(q, k, v):
    """q, k and v in ``torch.autocast``'s dtype where it is on for q's device,
    as SDPA takes them (attention is on autocast's lower-precision list): a
    model's float32 or mixed inputs then run the 16-bit kernels, and the
    output is in that dtype. float64 stays, as autocast leaves it; the score
    terms' tensors stay as given (the kernels read them in float32)."""
    if not _is_torch(q):
        return q, k, v
    import torch

    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in eligible else x for x in (q, k, v))


def _is_torch(x) -> bool:
    # Only look for torch if the caller has imported it: numpy inputs never load it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
