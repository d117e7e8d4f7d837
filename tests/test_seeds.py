"""seeds.py: a process's compiled kernels, put into Triton's in-memory cache by the next.

A real kernel compiled for sm_90 on the CPU (no GPU needed to compile): its
entry in a JITFunction's per-device cache is recorded, then planted into
the same function's emptied cache as a new process would, and must come
back as the same binary under the same key, with the launcher's signature
and constants. What must keep it out: another Triton installation or
environment, a Triton cache that lost the binary, a corrupt record,
``PATTERNCC_SEEDS`` other than 1, a JIT hook or a compilation listener.
On the card, the last test runs a new process on planted kernels against
Triton's own lookup.
"""

from __future__ import annotations

import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from patterncc.backends.triton import cache, seeds  # noqa: E402

KEY = "[('*fp32', 'D'), ('i32', ''), ('constexpr', 16)]{'num_warps': 4}"  # Triton's key for one launch
SIGNATURE = {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
CONSTANTS = {(3,): 16}


def _scaled_copy(x, y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n) * 2.0, mask=i < n)


# Compiled in a process of its own: in one that has run the interpreter, Triton's language objects are
# patched for it, and compiling for a card fails.
_COMPILE = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
import test_seeds as t
src = ASTSource(JITFunction(t._scaled_copy), t.SIGNATURE, t.CONSTANTS)
print("HASH " + triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).hash)
"""


@pytest.fixture(scope="module")
def compiled_once(tmp_path_factory):
    """Triton's cache holding ``_scaled_copy`` compiled for sm_90, and its hash."""
    import os
    import subprocess
    import sys

    triton_dir = tmp_path_factory.mktemp("triton")
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_dir))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HASH ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return triton_dir, lines[0].split()[1]


@pytest.fixture
def kernel(compiled_once, tmp_path, monkeypatch):
    """A module holding one JITFunction, with that compiled kernel in its device 0 cache."""
    from triton.compiler import CompiledKernel
    from triton.runtime.cache import get_cache_manager

    triton_dir, hash_ = compiled_once
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "pcc"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_dir))
    monkeypatch.setenv("PATTERNCC_SEEDS", "1")
    monkeypatch.setattr(seeds, "_planted", set())
    monkeypatch.setattr(seeds, "_broken", False)
    fn = JITFunction(_scaled_copy)
    group = get_cache_manager(hash_).get_group("_scaled_copy.json")
    compiled = CompiledKernel(ASTSource(fn, dict(SIGNATURE), dict(CONSTANTS)), group, hash_)
    fn.device_caches[0] = ({KEY: compiled}, {}, None, None, None)
    module = types.ModuleType("patterncc_kernels_seedtest")
    module.copy = fn
    return module, fn, compiled


def _forget(fn):
    """The function as a new process has it: nothing in its in-memory cache."""
    fn.device_caches[0] = ({}, {}, None, None, None)


def test_a_recorded_kernel_is_planted_as_it_was(kernel):
    module, fn, compiled = kernel
    seeds.record(module, 0)
    _forget(fn)
    planted = seeds.plant(module, 0)
    assert len(planted) == 1
    got = fn.device_caches[0][0][KEY]
    assert got is planted[0]
    assert got.hash == compiled.hash and got.name == compiled.name
    assert got.kernel == compiled.asm["cubin"]  # the same binary
    assert got.src.fn is fn and got.src.signature == compiled.src.signature
    assert got.src.constants == compiled.src.constants
    assert got.metadata.num_warps == 4 and got.metadata.shared == compiled.metadata.shared


def test_planting_is_once_per_module_and_device(kernel):
    module, fn, _ = kernel
    seeds.record(module, 0)
    _forget(fn)
    assert len(seeds.plant(module, 0)) == 1
    _forget(fn)
    assert seeds.plant(module, 0) == []


def test_a_kernel_already_in_the_cache_is_left_alone(kernel):
    module, fn, compiled = kernel
    seeds.record(module, 0)
    assert seeds.plant(module, 0) == []
    assert fn.device_caches[0][0][KEY] is compiled


def test_another_installation_plants_nothing(kernel, monkeypatch):
    module, fn, _ = kernel
    seeds.record(module, 0)
    _forget(fn)
    monkeypatch.setattr(seeds, "_installation", lambda: ["another triton", []])
    assert seeds.plant(module, 0) == []
    assert fn.device_caches[0][0] == {}


def test_a_binary_gone_from_tritons_cache_is_skipped(kernel, tmp_path, monkeypatch):
    module, fn, _ = kernel
    seeds.record(module, 0)
    _forget(fn)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "emptied"))
    assert seeds.plant(module, 0) == []


