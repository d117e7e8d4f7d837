"""The object ``pcc.compile`` returns: one pattern, any backend, any length.

Backends are built lazily and kept, so layouts and kernels are cached per
compiled attention; ``backend="auto"`` picks per call from the inputs' device.
The Triton backend runs the planner's plan (``plan="auto"``): strided and
fixed patterns as components in their own token orders, merged by
log-sum-exp. The reference backend computes the pattern directly: it is the
definition of correct.
"""

from __future__ import annotations

import itertools
import os
import sys
import weakref

from . import ir

BACKENDS = ("auto", "reference", "triton")
PLAN_MODES = ("auto", "planned", "natural")

# Every Attention by its key, the integer that names it to the torch ops
# (ops.py): only tensors and plain numbers cross an op's boundary.
live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count()


class Attention:
    """``attn(q, k, v, scale=None, return_lse=False)``.

    q ``[B, H, n, D]``; k, v ``[B, Hkv, n, D]`` with ``Hkv`` dividing ``H``.
    Returns ``o`` ``[B, H, n, D]`` (and ``lse`` ``[B, H, n]``, natural log,
    ``-inf`` for rows with no allowed key).

    Options: ``plan`` (``"auto"``: the cost model decides; ``"planned"``;
    ``"natural"`` or ``False``: no reordering), ``dense_sdpa`` (default
    True: a plain ``causal``/``all`` pattern runs SDPA on CUDA where the
    cost model predicts it cheaper than the generated kernels, i.e. at short
    lengths, and for float32 inputs, when ``lse`` is not asked for), and
    the Triton backend's ``block`` and ``config``; the reference backend's
    ``dense_limit``.
    """

    def __init__(self, pattern: ir.Pattern, backend: str = "auto", *, plan="auto", dense_sdpa: bool = True,
                 **options):
        if backend not in BACKENDS:
            raise ValueError(f"{backend=} is not one of {', '.join(BACKENDS)}")
        plan = "natural" if plan is False else ("auto" if plan is True else plan)
        if plan not in PLAN_MODES:
            raise ValueError(f"{plan=} is not one of {', '.join(PLAN_MODES)} (or True/False)")
        self.pattern = pattern
        self.backend = backend
        self.plan_mode = plan
        self.dense_sdpa = dense_sdpa
        self.options = options
        self._impls: dict[str, object] = {}
        self.key = next(_keys)
        live[self.key] = self

    def __reduce__(self):
        # Copies and pickles are new compiled attentions of the same pattern
        # and options: each has its own key and (empty) caches.
        return _rebuilt, (self.pattern, self.backend, self.plan_mode, self.dense_sdpa, self.options)

    def __repr__(self) -> str:
        return f"Attention({str(self.pattern)!r}, backend={self.backend!r}, plan={self.plan_mode!r})"

    def __call__(self, q, k, v, scale=None, return_lse: bool = False):
        if _is_torch(q) and _traced(q):
            from . import ops

            return ops.call(self, q, k, v, scale, return_lse)  # one opaque op in the graph
        return self.impl(self.backend_for(q))(q, k, v, scale=scale, return_lse=return_lse)

    def backend_for(self, q) -> str:
        if self.backend != "auto":
            return self.backend
        is_cuda = getattr(getattr(q, "device", None), "type", None) == "cuda"
        # Under TRITON_INTERPRET=1 the generated kernels run on the CPU too.
        if is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and hasattr(q, "device")):
            return "triton"
        return "reference"

    def impl(self, name: str):
        if name not in self._impls:
            self._impls[name] = self._reference() if name == "reference" else self._triton()
        return self._impls[name]

    def _reference(self):
        from .backends.reference import ReferenceAttention

        keep = {k: v for k, v in self.options.items() if k == "dense_limit"}
        return ReferenceAttention(self.pattern, **keep)

    def _triton(self):
        from .backends.triton.config import DEFAULT_BLOCK
        from .backends.triton.planned import TritonPlannedAttention
        from .backends.triton.runtime import TritonAttention

        options = {k: v for k, v in self.options.items() if k in ("block", "config")}
        block = options.get("block") or getattr(options.get("config"), "block", None) or DEFAULT_BLOCK

        def make_inner(component, heads):
            attn = TritonAttention(component.predicate, **options)  # the same kernels for every length
            attn.use_layout(component.layout, heads)
            return attn

        return TritonPlannedAttention(self.pattern, make_inner, block=block, mode=self.plan_mode,
                                      dense=sdpa_dense if self.dense_sdpa else None)


def sdpa_dense(pattern: ir.Pattern, q, k, v, scale):
    """Dense causal (or full) attention through PyTorch's SDPA (flash on a GPU);
    None where it does not apply, and the kernels run instead."""
    import torch.nn.functional as F

    if q.device.type != "cuda" or not isinstance(pattern, (ir.Causal, ir.All)):
        return None
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=isinstance(pattern, ir.Causal), scale=scale,
                                          enable_gqa=gqa)


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


def _is_torch(x) -> bool:
    # Only look for torch if the caller has imported it: numpy inputs never load it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
