"""Time the analytic layout builder on one CPU core.

    python bench/layout_timing.py            # the standard table
    python bench/layout_timing.py --quick    # fewer repeats

Prints one row per (pattern, n): non-empty / full / partial blocks, the
median build time over a few runs and the time per non-empty block. The
targets (the layout is analytic, so its cost follows its non-empty blocks,
never n * n): at n = 1,048,576 and block 128,
local_global(512, 64), sliding_window(1024), longformer(512, 64) and
bigbird(192, 64, 3, 128, 0) each build in <= 100 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# One core: the numbers must not depend on a BLAS thread pool.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

from patterncc import ir  # noqa: E402
from patterncc.blocklayout.builder import build  # noqa: E402

C = ir.Causal()

# The standard library (grammar/stdlib.pat), written with IR nodes.
PATTERNS = {
    "local_global(512, 64)": C & (ir.Local(512) | ir.Global(64)),
    "sliding_window(1024)": C & ir.Local(1024),
    "longformer(512, 64)": ir.Local(512) | ir.Global(64),
    "bigbird(192, 64, 3, 128, 0)": ir.Local(192) | ir.Global(64) | ir.Random(3, 128, 0),
    "strided(128)": C & (ir.Local(128) | ir.Stride(128)),
    "fixed(128, 32)": C & (ir.Block(128) | ir.Summary(128, 32)),
}
TARGET_MS = 100.0
TARGETS = {"local_global(512, 64)", "sliding_window(1024)", "longformer(512, 64)", "bigbird(192, 64, 3, 128, 0)"}
LENGTHS = {name: [2**20] for name in TARGETS} | {"strided(128)": [2**16, 2**20], "fixed(128, 32)": [2**16, 2**20]}


def time_build(p, n, block, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lay = build(p, n, block)
        times.append(time.perf_counter() - t0)
    return lay, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one run per row after a warm-up")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    build(PATTERNS["sliding_window(1024)"], 4096, args.block)  # warm-up: imports, caches
    print(f"| pattern | n | non-empty blocks | full | partial | build ms (median of {repeats}) | us / block | target |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in PATTERNS.items():
        for n in LENGTHS[name]:
            r = repeats if n <= 2**20 and name in TARGETS else max(1, min(repeats, 3))
            lay, seconds = time_build(p, n, args.block, r)
            ms = seconds * 1e3
            target = ""
            if name in TARGETS and n == 2**20:
                target = "ok" if ms <= TARGET_MS else f"MISSED (> {TARGET_MS:.0f} ms)"
            print(
                f"| {name} | {n} | {lay.nnz} | {lay.n_full} | {lay.n_partial} | {ms:.1f} | "
                f"{seconds * 1e6 / max(1, lay.nnz):.3f} | {target} |"
            )


if __name__ == "__main__":
    main()