def test_a_corrupt_record_is_ignored(kernel):
    module, fn, _ = kernel
    seeds.record(module, 0)
    path = cache._writable_dir() / seeds._name(module)
    path.write_text(path.read_text().replace('"key"', '"kee"'))  # the checksum no longer matches
    _forget(fn)
    assert seeds.plant(module, 0) == []


@pytest.mark.parametrize("how", ["unset", "env", "hook", "listener"])
def test_turned_off(kernel, monkeypatch, how):
    module, fn, _ = kernel
    seeds.record(module, 0)
    _forget(fn)
    if how == "unset":  # off by default: not yet run on a card
        monkeypatch.delenv("PATTERNCC_SEEDS")
    elif how == "env":
        monkeypatch.setenv("PATTERNCC_SEEDS", "0")
    elif how == "hook":
        monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **k: None)
    else:
        monkeypatch.setattr(triton.knobs.compilation, "listener", lambda *a, **k: None)
    assert seeds.plant(module, 0) == []


def test_recording_adds_and_does_not_repeat(kernel):
    module, fn, compiled = kernel
    seeds.record(module, 0)
    other = KEY.replace("'num_warps': 4", "'num_warps': 8")
    fn.device_caches[0][0][other] = compiled
    seeds.record(module, 0)
    seeds.record(module, 0)
    assert [entry["key"] for entry in seeds._read(module)["kernels"]] == [KEY, other]


def test_a_kernel_whose_constants_are_not_literals_is_not_recorded(kernel):
    module, fn, compiled = kernel
    compiled.src.constants[(3,)] = object()  # no repr that reads back
    seeds.record(module, 0)
    assert seeds._read(module) is None


def test_a_record_past_its_bound_starts_over(kernel, monkeypatch):
    module, fn, compiled = kernel
    monkeypatch.setattr(seeds, "MAX_KERNELS", 2)
    counts = []
    for warps in (1, 2):  # beside KEY's 4 warps
        fn.device_caches[0][0][KEY.replace("'num_warps': 4", f"'num_warps': {warps}")] = compiled
        seeds.record(module, 0)
        counts.append(len(seeds._read(module)["kernels"]))
    assert counts == [2, 1]  # the third kernel found two recorded: a record of the new one alone


# ----------------------------------------------------------------------------
# On the card: a new process on planted kernels, against Triton's own lookup
# ----------------------------------------------------------------------------

_ON_THE_CARD = """
import json, sys
import torch
import triton.compiler
import patterncc as pcc
from patterncc.backends.triton import seeds

compiles, planted = [], []
real_compile, real_plant = triton.compiler.compile, seeds.plant
def compiling(*args, **kwargs):  # Triton's compile, or its disk cache lookup
    compiles.append(1)
    return real_compile(*args, **kwargs)
def planting(module, device):
    got = real_plant(module, device)
    planted.extend(got)
    return got
triton.compiler.compile, seeds.plant = compiling, planting

torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
o = pcc.compile(sys.argv[1])(q, k, v)
o.float().square().sum().backward()
torch.save([x.detach().cpu() for x in (o, q.grad, k.grad, v.grad)], sys.argv[2])
print("RESULT " + json.dumps(dict(compiles=len(compiles), planted=len(planted))))
"""


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_card_a_new_process_runs_planted_kernels(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch

    env = dict(os.environ, PATTERNCC_CACHE_DIR=str(tmp_path / "pcc"), TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PATTERNCC_STANDIN="0", PATTERNCC_SEEDS="1")
    env.pop("TRITON_INTERPRET", None)

    def process(name: str, **more) -> dict:
        proc = subprocess.run([sys.executable, "-c", _ON_THE_CARD, "fixed(128, 32)", str(tmp_path / name)],
                              env=dict(env, **more), capture_output=True, text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        return json.loads(lines[0][len("RESULT "):])

    first = process("first")  # compiles, and records what it compiled
    assert first["compiles"] >= 3 and first["planted"] == 0, first
    planted = process("planted")  # finds every kernel planted: Triton neither compiles nor looks up
    assert planted["compiles"] == 0 and planted["planted"] >= 3, planted
    looked_up = process("looked_up", PATTERNCC_SEEDS="0")  # Triton's own lookup in its disk cache
    assert looked_up["compiles"] >= 3 and looked_up["planted"] == 0, looked_up
    for a, b in zip(torch.load(tmp_path / "planted"), torch.load(tmp_path / "looked_up")):
        assert torch.equal(a, b)  # the same binaries on the same inputs: the same bits
