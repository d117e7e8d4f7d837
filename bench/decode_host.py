"""The host's share of a decode step: the Python of ``attn(q, k, v,
cache_seqlens=lens)`` on the query-rows path with every kernel launch
replaced by a no-op, so what is timed is the checks, the lists, the tables
and the allocations, not Triton's launcher or the card.

    TRITON_INTERPRET=1 python bench/decode_host.py            # on a CPU: the tensors stay on the host
    python bench/decode_host.py --device cuda                 # on a card: real allocations, launches still mocked
    python bench/decode_host.py --device cuda --real --profile 25   # real launches, and where the time goes

Two loops per pattern, mean microseconds of this thread's CPU time per
call (``time.thread_time``: on a shared machine, what the call costs, not
what it waited):

- ``same``: one length, called again and again (every layer of a model
  after the first at one decode step: the step's tables are cached);
- ``new``: a length not seen before every call (the first layer of each
  step of a generation loop: the lists and the step's tables are built and
  copied).

Shapes as ``bench_decode.py``'s: q ``[B, 32, 1, 128]`` bf16, caches
``[B, 8, n, 128]``. Triton's own launch cost (its argument binding, about
10-30 us a launch on recent versions) comes on top, once per launch: one
per planned piece and one merge. ``--real`` keeps the real kernels (on a
card: a real cache, and Triton's launcher in the count); ``--profile N``
prints the N functions with the most own time in each pattern's ``new``
loop (cProfile).
"""

from __future__ import annotations

import argparse
import time

PATTERNS = ["causal", "sliding_window(4096)", "strided(128)", "fixed(128, 32)"]


class _NoLaunch:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _Module:
    RANDOM_TABLES = ()
    PATTERN_ARGS = ()
    attn_rows_fwd = _NoLaunch()
    attn_rows_merge = _NoLaunch()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--real", action="store_true", help="real kernels and a real cache (a card)")
    ap.add_argument("--profile", type=int, default=0, help="print this many functions of the `new` loop's profile")
    args = ap.parse_args(argv)

    import torch

    import patterncc as pcc
    from patterncc.backends.triton import decode

    if args.real:
        _measure(args, torch, pcc)
        return 0
    module = _Module()
    real = decode.RowsAttention._module
    decode.RowsAttention._module = lambda self, *a, **k: module
    try:
        _measure(args, torch, pcc)
    finally:  # (a caller in the same process, a test, gets the real kernels back)
        decode.RowsAttention._module = real
    return 0


def _measure(args, torch, pcc) -> None:
    B, H, Hkv, D, n = args.batch, 32, 8, 128, args.context
    q = torch.zeros(B, H, 1, D, dtype=torch.bfloat16, device=args.device)
    if args.real:
        k, v = (torch.zeros(B, Hkv, n, D, dtype=torch.bfloat16, device=args.device) for _ in range(2))
    else:
        k = torch.zeros(B, Hkv, 1, D, dtype=torch.bfloat16, device=args.device).expand(B, Hkv, n, D)  # no n-sized memory
        v = k
    launches = "real launches" if args.real else "launches mocked"
    print(f"torch {torch.__version__}, device {args.device}, B={B}, n={n}: us per call ({launches})")
    print("| pattern | same length | new length |")
    print("|---|---|---|")
    for src in args.patterns:
        attn = pcc.compile(src, backend="triton")
        with torch.no_grad():
            for i in range(64):  # warm: modules, pieces, lists of the lengths the `new` loop uses
                attn(q, k, v, cache_seqlens=[n - i] * B)
            t0 = time.thread_time()
            for _ in range(args.calls):
                attn(q, k, v, cache_seqlens=[n] * B)
            same = (time.thread_time() - t0) / args.calls * 1e6
            lengths = [[n - 64 - i] * B for i in range(args.calls)]  # never seen: lists and tables built
            profile = None
            if args.profile:
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            t0 = time.thread_time()
            for lens in lengths:
                attn(q, k, v, cache_seqlens=lens)
            new = (time.thread_time() - t0) / args.calls * 1e6
            if profile is not None:
                profile.disable()
        print(f"| {src} | {same:.1f} | {new:.1f} |", flush=True)
        if profile is not None:
            import pstats

            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
