"""A new pattern's first forward+backward, patterncc beside FlexAttention (one GPU).

    python bench/cold_start.py [--n 4096] [--cases strided,fixed,...] [--json out.json]
    python bench/cold_start.py --before [--cases ...]   # the stand-in changes, before and now, one run
    python bench/cold_start.py --warmup [--cases ...]   # cold against after `patterncc warmup`

For each case, three fresh processes, each timing only its first call
(imports and input creation excluded, the GPU synchronized):

- ``pcc cold``: ``pcc.compile(pattern)(q, k, v).sum().backward()`` with empty
  patterncc, Triton and Inductor caches: the pattern is new to every cache;
- ``pcc new ints``: in that same process, right after, the first call of a
  pattern that differs only in its integers (``strided(192)`` after
  ``strided(128)``): it shares the first one's compiled kernels (codegen.py);
- ``pcc cold, serial``: ``pcc cold`` with ``PATTERNCC_COMPILE_AHEAD=0``: the
  kernels compile one by one at their launches instead of in parallel;
- ``pcc cold, loaded at launch``: ``pcc cold`` with ``PATTERNCC_LOAD_AHEAD=0``:
  each compiled kernel is loaded and its launcher built at its first
  launch, one after the other, instead of side by side ahead of them;
- ``pcc new pattern, used caches``: a fresh process whose caches another
  pattern's process filled (its integers differ: ``strided(192)`` ran first,
  untimed), as for someone who has used patterncc before and writes a new
  pattern: Triton's launchers and the imports' bytecode are there, the
  pattern's kernels are not;
- ``pcc warm``: the same in a second process on the caches the first one
  filled (a new process of a pattern seen before: the disk cache);
- ``flex cold``: FlexAttention's first call on empty caches:
  ``create_block_mask(_compile=True)`` over an equivalent hand-written
  mask_mod, then ``torch.compile(flex_attention)`` forward+backward.

``--warmup`` instead times, per case, a cold first call beside one in a
fresh process whose caches only ``patterncc warmup`` (its defaults, what
``scripts/setup.sh`` runs on a GPU) filled: the stand-in's kernels are
there, the pattern's are not; with the warmup's own seconds.

A first call that ran on the stand-in kernels (backends/triton/standin.py:
the pattern's own were still compiling) is marked so, with the seconds
until its own were ready.

Every process of a run shares one bytecode cache (``PYTHONPYCACHEPREFIX``),
filled first by a process that only imports torch, Triton, scipy and every
patterncc module (not timed): an installed package has its bytecode, and a
first call should not be charged for compiling the importers' Python
source. ``--no-bytecode`` leaves the cache out (the GPU machine's image
keeps none, so every process then compiles all the source it imports).

Cases are the ones whose cold starts were measured on the H200 before
(strided 6.2 s, fixed 11.3 s, the cycle() mix 10.8 s, GQA strided 10.0 s,
D = 128 strided 11.9 s), bf16, B = 1, H = 16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

# name -> (patterncc source, Flex mask kind, kv heads, head dim, the same with new integers)
CASES = {
    "strided": ("strided(128)", "strided", 16, 64, "strided(192)"),
    "fixed": ("fixed(128, 32)", "fixed", 16, 64, "fixed(192, 48)"),
    "cycle": ("cycle(strided(128), fixed(128, 32))", "cycle", 16, 64, "cycle(strided(192), fixed(192, 48))"),
    "gqa-strided": ("strided(128)", "strided", 4, 64, "strided(192)"),
    "d128-strided": ("strided(128)", "strided", 16, 128, "strided(192)"),
}

_FIRST_CALL = """
import json, sys, time
import torch
spec = json.loads(sys.argv[1])
n, H, Hkv, D = spec["n"], spec["H"], spec["Hkv"], spec["D"]
q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(1, Hkv, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
torch.cuda.synchronize()
result = {}
if spec["who"] == "pcc":
    import patterncc as pcc
    if spec.get("before"):  # the first call as it was: own compile at once, the stand-in's stages the config's
        from patterncc.backends.triton import standin
        standin.HOLD_SECONDS, standin.STAGES = 0.0, None
    t0 = time.perf_counter()
    pcc.compile(spec["source"])(q, k, v).sum().backward()
    torch.cuda.synchronize()
    result["first_call_s"] = time.perf_counter() - t0
    from patterncc.backends.triton import standin
    # the pattern's own kernels still compiling: the first call ran the stand-in's
    result["standin"] = standin.pending()
    while standin.pending():
        time.sleep(0.01)
    result["own_ready_s"] = time.perf_counter() - t0
    if spec.get("then"):
        t1 = time.perf_counter()
        pcc.compile(spec["then"])(q, k, v).sum().backward()
        torch.cuda.synchronize()
        result["then_s"] = time.perf_counter() - t1
        result["then_standin"] = standin.pending()
else:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    l, c = 128, 32
    def strided(qi, ki):
        return (ki <= qi) & (((qi - ki) < l) | ((qi - ki) % l == 0))
    def fixed(qi, ki):
        return (ki <= qi) & ((qi // l == ki // l) | (ki % l >= l - c))
    def mask_mod(b, h, qi, ki):
        if spec["mask"] == "cycle":
            return torch.where(h % 2 == 0, strided(qi, ki), fixed(qi, ki))
        return strided(qi, ki) if spec["mask"] == "strided" else fixed(qi, ki)
    heads = H if spec["mask"] == "cycle" else None
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, None, heads, n, n, device="cuda", _compile=True)
    torch.compile(flex_attention)(q, k, v, block_mask=bm, enable_gqa=Hkv != H).sum().backward()
    torch.cuda.synchronize()
    result["first_call_s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(result))
"""


_IMPORT_ALL = """
import scipy.sparse, torch, triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
import patterncc, patterncc.backends.reference, patterncc.backends.triton.runtime, patterncc.backends.triton.planned
"""

BYTECODE: dict[str, str] = {}  # PYTHONPYCACHEPREFIX for every process of the run (main), unless --no-bytecode


def _env(cache_dir: str, **env_vars) -> dict:
    """A fresh process's environment, its caches under ``cache_dir``."""
    env = dict(os.environ, PATTERNCC_CACHE_DIR=os.path.join(cache_dir, "pcc"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"), **BYTECODE, **env_vars)
    env.pop("TRITON_INTERPRET", None)
    if BYTECODE:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def first_call(spec: dict, cache_dir: str, **env_vars) -> dict | str:
    """The first call's seconds (``first_call_s``; ``then_s``: the second
    pattern's, if the spec has one) in a fresh process whose caches live
    under ``cache_dir``, with ``env_vars`` set."""
    # cwd: a checkout's own patterncc/ must not shadow the installed one on sys.path[0]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_FIRST_CALL), json.dumps(spec)],
                          env=_env(cache_dir, **env_vars), capture_output=True, text=True, timeout=900, cwd=cache_dir)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}"
    return json.loads(lines[0][len("RESULT "):])


def warmup(cache_dir: str, heads: int = 16) -> str:
    """``patterncc warmup --heads heads`` (otherwise its defaults, as scripts/setup.sh runs it) into the
    caches under ``cache_dir``: its own line, or why it failed."""
    proc = subprocess.run([sys.executable, "-m", "patterncc", "warmup", "--heads", str(heads)], env=_env(cache_dir),
                          capture_output=True, text=True, timeout=900, cwd=cache_dir)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()
    return ("" if proc.returncode == 0 else "failed: ") + (lines[-1] if lines else str(proc.returncode))


def _seconds(result: dict | str, name: str) -> float | str:
    return result if isinstance(result, str) else result[name]


def _first_call(result: dict | str) -> float | str:
    """The first call's seconds, marked when it ran on the stand-in kernels
    (with the seconds until the pattern's own were ready)."""
    if isinstance(result, str) or not result.get("standin"):
        return _seconds(result, "first_call_s")
    return f"{result['first_call_s']:.2f} (stand-in; own {result['own_ready_s']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-bytecode", action="store_true", help="no shared bytecode cache (see above)")
    ap.add_argument("--before", action="store_true",
                    help="instead: cold and used-caches first calls now and as before the stand-in changes (own "
                         "compile started at once, not after the first backward; the stand-in in its config's "
                         "pipeline stages, not one), side by side")
    ap.add_argument("--warmup", action="store_true",
                    help="instead: cold first calls beside first calls after `patterncc warmup`, side by side")
    args = ap.parse_args()
    results = {}
    pycache = tempfile.TemporaryDirectory(prefix="patterncc-pycache-")
    if not args.no_bytecode:
        BYTECODE["PYTHONPYCACHEPREFIX"] = pycache.name
        env = dict(os.environ, **BYTECODE)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-c", _IMPORT_ALL], env=env, check=True, timeout=600, cwd=pycache.name)
    if args.before:
        return before_and_now(args)
    if args.warmup:
        return cold_and_warmed_up(args)
    print("| case | pcc cold (s) | pcc new ints, same process (s) | pcc cold, serial compile (s) "
          "| pcc cold, loaded at launch (s) | pcc new pattern, used caches (s) | pcc warm, new process (s) "
          "| flex cold (s) |\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.cases.split(","):
        source, mask, Hkv, D, then = CASES[name]
        spec = dict(n=args.n, H=args.heads, Hkv=Hkv * args.heads // 16, D=D, source=source, mask=mask)
        with tempfile.TemporaryDirectory(prefix="patterncc-cold-") as pcc_dir, \
                tempfile.TemporaryDirectory(prefix="patterncc-serial-") as serial_dir, \
                tempfile.TemporaryDirectory(prefix="patterncc-used-") as used_dir, \
                tempfile.TemporaryDirectory(prefix="patterncc-at-launch-") as at_launch_dir, \
                tempfile.TemporaryDirectory(prefix="flex-cold-") as flex_dir:
            cold = first_call(dict(spec, who="pcc", then=then), pcc_dir)
            serial = first_call(dict(spec, who="pcc"), serial_dir, PATTERNCC_COMPILE_AHEAD="0")
            at_launch = first_call(dict(spec, who="pcc"), at_launch_dir, PATTERNCC_LOAD_AHEAD="0")
            first_call(dict(spec, who="pcc", source=then), used_dir)  # untimed: another pattern fills the caches
            used = first_call(dict(spec, who="pcc"), used_dir)
            warm = first_call(dict(spec, who="pcc"), pcc_dir)
            flex = first_call(dict(spec, who="flex"), flex_dir)
        new_ints = _seconds(cold, "then_s")
        if isinstance(new_ints, float) and cold.get("then_standin"):
            new_ints = f"{new_ints:.2f} (stand-in)"
        row = {"pcc cold": _first_call(cold), "pcc new ints": new_ints,
               "pcc cold serial": _first_call(serial),
               "pcc cold, loaded at launch": _first_call(at_launch),
               "pcc new pattern, used caches": _first_call(used), "pcc warm": _first_call(warm),
               "flex cold": _seconds(flex, "first_call_s")}
        results[name] = row
        cells = [f"{x:.2f}" if isinstance(x, float) else x for x in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=args.n, heads=args.heads, results=results), f, indent=1)


def cold_and_warmed_up(args) -> None:
    """``--warmup``: each case's cold first call, and its first call after ``patterncc warmup``."""
    print("| case | pcc cold (s) | pcc after warmup (s) | warmup |\n|---|---|---|---|", flush=True)
    results = {}
    for name in args.cases.split(","):
        source, mask, Hkv, D, then = CASES[name]
        spec = dict(n=args.n, H=args.heads, Hkv=Hkv * args.heads // 16, D=D, source=source, mask=mask, who="pcc")
        with tempfile.TemporaryDirectory(prefix="patterncc-cold-") as cold_dir, \
                tempfile.TemporaryDirectory(prefix="patterncc-warmed-") as warmed_dir:
            row = {"cold": _first_call(first_call(spec, cold_dir)), "warmup": warmup(warmed_dir, args.heads)}
            row["after warmup"] = _first_call(first_call(spec, warmed_dir))
        results[name] = row
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else row[k] for k in ("cold", "after warmup", "warmup")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=args.n, heads=args.heads, cold_and_warmed_up=results), f, indent=1)


def before_and_now(args) -> None:
    """``--before``: each first call now and as before, in fresh processes, alternating."""
    print("| case | pcc cold now (s) | pcc cold before (s) | used caches now (s) | used caches before (s) |\n"
          "|---|---|---|---|---|", flush=True)
    results = {}
    for name in args.cases.split(","):
        source, mask, Hkv, D, then = CASES[name]
        spec = dict(n=args.n, H=args.heads, Hkv=Hkv * args.heads // 16, D=D, source=source, mask=mask, who="pcc")
        row = {}
        for label, before in (("now", False), ("before", True)):
            with tempfile.TemporaryDirectory(prefix="patterncc-cold-") as cold_dir, \
                    tempfile.TemporaryDirectory(prefix="patterncc-used-") as used_dir:
                row[f"cold {label}"] = _first_call(first_call(dict(spec, before=before), cold_dir))
                first_call(dict(spec, source=then, before=before), used_dir)  # untimed: fills the caches
                row[f"used {label}"] = _first_call(first_call(dict(spec, before=before), used_dir))
        results[name] = row
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else row[k]
                 for k in ("cold now", "cold before", "used now", "used before")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=args.n, heads=args.heads, before_and_now=results), f, indent=1)


if __name__ == "__main__":
    main()
