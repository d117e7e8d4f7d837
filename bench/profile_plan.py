"""Where a planned call spends its GPU time, kernel by kernel (one H100).

    python bench/profile_plan.py [--pattern "strided(128)"] [--seq-len 65536]

Runs the planned forward and forward+backward under torch.profiler and
prints the CUDA time per kernel name, so the gap between the measured time
and the floor (PERFORMANCE.md, "The planner") can be assigned: attention
kernels, gathers (index_select / index_add), the merge, or idle time between
launches (wall time minus the sum).
"""

from __future__ import annotations

import argparse
import time

import torch

import patterncc as pcc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="strided(128)")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    attn = pcc.compile(args.pattern, backend="triton")
    shape = (1, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    attn(q, k, v).backward(do)  # compile and build everything
    print(attn.impl("triton").plan(args.seq_len, args.heads).describe())
    for label, step in (("forward", lambda: attn(q, k, v)), ("forward+backward", lambda: attn(q, k, v).backward(do))):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / args.iters * 1e3
        print(f"\n## {label}: {wall:.3f} ms per call (wall, {args.iters} calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
