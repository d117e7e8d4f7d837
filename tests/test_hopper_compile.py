"""The generated kernels compile for Hopper (sm_90) without a GPU.

The interpreter runs the kernels' Python, but some of their code only a GPU
compile reaches: the 16-bit softcap's ``tanh.approx`` (inline PTX, which the
interpreter cannot run), the layouts the compiler chooses for each tile,
the constexpr branches the launches select. Here calls like a user's
(every score term, a planned pattern, GQA, a packed batch, decoding from a
cache, the stand-in kernels) run under the interpreter with the GPU's tile
table (``default_config``), every launch of a generated kernel is recorded
as Triton would specialize it, and a process without the interpreter
compiles each of those specializations for sm_90 with Triton's own compiler
and ptxas. A kernel change that only a card would reject fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_env import interpreter_and_cache, launch_arguments  # noqa: F401 (autouse: the interpreter, a private cache)

import patterncc as pcc  # noqa: E402
from patterncc.backends.triton.config import default_config  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the card's own tests compile everything")

# Triton's names for the tensor dtypes the kernels take.
_POINTERS = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
             torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16"}


def _specialization(fn, args, kwargs) -> dict:
    """One launch as Triton would compile it (its rules, as ``kernel_env._interpreted_key`` models them):
    constexprs by value; None as a constexpr; an integer 1 as a constexpr (unless the kernel asks not
    to specialize it); tensors by dtype, 16-byte aligned ones and integers divisible by 16 marked so."""
    params = []
    for name, x, constexpr, specialized in launch_arguments(fn, args, kwargs):
        if constexpr or x is None:
            params.append([name, "constexpr", x if not hasattr(x, "value") else x.value, False])
        elif isinstance(x, bool):
            params.append([name, "i1", None, False])
        elif isinstance(x, int):
            if x == 1 and specialized:
                params.append([name, "constexpr", 1, False])
            else:
                params.append([name, "i32" if -2**31 <= x < 2**31 else "i64", None, specialized and x % 16 == 0])
        elif isinstance(x, float):
            params.append([name, "fp32", None, False])
        else:
            params.append([name, _POINTERS[x.dtype], None, x.data_ptr() % 16 == 0])
    return dict(module=sys.modules[fn.fn.__module__].__file__, kernel=fn.fn.__name__, params=params,
                num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))


def _users_calls(monkeypatch):
    """Calls as users make them, with the GPU's tiles (D = 64, bf16), small enough to interpret."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_(grad)

    config = default_config(64, "bfloat16")
    terms = dict(sinks=torch.randn(4, generator=g, requires_grad=True),
                 rel_bias=torch.randn(4, 9, generator=g, requires_grad=True))
    scored = pcc.compile("sliding_window(100) with softcap(20), alibi", backend="triton", config=config)
    q, k, v = rand(1, 4, 200, 64), rand(1, 2, 200, 64), rand(1, 2, 200, 64)
    scored(q, k, v, **terms).float().sum().backward()  # every term, GQA
    planned = pcc.compile("strided(32)", backend="triton", plan="planned", config=config)
    q, k, v = rand(1, 2, 256, 64), rand(1, 2, 256, 64), rand(1, 2, 256, 64)
    planned(q, k, v).float().sum().backward()  # components in their token orders, merged
    cu = torch.tensor([0, 70, 75, 256], dtype=torch.int32)
    planned(q, k, v, cu_seqlens=cu).float().sum().backward()  # a packed batch
    with torch.no_grad():  # decoding: the query-rows kernel, from a cache
        cache = rand(2, 2, 300, 64, grad=False)
        scored(rand(2, 4, 1, 64, grad=False), cache, cache, cache_seqlens=[300, 123], sinks=terms["sinks"])
    monkeypatch.setenv("PATTERNCC_STANDIN", "always")  # the stand-in's bitmap kernels
    fresh = pcc.compile("fixed(64, 16)", backend="triton")
    fresh(*(rand(1, 2, 256, 64) for _ in range(3))).float().sum().backward()


_COMPILE = r"""
import importlib.util, json, os, sys
from concurrent.futures import ThreadPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

modules = {}
launches = json.load(open(sys.argv[1]))
for launch in launches:
    path = launch["module"]
    if path not in modules:
        spec = importlib.util.spec_from_file_location("patterncc_kernels_" + str(len(modules)), path)
        modules[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[path])


def compiled(launch):  # None, or why it failed
    fn = getattr(modules[launch["module"]], launch["kernel"])
    signature = {name: kind for name, kind, _, _ in launch["params"]}
    constexprs = {name: value for name, kind, value, _ in launch["params"] if kind == "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, _, _, aligned) in enumerate(launch["params"]) if aligned}
    try:
        triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
    except Exception as err:
        return f"{launch['kernel']}: {type(err).__name__}: {str(err)[:600]}\n  constexprs {constexprs}"


# threads, as patterncc's own compile pool: ptxas and much of Triton's compile run outside the GIL
with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    failed = [why for why in pool.map(compiled, launches) if why]
print(json.dumps(dict(compiled=len(launches) - len(failed), failed=failed)))
"""


def test_every_specialization_a_users_calls_launch_compiles_for_sm_90(tmp_path, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    if not (Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas to compile for sm_90")
    launches = {}
    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("patterncc_kernels_"):
            launch = _specialization(self, args, kwargs)
            launches[json.dumps(launch, sort_keys=True)] = launch
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    _users_calls(monkeypatch)
    kernels = {launch["kernel"] for launch in launches.values()}
    # every family: the training kernels, the query-rows kernel, the stand-in's
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_rows_fwd"} <= kernels, kernels
    assert any("read from a bitmap" in Path(launch["module"]).read_text()[:600] for launch in launches.values())
    listing = tmp_path / "launches.json"
    listing.write_text(json.dumps(list(launches.values())))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(listing)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["failed"]:
        pytest.fail(f"{len(result['failed'])} of {len(launches)} specializations do not compile for sm_90:\n"
                    + "\n".join(result["failed"]))
    assert result["compiled"] == len(launches) >= 10
