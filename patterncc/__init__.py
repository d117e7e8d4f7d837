"""patterncc: a compiler for sparse attention patterns.

    import patterncc as pcc
    pat  = pcc.parse("causal & (local(128) | stride(128))")
    lay  = pcc.layout(pat, seq_len=4096, block=128)
    attn = pcc.compile(pat)            # backend="auto": Triton on CUDA, reference on CPU
    o    = attn(q, k, v)

See README.md for the language, the pipeline and the repository's layout.
"""

import sys as _sys

from . import ir
from .errors import (
    ArityError,
    HeadsError,
    LimitError,
    PatternError,
    PatternSyntaxError,
    PatternValueError,
    RecursiveDefinitionError,
    UnknownNameError,
)
from .ir import Pattern
from .pipeline import as_pattern, compile, layout, load, mask, parse, plan, sparse_mask, wait_for_kernels
from . import pipeline as _pipeline, registry as _registry

_registry.maker = _pipeline.attention_of_text  # what a key names in a process that did not make it

__version__ = "0.1.0"

if "torch" in _sys.modules:  # the torch ops, registered: a graph saved with them (torch.export) then loads
    from . import ops as _ops  # noqa: F401

__all__ = [
    "ArityError",
    "HeadsError",
    "LimitError",
    "Pattern",
    "PatternError",
    "PatternSyntaxError",
    "PatternValueError",
    "RecursiveDefinitionError",
    "UnknownNameError",
    "as_pattern",
    "compile",
    "ir",
    "layout",
    "load",
    "mask",
    "parse",
    "plan",
    "sparse_mask",
    "wait_for_kernels",
]
