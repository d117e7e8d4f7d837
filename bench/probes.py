"""What the maintained bench scripts need beyond ``patterncc bench``: the
performance record's patterns, tile specs and tile sweeps (for
``backends/triton/config.py``'s table), per-kernel resources (registers,
spills, shared memory), and first-call timing in fresh processes.

Imported by ``bench_triton.py`` and ``warm_start.py`` (run from the
repository root as ``python bench/<script>.py``, so this folder is on
``sys.path``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace

import torch

from patterncc import ir
from patterncc.backends.triton.bench import _DTYPES, _bench
from patterncc.backends.triton.config import KernelConfig
from patterncc.backends.triton.runtime import TritonAttention

C = ir.Causal()

# The performance record's patterns, written with IR nodes (the standard library's bodies).
PATTERNS = {
    "causal": C,
    "sliding_window(1024)": C & ir.Local(1024),
    "local_global(512,64)": C & (ir.Local(512) | ir.Global(64)),
    "fixed(128,32)": C & (ir.Block(128) | ir.Summary(128, 32)),
    "strided(128)": C & (ir.Local(128) | ir.Stride(128)),
}


def tile_spec(text: str) -> tuple[int, ...]:
    """A command line's tile set: "128x64:4:3" -> (128, 64, 4, 3) (forward M x N,
    warps, stages); "32x64/64x64:4:2" -> (32, 64, 64, 64, 4, 2) (backward
    M1 x N1 / M2 x N2, warps, stages)."""
    try:
        tiles, warps, stages = text.split(":")
        return (*(int(t) for pair in tiles.split("/") for t in pair.split("x")), int(warps), int(stages))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxN:WARPS:STAGES or M1xN1/M2xN2:WARPS:STAGES, got {text!r}")


def backward_tile_spec(text: str) -> tuple[int, int, int, int, int, int]:
    """``tile_spec`` of a backward tile set only."""
    spec = tile_spec(text)
    if len(spec) != 6:
        raise argparse.ArgumentTypeError(f"expected M1xN1/M2xN2:WARPS:STAGES, got {text!r}")
    return spec


def with_backward_tiles(config: KernelConfig, spec) -> KernelConfig:
    """``config`` with a ``backward_tile_spec`` tuple's tiles, warps and stages."""
    m1, n1, m2, n2, warps, stages = spec
    return replace(config, block_m1=m1, block_n1=n1, block_m2=m2, block_n2=n2, bwd_warps=warps, bwd_stages=stages)


# ----------------------------------------------------------------------------
# Cold and warm starts, each in a fresh process
# ----------------------------------------------------------------------------

FIRST_CALL = """
import json, sys, time
t_import = time.perf_counter()
import torch
from patterncc import ir
from patterncc.backends.triton import TritonAttention
spec = json.loads(sys.argv[1])
n, H, D = spec["n"], spec["H"], spec["D"]
pattern = ir.Causal() & (ir.Local(spec["w"]) | ir.Sink(spec["g"]))
q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
out = {"import_s": time.perf_counter() - t_import}
if spec["who"] == "pcc":
    attn = TritonAttention(pattern)
    t0 = time.perf_counter()
    attn(q, k, v).sum().backward()
else:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (((qi - ki) < spec["w"]) | (ki < spec["g"]))
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, None, None, n, n, device="cuda", _compile=True)
    torch.compile(flex_attention)(q, k, v, block_mask=bm).sum().backward()
torch.cuda.synchronize()
out["first_call_s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(out))
"""


def cold_start(n: int = 4096, heads: int = 16, head_dim: int = 64, who: str = "pcc") -> dict:
    """First forward+backward of a pattern no cache has seen (fresh process, empty
    patterncc/Triton/Inductor caches), then of a second process on the warm disk caches."""
    w, g = 777 + int(time.time()) % 1000, 33  # a pattern of its own: no cache has seen it
    spec = dict(n=n, H=heads, D=head_dim, w=w, g=g, who=who)
    with tempfile.TemporaryDirectory(prefix="patterncc-cold-") as tmp:
        env = dict(os.environ, PATTERNCC_CACHE_DIR=os.path.join(tmp, "pcc"), TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
        env.pop("TRITON_INTERPRET", None)
        result = {}
        for label in ("cold", "warm"):
            # cwd: a checkout's own patterncc/ must not shadow the installed one on sys.path[0]
            proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST_CALL), json.dumps(spec)],
                                  env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                result[label] = f"failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
            else:
                result[label] = json.loads(lines[0][len("RESULT "):])["first_call_s"]
        return result


