"""The object ``pcc.compile`` returns: one pattern, any backend, any length.

Backends are built lazily and kept, so layouts and kernels are cached per
compiled attention; ``backend="auto"`` picks per call from the inputs' device.
"""

from __future__ import annotations

import os

from . import ir

BACKENDS = ("auto", "reference", "triton")


class Attention:
    """``attn(q, k, v, scale=None, return_lse=False)``.

    q ``[B, H, n, D]``; k, v ``[B, Hkv, n, D]`` with ``Hkv`` dividing ``H``.
    Returns ``o`` ``[B, H, n, D]`` (and ``lse`` ``[B, H, n]``, natural log,
    ``-inf`` for rows with no allowed key).
    """

    def __init__(self, pattern: ir.Pattern, backend: str = "auto", **options):
        if backend not in BACKENDS:
            raise ValueError(f"{backend=} is not one of {', '.join(BACKENDS)}")
        self.pattern = pattern
        self.backend = backend
        self.options = options
        self._impls: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"Attention({str(self.pattern)!r}, backend={self.backend!r})"

    def __call__(self, q, k, v, scale=None, return_lse: bool = False):
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
            if name == "reference":
                from .backends.reference import ReferenceAttention

                self._impls[name] = ReferenceAttention(self.pattern)
            else:
                from .backends.triton.runtime import TritonAttention

                self._impls[name] = TritonAttention(self.pattern, **self.options)
        return self._impls[name]
