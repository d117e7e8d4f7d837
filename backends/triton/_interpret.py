"""A fix for the Triton interpreter's bfloat16 ``tl.dot`` (CPU runs only).

Under ``TRITON_INTERPRET=1`` Triton stores bfloat16 as uint16 and its
``create_dot`` multiplies those bit patterns (triton-lang/triton#11584; the
interpreter documents bfloat16 arithmetic as unsupported): a bfloat16
attention comes out as numbers of order 1e9, silently. GPU kernels are
unaffected. ``patch_bf16_dot()`` converts bfloat16 operands to float32 before
the interpreter's matmul, the way its own casts do. The runtime applies it
before any interpreted launch (``runtime.load_kernels``), so bfloat16 on the
CPU is right for tests, the testing kit and users alike.
"""

from __future__ import annotations

import functools
import os

_original = None  # the interpreter's own create_dot, once patched (None: not patched)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def bf16_dot_needs_patch() -> bool:
    """True when this Triton's interpreter multiplies bfloat16 bit patterns."""
    return _original is None and not _interpreter_handles_bf16()


@functools.cache
def _interpreter_handles_bf16() -> bool:
    import inspect

    from triton.runtime import interpreter

    return "bfloat16" in inspect.getsource(interpreter.InterpreterBuilder.create_dot)


def patch_bf16_dot() -> None:
    global _original
    if not bf16_dot_needs_patch():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = _original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
