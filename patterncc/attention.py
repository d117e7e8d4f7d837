"""The object ``pcc.compile`` returns: one pattern, any backend, any length.

Backends are built lazily and kept, so layouts and kernels are cached per
compiled attention; ``backend="auto"`` picks per call from the inputs' device.
The Triton backend runs the planner's plan (``plan="auto"``): strided and
fixed patterns as components in their own token orders, merged by
log-sum-exp. The reference backend computes the pattern directly: it is the
definition of correct.
"""

from __future__ import annotations

from . import ir

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
        check_options(options)
        plan = "natural" if plan is False else ("auto" if plan is True else plan)
        if plan not in PLAN_MODES:
            raise ValueError(f"{plan=} is not one of {', '.join(PLAN_MODES)} (or True/False)")
        self.pattern = pattern
        self.backend = backend
        self.plan_mode = plan
        self.dense_sdpa = dense_sdpa
        self.options = options
        self._impls: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"Attention({str(self.pattern)!r}, backend={self.backend!r}, plan={self.plan_mode!r})"

    def __call__(self, q, k, v, scale=None, return_lse: bool = False):
        return self.impl(self.backend_for(q))(q, k, v, scale=scale, return_lse=return_lse)

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
        return ReferenceAttention(self.pattern, **keep)

    def _triton(self):
        from .backends.triton.planned import TritonPlannedAttention
        from .backends.triton.runtime import TritonAttention
        from .planner import DEFAULT_BLOCK

        options = {k: v for k, v in self.options.items() if k in BACKEND_OPTIONS["triton"]}
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
