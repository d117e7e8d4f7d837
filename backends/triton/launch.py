"""Launching a generated kernel without Triton's per-call binding.

A planned forward of a sparse pattern is short on the GPU (0.27 ms for
strided(128) at n = 16384, H = 16) and the host's time to issue it is of
the same order, so the host's cost is part of the measured time.
``kernel[grid](*args, **kwargs)`` binds the arguments to the signature,
specializes each one (dtype, 16-byte alignment, integer divisibility),
hashes that into a cache key and looks the compiled kernel up, on every
call. A ``Launcher`` does this once per *specialization key* and then calls
the compiled kernel's launcher directly. The key holds everything Triton
specializes on, and more: each tensor's dtype and alignment, each other
argument's exact value, the constexprs and the launch options.

The direct call relies on two Triton internals, true of Triton 3.x (3.6 on
the GPU image, 3.9 here): the compiled kernel's ``run(gridX, gridY, gridZ,
stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
*args)`` and ``args`` being every parameter in signature order, constexprs
included (the launcher drops them). A launcher checks the first on first
use and goes back to ``kernel[grid]`` for good if it does not hold; it also
takes Triton's path whenever a launch hook is set (profilers use them).
``PATTERNCC_DIRECT_LAUNCH=0`` turns the direct path off.
"""

from __future__ import annotations

import inspect
import os

import torch

_MAX_KEYS = 64  # compiled kernels kept per launcher (a new shape or stride adds one)
_RUN_ARITY = 9  # gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata, enter and exit hooks


def enabled() -> bool:
    return os.environ.get("PATTERNCC_DIRECT_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


class Launcher:
    """``launcher(grid, *args, **kwargs)`` launches ``fn[grid](*args, **kwargs)``.

    The generated kernels take their tensors first and their scalars after
    (strides, lengths, the scale), so the key is cheap to build: the scalars
    as given (one tuple slice), each tensor's dtype and address modulo 16,
    and the keyword arguments."""

    def __init__(self, fn):
        self.fn = fn
        self.direct = enabled() and hasattr(fn, "run") and hasattr(fn, "fn")
        self.n_tensors = None  # how many leading arguments are tensors (from the first call)
        self._kernels: dict = {}  # key -> (compiled kernel, the constexpr and default tail of its arguments)

    def __call__(self, grid, *args, **kwargs):
        if not self.direct:
            return self.fn[grid](*args, **kwargs)
        if self.n_tensors is None:
            return self._first(grid, args, kwargs)
        key = _key(args, kwargs, self.n_tensors)
        hit = self._kernels.get(key)
        if hit is None or _hooked():
            return self._first(grid, args, kwargs)
        kernel, tail = hit
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], grid_y, grid_z, _raw_stream(key[0]), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)

    def _first(self, grid, args, kwargs):
        """Triton's own launch (it compiles on a miss); remember the kernel if
        the direct call can reproduce it."""
        kernel = self.fn[grid](*args, **kwargs)
        if _hooked():
            return
        n = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        try:
            tail = _tail(self.fn.fn, args, kwargs)
            arity = [p for p in inspect.signature(kernel.run).parameters.values()
                     if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            usable = (len(arity) == _RUN_ARITY and hasattr(kernel, "packed_metadata") and kernel.function is not None
                      and not any(isinstance(a, torch.Tensor) for a in args[n:])
                      and self.n_tensors in (None, n))
        except (AttributeError, TypeError, ValueError):
            usable = False
        if not usable:
            self.direct = False
            return
        self.n_tensors = n
        if len(self._kernels) >= _MAX_KEYS:
            self._kernels.clear()
        self._kernels[_key(args, kwargs, n)] = (kernel, tail)


def _key(args, kwargs, n_tensors: int) -> tuple:
    """What the compiled kernel depends on: the device, the scalars as given,
    the keyword arguments, each tensor's dtype and address modulo 16."""
    return (torch.cuda.current_device(), args[n_tensors:], tuple(kwargs.items()),
            tuple([(t.dtype, t.data_ptr() & 15) for t in args[:n_tensors]]))


def _tail(py_fn, args, kwargs) -> tuple:
    """The parameters after the positional ``args``, in signature order, as
    Triton binds them (keyword value, else the default); launch options
    such as ``num_warps`` are not parameters and are left out."""
    sig = inspect.signature(py_fn)
    names = list(sig.parameters)[len(args):]
    params = {k: v for k, v in kwargs.items() if k in sig.parameters}
    bound = sig.bind_partial(**params)
    bound.apply_defaults()
    missing = [n for n in names if n not in bound.arguments]
    if missing:
        raise TypeError(f"{py_fn.__name__}: no value for {missing}")
    return tuple(bound.arguments[n] for n in names)


def _raw_stream(device: int) -> int:
    """The current CUDA stream's handle, as Triton's driver gets it."""
    return torch._C._cuda_getCurrentRawStream(device)


_knobs = None


def _hooked() -> bool:
    """Whether Triton has a launch hook set (a profiler): then its own path
    runs. Triton 3.6+ keeps its hooks in chains that are never None: a chain
    counts when it holds a hook."""
    global _knobs
    if _knobs is None:
        from triton import knobs as _knobs  # noqa: PLW0603 (imported once, at the first launch)
    runtime = _knobs.runtime
    return _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)


def _active(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))
