"""Where a new pattern's first call goes: the stand-in and the pattern's own kernels, moment by moment.

    python bench/first_call_phases.py "strided(192)" "strided(128)" ... [D]   (PHASES_D=128 for D = 128)

Each pattern runs in a fresh process; all share one fresh cache directory
(patterncc's and Triton's), so the first is cold, the later ones find what
the earlier compiled. Each process times, from the call on: the stand-in's
run built (layout and bitmap: ``standin.StandIns.run``), every
``compile_ahead`` (stand-in or own) from its start until its kernels are
loaded, the forward issued, the first forward+backward done, the pattern's
own kernels ready, and a second forward+backward. bf16, B = 1, H = 16,
n = 4096. Prints one ``MARKS`` list of ``(event, seconds)`` per pattern.
"""

import os
import subprocess
import sys
import tempfile

SCRIPT = r'''
import sys, time
import torch
D = int(sys.argv[2])
q, k, v = (torch.randn(1, 16, 4096, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
torch.cuda.synchronize()
import patterncc as pcc
from patterncc.backends.triton import runtime, standin

marks = []
def mark(what):
    marks.append((what, round(time.perf_counter() - t0, 3)))

make = standin.StandIns.run
def run(self, *shape):
    mark("standin.run start")
    made = make(self, *shape)
    mark("standin.run end")
    return made
standin.StandIns.run = run

compile_ahead = runtime.compile_ahead
def timed(launches, *args, **kwargs):
    if all(r in runtime._AHEAD for r, _ in launches):
        return compile_ahead(launches, *args, **kwargs)
    who = "standin" if standin.is_standin(launches) else "own"
    mark(who + " compile start")
    done = compile_ahead(launches, *args, **kwargs)
    mark(who + " loaded")
    return done
runtime.compile_ahead = timed

t0 = time.perf_counter()
attn = pcc.compile(sys.argv[1])
o = attn(q, k, v)
mark("forward issued")
o.sum().backward()
torch.cuda.synchronize()
mark("f+b done")
while standin.pending():
    time.sleep(0.01)
mark("own ready")
attn(q, k, v).sum().backward()
torch.cuda.synchronize()
mark("second f+b done")
print("MARKS", marks)
'''


def main() -> None:
    d = tempfile.mkdtemp(prefix="patterncc-phases-")
    env = dict(os.environ, PATTERNCC_CACHE_DIR=d + "/pcc", TRITON_CACHE_DIR=d + "/triton")
    env.pop("TRITON_INTERPRET", None)
    head_dim = os.environ.get("PHASES_D", "64")
    for source in sys.argv[1:]:
        # cwd: a checkout's own patterncc/ must not shadow the installed one on sys.path[0]
        out = subprocess.run([sys.executable, "-c", SCRIPT, source, head_dim], env=env, capture_output=True,
                             text=True, cwd=d)
        marks = [line for line in out.stdout.splitlines() if line.startswith("MARKS")]
        print(source, marks, out.stderr[-2000:] if out.returncode else "", flush=True)


if __name__ == "__main__":
    main()
