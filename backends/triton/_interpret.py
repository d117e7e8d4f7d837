"""A fix for the Triton interpreter's bfloat16 ``tl.dot`` (tests on the CPU only).

Under ``TRITON_INTERPRET=1`` Triton stores bfloat16 as uint16 and its
``create_dot`` multiplies those bit patterns (triton-lang/triton#11584; the
interpreter documents bfloat16 arithmetic as unsupported). GPU kernels are
unaffected. ``patch_bf16_dot()`` converts bfloat16 operands to float32 before
the interpreter's matmul, the way its own casts do; the tests apply it so that
the bfloat16 kernels (their loads, casts and stores) can be checked on a CPU.
"""

from __future__ import annotations

_patched = False


def bf16_dot_needs_patch() -> bool:
    """True when this Triton's interpreter multiplies bfloat16 bit patterns."""
    import inspect

    from triton.runtime import interpreter

    source = inspect.getsource(interpreter.InterpreterBuilder.create_dot)
    return "bfloat16" not in source and not _patched


def patch_bf16_dot() -> None:
    global _patched
    if not bf16_dot_needs_patch():
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _patched = True
