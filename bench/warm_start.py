"""Where a warm start's first call spends its time (one GPU).

    python bench/warm_start.py [--top 30] [--front] [--cold] [--bytecode]

Runs the cold-start case of ``probes.cold_start``
(the first forward+backward of a pattern no cache has seen) in a fresh
process to fill the disk caches, then twice more on the warm caches: once
plain (the warm-start figure, aimed under 0.5 s) and once with the
first call alone under cProfile, printing the functions with the most
cumulative time, so the seconds can be assigned to layout, module load,
Triton's cache lookup (``triton_key``), cubin load and launcher build.
``--cold`` profiles the cold process instead (on empty caches: where the
seconds of a first-ever call go, the compile pool's and Triton's launcher
builds included, as the main thread waits for them). ``--bytecode`` gives
every process one shared bytecode cache (``PYTHONPYCACHEPREFIX``), as an
installed package has, so that the warm figures leave out compiling the
imported modules' source (the GPU machine's image keeps no bytecode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from probes import FIRST_CALL

# --front: the user's path, pcc.compile (the planner, the op, the backend imported at its first use)
_FRONT_CALL = """
import json, sys, time
t_import = time.perf_counter()
import torch
import patterncc as pcc
spec = json.loads(sys.argv[1])
n, H, D = spec["n"], spec["H"], spec["D"]
q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
out = {"import_s": time.perf_counter() - t_import}
t0 = time.perf_counter()
attn = pcc.compile(f"strided({spec['w'] % 200 + 64})")
attn(q, k, v).sum().backward()
torch.cuda.synchronize()
out["first_call_s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(out))
"""

_SETTLE = """
from patterncc.backends.triton import standin
while standin.pending():
    time.sleep(0.01)
"""

_PROFILED = """
import cProfile, io, pstats, sys
source = {source!r}
call = "attn(q, k, v).sum().backward()"
assert call in source
# profile the first call alone (imports excluded, as in the timed figure)
source = source.replace(call, "_profiler.enable(); " + call + "; torch.cuda.synchronize(); _profiler.disable()")
profiler = cProfile.Profile()
exec(compile(source, "<first call>", "exec"), {{"__name__": "__main__", "_profiler": profiler}})
stream = io.StringIO()
pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats({top})
pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
print(stream.getvalue())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--front", action="store_true",
                    help="time pcc.compile(strided(l))'s first call (the user's path) instead of TritonAttention's")
    ap.add_argument("--cold", action="store_true", help="profile the first call on empty caches instead")
    ap.add_argument("--bytecode", action="store_true", help="one bytecode cache shared by every process (see above)")
    args = ap.parse_args()
    spec = json.dumps(dict(n=4096, H=16, D=64, w=777 + int(time.time()) % 1000, g=33, who="pcc"))
    # untimed, after the call: a first call that ran on the stand-in kernels leaves the pattern's own
    # compiling in a thread; the next process finds them compiled only if this one lets them finish
    source = textwrap.dedent(_FRONT_CALL if args.front else FIRST_CALL) + _SETTLE
    with tempfile.TemporaryDirectory(prefix="patterncc-warm-") as tmp:
        env = dict(os.environ, PATTERNCC_CACHE_DIR=os.path.join(tmp, "pcc"), TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        env.pop("TRITON_INTERPRET", None)
        if args.bytecode:
            env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        profiled = [sys.executable, "-c", _PROFILED.format(source=source, top=args.top), spec]
        runs = [("cold, profiled", profiled)] if args.cold else [
            ("cold", [sys.executable, "-c", source, spec]), ("warm", [sys.executable, "-c", source, spec]),
            ("warm, profiled", profiled)]
        for label, cmd in runs:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
            wall = time.perf_counter() - t0
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            print(f"== {label}: process wall {wall:.2f} s, {result[0] if result else proc.stderr[-2000:]}", flush=True)
            if label.endswith("profiled"):
                print(proc.stdout, flush=True)


if __name__ == "__main__":
    main()
