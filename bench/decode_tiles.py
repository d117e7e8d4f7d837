"""The query-rows kernel's key step, warps, pipeline depth and split-KV
factor on a step that only reads: causal decoding at a long context, where
every key's K and V row is read once per GQA group and nothing else costs
(one GPU); ``--patterns`` and ``--splits`` try the sparse patterns, whose
steps read little and so are bound by how the reads are spread over programs.

    python bench/decode_tiles.py [--n 1048576] [--batches 1 8] [--blocks 64 128] [--stages 2 3 4] [--warps 4 8]
                                 [--patterns causal ...] [--splits 0 4 8 ...] [--graph]

One decode step as ``bench_decode.py``'s (q ``[B, 32, 1, 128]`` bf16, caches
``[B, 8, n, 128]``), through ``RowsAttention(causal, block=...)`` with
``decode._STAGES`` and ``decode._WARPS`` set to each candidate and
``splits`` (0: the card's heuristic, ``decode._splits``); lengths as host
ints (the lists cached), or with ``--graph`` an int32 tensor on the card and
the step replayed from a CUDA graph (no host time in the figure). Each row: the median of ``do_bench`` in ms,
and the K/V bytes over that time against the card's copy bandwidth
measured in the same run. ``decode.py``'s default is taken from this
table (PERFORMANCE.md, "Decoding from a KV cache").
"""

from __future__ import annotations

import argparse
import itertools

from bench_decode import allowed_keys, copy_bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--patterns", nargs="+", default=["causal"])
    ap.add_argument("--splits", type=int, nargs="+", default=[0], help="split-KV factors; 0: the heuristic")
    ap.add_argument("--graph", action="store_true", help="device lengths, the step replayed from a CUDA graph")
    ap.add_argument("--rep", type=int, default=50, help="do_bench's rep (ms) per timing")
    args = ap.parse_args()

    import torch
    from triton.testing import do_bench

    import patterncc as pcc
    from patterncc.backends.triton import decode

    copy = copy_bandwidth(torch)
    print(f"copy bandwidth {copy / 1e9:.0f} GB/s, n = {args.n}, {'graph' if args.graph else 'host lengths'}\n")
    print("| pattern | B | block | stages | warps | splits | ms | % copy |")
    print("|---|---|---|---|---|---|---|---|")
    for name, B in itertools.product(args.patterns, args.batches):
        pattern = pcc.compile(name).mask_pattern
        q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, 8, args.n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        # the K/V rows the pattern lets the last query read, per (row, KV head)
        nbytes = 2 * B * 8 * allowed_keys(pattern, args.n) * 128 * k.element_size()
        for block, stages, warps, splits in itertools.product(args.blocks, args.stages, args.warps, args.splits):
            decode._STAGES, decode._WARPS = stages, warps
            attn = decode.RowsAttention(pattern, block=block, splits=splits or None)
            row = f"| {name} | {B} | {block} | {stages} | {warps} | {splits or 'auto'} |"
            try:
                step = graphed(torch, attn, q, k, v, args.n) if args.graph else timed_host(attn, q, k, v, args.n)
                if step is None:
                    print(f"{row} no graph | |")
                    continue
                ms = do_bench(step, rep=args.rep)
            except Exception as err:  # a candidate that does not fit (shared memory) is a row, not the end
                print(f"{row} {type(err).__name__} | |")
                continue
            print(f"{row} {ms:.4f} | {100 * nbytes / (ms * 1e-3) / copy:.0f}% |", flush=True)
        del q, k, v


def timed_host(attn, q, k, v, n: int):
    lens = [n] * q.shape[0]
    attn(q, k, v, lens)  # the lists built and cached before timing
    return lambda: attn(q, k, v, lens)


def graphed(torch, attn, q, k, v, n: int):
    """The step at device lengths ``n`` captured in a CUDA graph (None where
    the pattern has no graphable step at this length)."""
    B, H, nq, D = q.shape
    if attn.row_step(n, B, nq, H, k.shape[1], D, q.dtype, q.device) is None:
        return None
    lens = torch.full((B,), n, dtype=torch.int32, device=q.device)
    attn(q, k, v, lens)  # compiled and the tables copied outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn(q, k, v, lens)
    return graph.replay


if __name__ == "__main__":
    main()
