"""The Triton backend: generated fused block-sparse attention kernels.

    from patterncc.backends.triton import TritonAttention, KernelConfig
    attn = TritonAttention(pattern)              # or block=64, or config=KernelConfig(...)
    o, lse = attn(q, k, v, return_lse=True)      # CUDA tensors (CPU under TRITON_INTERPRET=1)

Modules: ``codegen`` (IR -> kernel source), ``kernels`` (the kernel template),
``tables`` (layout -> run lists), ``runtime`` (launches, autograd), ``cache``
(generated files on disk), ``standin`` (any pattern's kernels from a bitmap,
for a first call while its own compile; ``warmup`` compiles them ahead),
``flex`` (FlexAttention interop),
``config`` (tiles), ``bench`` (timings against FlexAttention and SDPA).
"""

from .config import KernelConfig, default_config
from .runtime import TritonAttention

__all__ = ["TritonAttention", "KernelConfig", "default_config"]
