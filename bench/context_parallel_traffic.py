"""Bytes a rank sends per context-parallel attention call, from the exchange
plans alone (no process group, no GPU): what ``ContextParallelAttention``
moves for a pattern, against an all-gather of K/V.

    .venv/bin/python bench/context_parallel_traffic.py [--lengths 65536,262144] [--ranks 2,4]

Bytes per row: k and v, ``Hkv`` heads of ``D`` values of ``itemsize`` bytes
(default H = 16, D = 128, bf16: 8 KiB a token). ``max``: the rank that sends
most; ``mean``: the average over ranks; ``all-gather``: what every rank sends
when every rank receives the whole K/V (``(P - 1) * n / P`` rows).
"""

from __future__ import annotations

import argparse
import time

from patterncc.distributed.exchange import exchange_plan

PATTERNS = ("sliding_window(4096)", "fixed(128, 32)", "strided(128)", "causal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default=";".join(PATTERNS), help="';'-separated patterns")
    ap.add_argument("--lengths", default="65536,262144")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sharding", default="contiguous", choices=("contiguous", "zigzag"))
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--itemsize", type=int, default=2)
    args = ap.parse_args()
    row = 2 * args.kv_heads * args.head_dim * args.itemsize  # k and v of one token
    mib = lambda rows: f"{rows * row / 2**20:10.1f}"  # noqa: E731
    print(f"{'pattern':22s} {'P':>2s} {'n':>8s} {'max MiB':>10s} {'mean MiB':>10s} {'all-gather':>10s}  seconds")
    for pattern in args.patterns.split(";"):
        for P in map(int, args.ranks.split(",")):
            for n in map(int, args.lengths.split(",")):
                start = time.perf_counter()
                plans = [exchange_plan(pattern, n, 1, P, r, args.sharding) for r in range(P)]
                rows = [sum(len(s) for p, s in enumerate(plan.send) if p != plan.rank) for plan in plans]
                print(f"{pattern:22s} {P:2d} {n:8d} {mib(max(rows))} {mib(sum(rows) // P)} "
                      f"{mib((P - 1) * (n // P))}  {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main()
