"""Context parallelism's local compute on one GPU: a group of one ``gloo``
rank, so every key is the rank's own, with the own part on patterncc's
attention (the generated kernels) against the masked chunks that every
other part uses.

    python bench/context_parallel_local.py [--cases "sliding_window(4096)@65536" "strided(128)@16384"]
    python bench/context_parallel_local.py --device cpu --dtype float32 --heads 4 --head-dim 32 \
        --cases "sliding_window(256)@8192" "strided(64)@4096" "causal@2048"

B = 1 (default H = 16, D = 128, bf16, CUDA); forward+backward of
``cp(q, k, v).sum()``, the median of 3 after one untimed call, in ms. On
the CPU "attention" is the float64 reference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from patterncc.distributed import ContextParallelAttention


def step_ms(pattern: str, n: int, own_part: str, args) -> float:
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=args.device, dtype=getattr(torch, args.dtype),
                           requires_grad=True) for _ in range(3))
    cp = ContextParallelAttention(pattern, own_part=own_part)
    cp(q, k, v).sum().backward()
    assert cp.last_own_part == own_part, cp.last_own_part
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        cp(q, k, v).sum().backward()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["sliding_window(4096)@65536", "strided(128)@16384"],
                    help="PATTERN@N")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            print("| pattern | n | own part by patterncc's attention, ms | own part in masked chunks, ms |\n|---|---|---|---|")
            for case in args.cases:
                pattern, n = case.rsplit("@", 1)
                print(f"| {pattern} | {n} | {step_ms(pattern, int(n), 'attention', args):.1f} "
                      f"| {step_ms(pattern, int(n), 'chunks', args):.1f} |", flush=True)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
