"""Time the planner on one CPU core and report what it computes.

    python bench/plan_timing.py

One row per (pattern, n): the strategy, computed blocks against causal
attention's block count at block 128 (the targets: strided(128) at
most 2.5%, fixed(128, 32) at most 30% at n = 65536), the first build's
time and the median of three (target: at most 100 ms at n = 1,048,576).
The planner's modules (and numpy) are imported before anything is timed:
``pcc.plan`` imports them on first use, ~80 ms once per process, which is
not a plan's build. Run it in a fresh process: the 1M rows' first build
then includes the page faults of fresh memory (fixed(128, 32)'s layout
holds 8.4M entries), which later builds in the process reuse.
"""

from __future__ import annotations

import os
import statistics
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import patterncc as pcc  # noqa: E402
import patterncc.planner  # noqa: E402,F401  (what pcc.plan imports on first use)

CASES = [("strided(128)", 65536), ("fixed(128, 32)", 65536), ("strided(128)", 1 << 20), ("fixed(128, 32)", 1 << 20),
         ("local_global(512, 64)", 1 << 20), ("cycle(causal & local(128), causal & stride(128))", 65536)]
BLOCK = 128


def main() -> None:
    print("| pattern | n | strategy | computed blocks | causal blocks | computed / causal | plan ms: first, "
          "median of 3 |")
    print("|---|---|---|---|---|---|---|")
    for src, n in CASES:
        pat = pcc.parse(src)
        times = []
        for _ in range(3):
            plan = None  # the previous plan's memory is free for this one
            t0 = time.perf_counter()
            plan = pcc.plan(pat, seq_len=n, block=BLOCK, heads=2)
            times.append((time.perf_counter() - t0) * 1e3)
        nb = -(-n // BLOCK)
        causal = nb * (nb + 1) // 2 * plan.heads_effective
        print(f"| {src} | {n} | {plan.strategy} | {plan.computed_blocks} | {causal} | "
              f"{plan.computed_blocks / causal:.2%} | {times[0]:.0f}, {statistics.median(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
