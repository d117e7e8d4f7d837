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

import os
import sys

from . import ir
from .scores import ScoreTerms, alibi_slopes, check_terms

BACKENDS = ("auto", "reference", "triton")
PLAN_MODES = ("auto", "planned", "natural")


class Attention:
    """``attn(q, k, v, scale=None, return_lse=False, *, alibi_slopes=None,
    sinks=None, rel_bias=None)``.

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

    def __repr__(self) -> str:
        return f"Attention({str(self.pattern)!r}, backend={self.backend!r}, plan={self.plan_mode!r})"

    def __call__(self, q, k, v, scale=None, return_lse: bool = False, *, alibi_slopes=None, sinks=None,
                 rel_bias=None):
        terms = self.call_terms(q, ScoreTerms(self.terms.softcap, alibi_slopes, sinks, rel_bias))
        given = dict(softcap=terms.softcap, alibi_slopes=terms.alibi_slopes, sinks=terms.sinks, rel_bias=terms.rel_bias)
        # Only the terms in use: a call without terms is the plain call.
        given = {name: value for name, value in given.items() if value is not None}
        return self.impl(self.backend_for(q))(q, k, v, scale=scale, return_lse=return_lse, **given)

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
            make = lambda slopes: torch.tensor(slopes, dtype=torch.float32, device=q.device)
        else:
            import numpy as np

            make = lambda slopes: np.array(slopes, dtype=np.float32).astype(np.float64)
        if terms.alibi_slopes is None and self.terms.alibi:
            slopes = make(alibi_slopes(heads))
            terms = ScoreTerms(terms.softcap, slopes, terms.sinks, terms.rel_bias)
        return terms

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
        return ReferenceAttention(self.mask_pattern, **keep)

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

        return TritonPlannedAttention(self.mask_pattern, make_inner, block=block, mode=self.plan_mode,
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
