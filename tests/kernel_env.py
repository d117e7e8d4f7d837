"""The environment every file that runs the generated kernels needs: Triton's
interpreter without a GPU, and a private kernel cache. A test file imports
the fixture by name (``from kernel_env import interpreter_and_cache``) and it
applies to that file alone."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def interpreter_and_cache(tmp_path_factory):
    """TRITON_INTERPRET=1 without a GPU, and a private kernel cache, for the importing module only."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "PATTERNCC_CACHE_DIR")}
    if not GPU and saved["TRITON_INTERPRET"] != "1" and "triton" in sys.modules:
        # Triton decides at import whether its own jit helpers (tl.max, tl.cdiv) are interpreted.
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run the suite with "
                    "TRITON_INTERPRET=1 (scripts/test.sh does) or this file on its own")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"  # (the runtime fixes the interpreter's bf16 tl.dot itself)
    os.environ["PATTERNCC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    with contextlib.nullcontext() if GPU else _recording_specializations():
        yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def triton_specializations() -> int:
    """How many specializations of the generated kernels (every module
    ``patterncc_kernels_*`` loaded in this process) Triton has compiled: a
    count that must not grow when only lengths do. On the GPU, Triton's own
    caches; under the interpreter, which compiles nothing, the keys Triton
    would compile under (``_interpreted_key``), recorded at every launch
    since the importing module's fixture started."""
    if not GPU:
        return sum(len(keys) for keys in _interpreted_keys.values())
    import triton

    kernels = {id(fn): fn for name, module in list(sys.modules.items()) if name.startswith("patterncc_kernels_")
               for fn in vars(module).values() if isinstance(fn, triton.JITFunction)}
    return sum(len(cache[0]) for fn in kernels.values() for cache in fn.device_caches.values())


_interpreted_keys: dict = {}  # generated kernel -> the specialization keys its launches had


def launch_arguments(kernel, args, kwargs) -> list[tuple[str, object, bool, bool]]:
    """``(name, value, is_constexpr, specialized)`` of every parameter of a
    launch of ``kernel`` (an interpreted ``triton.jit`` function), defaults
    filled in; ``specialized``: not in the kernel's ``do_not_specialize``."""
    import inspect

    sig = inspect.signature(kernel.fn)
    bound = sig.bind(*args, **{name: x for name, x in kwargs.items() if name in sig.parameters})
    bound.apply_defaults()
    loose = set(kernel.kwargs.get("do_not_specialize") or ())
    return [(name, x, str(sig.parameters[name].annotation).endswith("constexpr"), name not in loose)
            for name, x in bound.arguments.items()]


def _interpreted_key(kernel, args, kwargs) -> tuple:
    """The specialization a launch would compile under on a GPU, modelled on
    Triton's rules: every ``tl.constexpr`` parameter by value; an integer not
    in ``do_not_specialize`` by whether it is 1, a multiple of 16 and within
    int32; a tensor by dtype and whether its address is a multiple of 16; a
    bool or float by type; None as itself."""
    key = []
    for name, x, constexpr, specialized in launch_arguments(kernel, args, kwargs):
        if constexpr:
            key.append((name, x))
        elif x is None or not specialized:
            key.append((name, x is None))
        elif isinstance(x, bool):
            key.append((name, "i1"))
        elif isinstance(x, int):
            key.append((name, x == 1, x % 16 == 0, -2**31 <= x < 2**31))
        elif isinstance(x, float):
            key.append((name, "fp32"))
        else:
            key.append((name, str(x.dtype), x.data_ptr() % 16 == 0))
    return tuple(key)


@contextlib.contextmanager
def _recording_specializations():
    """Under the interpreter: record every generated kernel's launch keys (``_interpreted_key``)."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("patterncc_kernels_"):
            fn = f"{self.fn.__module__}.{self.fn.__name__}"
            _interpreted_keys.setdefault(fn, set()).add(_interpreted_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded
    try:
        yield
    finally:
        InterpretedFunction.run = run
        _interpreted_keys.clear()