# ----------------------------------------------------------------------------
# Tile sweep: candidates for config.py's table
# ----------------------------------------------------------------------------

FWD_CANDIDATES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                  (128, 64, 4, 4), (128, 32, 4, 3)]
BWD_CANDIDATES = [(64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (32, 128, 128, 64, 8, 3),
                  (64, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 8, 2), (64, 64, 128, 64, 4, 3),
                  (32, 64, 64, 32, 4, 2)]


def sweep(pattern: ir.Pattern, n: int = 16384, heads: int = 16, head_dim: int = 64, dtype: str = "bfloat16",
          rep: int = 50, fwd=FWD_CANDIDATES, bwd=BWD_CANDIDATES) -> str:
    """Forward and backward time of each candidate tile set (default block) at
    one shape: ``fwd`` (M, N, warps, stages) and ``bwd`` (M1, N1, M2, N2,
    warps, stages) tuples, default the lists above."""
    dt = _DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=dt, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    base = TritonAttention(pattern).config_for(head_dim, dt)
    lines = [f"sweep: {pattern} n={n} H={heads} D={head_dim} {dtype} (default {base.describe()})",
             "| kernel | tiles (M, N[, M2, N2]), warps, stages | ms |", "|---|---|---|"]
    for m, nn, w, s in fwd:
        attn = TritonAttention(pattern, config=replace(base, block_m=m, block_n=nn, fwd_warps=w, fwd_stages=s))
        lines.append(f"| forward | {m}x{nn}, {w}, {s} | {_try(lambda: _bench(lambda: attn(q, k, v), rep=rep))} |")
    for spec in bwd:
        attn = TritonAttention(pattern, config=with_backward_tiles(base, spec))
        m1, n1, m2, n2, w, s = spec

        def backward_only():
            o = attn(q, k, v)
            return lambda: o.backward(do, retain_graph=True)

        lines.append(f"| backward | {m1}x{n1} / {m2}x{n2}, {w}, {s} | "
                     f"{_try(lambda: _bench(backward_only(), grad_to_none=[q, k, v], rep=rep))} |")
    return "\n".join(lines)


def _try(fn) -> str:
    try:
        return f"{fn():.3f}"
    except Exception as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


# ----------------------------------------------------------------------------
# Registers, spills and shared memory per kernel, without a GPU
# ----------------------------------------------------------------------------


def resources(pattern: ir.Pattern = C, head_dims=(64, 128, 256), dtypes=("bfloat16", "float32"),
              config: KernelConfig | None = None, capability: int = 90, variant: dict | None = None) -> str:
    """Compile every kernel for ``sm_<capability>`` (no GPU needed; not under
    TRITON_INTERPRET=1) as a launch without GQA specializes it (``GROUP`` =
    1 is a constant) and report registers per thread, spilled bytes (the
    stack frame) and shared memory, from ``cuobjdump -res-usage``, and the
    local-memory loads and stores in the code (``LDL``/``STL`` in the SASS:
    spills re-read inside a loop cost every step). ``variant``: constexprs
    that differ from a plain launch's (``dict(FULL_RUNS=True)``), set in every
    kernel that has them. A kernel that fails to compile gets a row saying
    so; ``PROBE_TRACE=1`` also prints each failure's chain of errors (a
    nested function's is the cause of its caller's). Compiling with another
    Triton (``pip install --target DIR triton==3.6.0`` and ``DIR`` first on
    ``PYTHONPATH``) checks a change against the card's version here."""
    import re
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget

    from patterncc.backends.triton.config import default_config

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    target = GPUTarget("cuda", capability, 32)
    lines = ["| D | dtype | kernel | tiles, warps, stages | registers | spilled bytes | LDL / STL | shared KiB |",
             "|---|---|---|---|---|---|---|---|"]
    # every row of the table: the long-walk one, and the short-walk one where it differs
    configs = [(D, dtype, config or default_config(D, dtype, walk=walk), "" if walk is None else " short")
               for dtype in dtypes for D in head_dims for walk in (None, 0.0)
               if walk is None or (config is None and default_config(D, dtype, walk=walk) != default_config(D, dtype))]
    for D, dtype, cfg, walk_label in configs:
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
        for name, source, tiles, warps, stages in kernel_sources(pattern, D, dtype, cfg, variant):
            try:
                compiled = triton.compile(source, target=target, options=dict(num_warps=warps, num_stages=stages))
                regs, stack, local = "?", "?", "?"
                if cuobjdump:
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        usage, sass = (subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True).stdout
                                       for flag in ("-res-usage", "-sass"))
                    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
                    regs, stack = found.groups() if found else ("?", "?")
                    ldl, stl = (len(re.findall(rf"\b{op}\b", sass)) for op in ("LDL", "STL"))
                    local = f"{ldl} / {stl}"
                lines.append(f"| {D} | {short}{walk_label} | {name} | {tiles}, {warps}, {stages} | {regs} | {stack} "
                             f"| {local} | {compiled.metadata.shared / 1024:.0f} |")
            except Exception as err:
                lines.append(f"| {D} | {short}{walk_label} | {name} | {tiles}, {warps}, {stages} | failed: "
                             f"{type(err).__name__}: {str(err).splitlines()[0][:100]} | | | |")
                if os.environ.get("PROBE_TRACE"):
                    while err is not None:
                        print(err, file=sys.stderr)
                        err = err.__cause__
    return "\n".join(lines)


