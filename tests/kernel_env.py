"""The environment every file that runs the generated kernels needs: Triton's
interpreter without a GPU, and a private kernel cache. A test file imports
the fixture by name (``from kernel_env import interpreter_and_cache``) and it
applies to that file alone."""

from __future__ import annotations

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
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def triton_specializations() -> int:
    """How many specializations Triton has compiled on the GPU of every
    generated kernel module loaded in this process (0 under the interpreter,
    which compiles nothing): a count that must not grow when only lengths do."""
    if not GPU:
        return 0
    import triton

    kernels = {id(fn): fn for name, module in list(sys.modules.items()) if name.startswith("patterncc_kernels_")
               for fn in vars(module).values() if isinstance(fn, triton.JITFunction)}
    return sum(len(cache[0]) for fn in kernels.values() for cache in fn.device_caches.values())
