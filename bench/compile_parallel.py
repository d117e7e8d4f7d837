"""How a first call's kernels compile side by side: one after the other, on a
thread pool (what ``compile_ahead`` uses), and in forked processes, on this
machine's CPUs, for an sm_90 target (no GPU needed).

    python bench/compile_parallel.py [--patterns "strided(128)" ...] [--head-dim 64] [--workers N]

Each way compiles every pattern's forward, dK/dV and dQ kernels (bf16, the
config a long walk takes) into a Triton cache of its own, so that each
compiles everything; the table gives wall seconds and the speed-up over
one after the other. A thread pool overlaps only what runs without the
GIL; forked processes (one per kernel, all forked before any compiles,
each leaving its kernel in Triton's disk cache, where the parent then finds
it) overlap everything but pay for the fork.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from probes import kernel_sources

import patterncc as pcc
from patterncc.backends.triton.config import default_config


def jobs(patterns: list[str], head_dim: int) -> list:
    """A zero-argument compile per kernel (the jobs Triton would submit)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    cfg = default_config(head_dim, "bfloat16")
    out = []
    for text in patterns:
        pattern = pcc.compile(text).mask_pattern
        for _, source, _, warps, stages in kernel_sources(pattern, head_dim, "bfloat16", cfg):
            out.append(lambda source=source, warps=warps, stages=stages: triton.compile(
                source, target=target, options=dict(num_warps=warps, num_stages=stages)))
    return out


def timed(way: str, work: list, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="compile-parallel-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        if way == "serial":
            for job in work:
                job()
        elif way == "threads":
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda job: job(), work))
        else:
            codes = [_exit_code(pid) for pid in [_forked(job) for job in work]]
            if any(codes):
                raise RuntimeError(f"a child failed to compile: exit codes {codes}")
            with ThreadPoolExecutor(workers) as pool:  # each a hit in the disk cache the children filled
                list(pool.map(lambda job: job(), work))
        return time.perf_counter() - t0


def _forked(job) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one compile, then out without running the parent's exit handlers
        code = 1
        try:
            job()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["strided(128)"])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    work = jobs(args.patterns, args.head_dim)
    print(f"{len(work)} kernels ({', '.join(args.patterns)}, D = {args.head_dim}, bf16, sm_90), "
          f"{os.cpu_count()} CPUs, {args.workers} workers\n")
    timed("serial", work[:1], 1)  # untimed: the compiler's first-use costs (its libraries, ptxas) out of the way
    print("| way | wall s | speed-up |\n|---|---|---|")
    serial = None
    for way in ("serial", "threads", "forked"):
        seconds = timed(way, work, args.workers)
        serial = serial or seconds
        print(f"| {way} | {seconds:.2f} | {serial / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