def kernel_sources(pattern: ir.Pattern, D: int, dtype: str, cfg: KernelConfig, variant: dict | None = None):
    """``(name, ASTSource, tiles, warps, stages)`` of the forward, dK/dV and
    dQ kernels of ``pattern`` at head dim ``D`` as a launch without GQA
    specializes them (``GROUP`` = 1 is a constant): what ``triton.compile``
    takes to build them for any target, no GPU needed (not under
    TRITON_INTERPRET=1). ``variant``: constexprs that differ from a plain
    launch's (``dict(FULL_RUNS=True)``), set in every kernel that has them."""
    from triton.compiler import ASTSource

    from patterncc.backends.triton.runtime import load_kernels

    from patterncc.backends.triton.launch import _KernelTerms

    module = load_kernels(pattern, cfg)
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    # the forward's warps as a launch takes them (a relative bias takes at least 8)
    fwd_warps = _KernelTerms(rel=torch.zeros(1, 1) if (variant or {}).get("REL_BIAS") else None).fwd_warps(cfg)
    common = dict(HEAD_DIM=D, HEAD_DEPENDENT=False, DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                  GROUP=1, ADDR32=True)  # the backward's int32 row offsets, as every usual shape takes
    kernels = [
        ("forward", module.attn_fwd, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.fwd_stages),
         f"{cfg.block_m}x{cfg.block_n}", fwd_warps, cfg.fwd_stages),
        ("dK/dV", module.attn_bwd_dkdv, dict(BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, NUM_STAGES=cfg.bwd_stages),
         f"{cfg.block_m1}x{cfg.block_n1}", cfg.bwd_warps, cfg.bwd_stages),
        ("dQ", module.attn_bwd_dq, dict(BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2, NUM_STAGES=cfg.bwd_stages),
         f"{cfg.block_m2}x{cfg.block_n2}", cfg.bwd_warps, cfg.bwd_stages),
    ]
    for name, fn, constexprs, tiles, warps, stages in kernels:
        constexprs = {k: v for k, v in {**common, **constexprs, **(variant or {})}.items() if k in fn.arg_names}
        # every other constexpr at its default (natural order, no ADD_IN, ...), as a plain
        # launch passes it: left out, it would compile as a runtime argument with its branches
        constexprs.update({p.name: p.default for p in fn.params
                           if p.is_constexpr and p.name not in constexprs and p.default is not inspect.Parameter.empty})
        signature = {a: _arg_type(a, short) if a not in constexprs else "constexpr" for a in fn.arg_names}
        # what a launch specializes on: 16-byte aligned tensors, strides divisible by 16, and
        # the scalars the kernels leave to Triton to specialize (LSE_LEN, lse's and delta's row
        # length, which the host pads to a multiple of 16) a multiple of 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if signature[a].startswith("*") or a.startswith("stride_")
                 or (a in ("N", "N_TOK", "LSE_LEN") and not fn.params[i].do_not_specialize)}
        yield name, ASTSource(fn, signature, constexprs, attrs), tiles, warps, stages


def _arg_type(name: str, dtype: str) -> str:
    if name in ("LSE", "LSE_IN", "DELTA", "DK_IN", "DV_IN", "DQ_IN", "SLOPES", "SINK", "REL", "REL_REV", "PART", "SCR", "HIST"):
        return "*fp32"
    if name in ("RANDOM", "FULL_PTR", "FULL_STEPS", "PART_PTR", "PART_STEPS", "TILE_ORDER", "SEQS"):
        return "*i32"
    if name in ("Q", "K", "V", "O", "O_IN", "DO", "DK", "DV", "DQ"):
        return "*" + dtype
    return "fp32" if name in ("sm_scale", "softcap") else "i32"
