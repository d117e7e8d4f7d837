"""The query-rows kernel's key step, warps and pipeline depth on a step that
only reads: causal decoding at a long context, where every key's K and V
row is read once per GQA group and nothing else costs (one GPU).

    python bench/decode_tiles.py [--n 1048576] [--batches 1 8] [--blocks 64 128] [--stages 2 3 4] [--warps 4 8]

One decode step as ``bench_decode.py``'s (q ``[B, 32, 1, 128]`` bf16, caches
``[B, 8, n, 128]``), through ``RowsAttention(causal, block=...)`` with
``decode._STAGES`` and ``decode._WARPS`` set to each candidate; lengths as
host ints (the lists cached). Each row: the median of ``do_bench`` in ms,
and the K/V bytes over that time against the card's copy bandwidth
measured in the same run. ``decode.py``'s default is taken from this
table (PERFORMANCE.md, "Decoding from a KV cache").
"""

from __future__ import annotations

import argparse
import itertools

from bench_decode import copy_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rep", type=int, default=50, help="do_bench's rep (ms) per timing")
    args = ap.parse_args()

    import torch
    from triton.testing import do_bench

    import patterncc as pcc
    from patterncc.backends.triton import decode

    pattern = pcc.compile("causal").mask_pattern
    copy = copy_bandwidth(torch)
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s, n = {args.n}\n")
    print("| B | block | stages | warps | ms | % copy |")
    print("|---|---|---|---|---|---|")
    for B in args.batches:
        q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, 8, args.n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nbytes = 2 * k.numel() * k.element_size()
        for block, stages, warps in itertools.product(args.blocks, args.stages, args.warps):
            decode._STAGES, decode._WARPS = stages, warps
            attn = decode.RowsAttention(pattern, block=block)
            lens = [args.n] * B
            try:
                attn(q, k, v, lens)
                ms = do_bench(lambda: attn(q, k, v, lens), rep=args.rep)
            except Exception as err:  # a candidate that does not fit (shared memory) is a row, not the end
                print(f"| {B} | {block} | {stages} | {warps} | {type(err).__name__} | |")
                continue
            print(f"| {B} | {block} | {stages} | {warps} | {ms:.3f} | {100 * nbytes / (ms * 1e-3) / copy:.0f}% |",
                  flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
