"""Time and peak memory of the reference backend's sparse path.

    python bench/reference_timing.py [--seq-len 16384] [--head-dim 64] [--stride 128]

Pattern strided(l) = causal & (local(l) | stride(l)), B = 1, H = 1; prints
the seconds for the first forward (masks built and cached), a second
forward, the backward, and the process's peak resident memory.
"""

import argparse
import resource
import time

import numpy as np

from patterncc import ir
from patterncc.backends.reference import ReferenceAttention


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--stride", type=int, default=128)
    args = parser.parse_args()
    n, D, l = args.seq_len, args.head_dim, args.stride

    pattern = ir.Causal() & (ir.Local(l) | ir.Stride(l))
    attn = ReferenceAttention(pattern)  # default dense_limit: n > 4096 takes the sparse path
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 1, n, D)) for _ in range(4))
    print(f"pattern {pattern}, n={n}, D={D}, B=1, H=1; peak RSS after setup {peak_rss_gib():.2f} GiB")

    t0 = time.perf_counter()
    o, lse = attn.forward(q, k, v)
    t1 = time.perf_counter()
    o, lse = attn.forward(q, k, v)
    t2 = time.perf_counter()
    attn.backward(q, k, v, o, lse, do)
    t3 = time.perf_counter()

    (mask,) = attn.masks(n, 1)[1]
    print(f"allowed pairs      {mask.nnz} ({mask.nnz / n:.1f} per row)")
    print(f"forward, 1st call  {t1 - t0:7.2f} s  (builds and caches the CSR mask)")
    print(f"forward, cached    {t2 - t1:7.2f} s")
    print(f"backward           {t3 - t2:7.2f} s")
    print(f"fwd (1st) + bwd    {t1 - t0 + t3 - t2:7.2f} s")
    print(f"peak RSS           {peak_rss_gib():7.2f} GiB")


if __name__ == "__main__":
    main()
