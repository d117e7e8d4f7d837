"""Packed batches (``cu_seqlens``) on one GPU: patterncc against FlexAttention with a document mask.

    python bench/bench_packed.py                    # totals 16K and 128K, causal / sliding_window(1024) /
                                                    # strided(128), H = 16, D = 64 and 128, bf16 -> markdown
    python bench/bench_packed.py --out packed.md    # also write the table
    python bench/bench_packed.py --totals 16384 --patterns causal --head-dims 64
    TRITON_INTERPRET=1 python bench/bench_packed.py --smoke
                                                    # a dry run of the harness on the CPU (Flex skipped,
                                                    # times mean nothing)
    python bench/bench_packed.py --build-times      # host time to build a batch's layouts and tables
                                                    # (CPU only, no GPU needed): 1,000 sequences of 1M
                                                    # tokens, and the log-uniform batches

Per total, the sequence lengths are drawn log-uniform between 128 and 32K
with a fixed seed until they reach the total (the last one cut to fit).
For each pattern and head dim, on the same random inputs in one process,
forward + backward (``o.backward(dO)``):

- ``pcc``: ``attn(q, k, v, cu_seqlens=cu)``, the batch's layouts and tables
  cached (a batch seen before);
- ``pcc+build``: the same with the batch's layouts and tables built anew
  on every call (a new batch every step). What belongs to the pattern and
  not to the batch stays cached, as it does in a training run: the plan
  (per power of two of the longest sequence), its natural layout's step
  lists that every batch crops, and the residue-order layouts (one per
  class size ``ceil(n / l)``: at most 256 for strided(128) up to 32K);
- ``flex``: ``torch.compile(flex_attention)`` with a document ``mask_mod``
  (same document and the pattern on q - k, which is the same in global
  and in-document positions for these three patterns), its BlockMask
  (``create_block_mask``, compiled, block 128) built once;
- ``flex+build``: the same with ``create_block_mask`` on every call;
- ``one by one``: patterncc on each sequence alone, outputs concatenated.

Times are medians of ``--reps`` calls timed with CUDA events after
``--warmup`` calls. Also reported: the host time to build a new batch's
layouts and tables (``build``, median of 5) and the same with nothing of
the pattern cached (``first build``: the first batch of a run), Flex's
``create_block_mask`` (``mask``), and the largest |o_pcc - o_flex|.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

PATTERNS = ("causal", "sliding_window(1024)", "strided(128)")


def draw_lengths(total: int, seed: int = 0, lo: int = 128, hi: int = 32768) -> list[int]:
    """Log-uniform lengths in lo..hi summing to ``total`` (the last one cut to fit)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def document_mask_mod(name: str, doc):
    """Flex's mask_mod of a pattern over a packed batch: same document, and
    the pattern's rule on q - k (causal, sliding_window(w) and strided(l)
    depend on q - k alone, so global positions give the in-document answer)."""
    arg = int(name[name.index("(") + 1:-1]) if "(" in name else 0

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        allowed = (doc[q_idx] == doc[kv_idx]) & (d >= 0)
        if name.startswith("sliding_window"):
            allowed = allowed & (d < arg)
        elif name.startswith("strided"):
            allowed = allowed & ((d < arg) | (d % arg == 0))
        return allowed

    return mask_mod


def timed(fn, warmup: int, reps: int, device: str, grads=()) -> float:
    """Median ms of ``fn()`` over ``reps`` calls (CUDA events on a GPU; the
    wall clock of one call in a CPU dry run), after ``warmup`` calls."""
    import torch

    def clear():
        for x in grads:
            x.grad = None

    if device != "cuda":
        clear()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    for _ in range(warmup):
        clear()
        fn()
    times = []
    for _ in range(reps):
        clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_case(name: str, lengths: list[int], H: int, D: int, dtype, *, device: str, flex: bool, warmup: int,
               reps: int, config=None) -> dict:
    import numpy as np
    import torch

    import patterncc as pcc
    from patterncc.backends.triton.bench import FLEX_BLOCK, _flex

    total = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, total, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, total, D, device=device, dtype=dtype, generator=g)
    options = {} if config is None else {"config": config}
    attn = pcc.compile(pcc.parse(name), backend="triton", **options)
    impl = attn.impl("triton")
    row = dict(pattern=name, total=total, seqs=len(lengths), D=D, notes=[])

    def new_batch():  # a batch never seen: its launches, layouts and tables built anew
        impl._packed.clear()

    def cold():  # and nothing of the pattern's kept either (the first batch of a run)
        impl._packed.clear()
        impl._at_length.clear()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def pcc_fb():
        attn(q, k, v, cu_seqlens=cu).backward(do)

    def pcc_build_fb():
        new_batch()
        pcc_fb()

    def one_by_one_fb():
        outs = [attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        torch.cat(outs, dim=2).backward(do)

    o_pcc = attn(q, k, v, cu_seqlens=cu)
    o_pcc.backward(do)  # kernels loaded, compiled
    one_by_one_fb()
    # A new pattern's first calls run on the stand-in kernels while its own compile in threads, which
    # would run beside the builds and calls timed below (their Python parts hold the GIL).
    pcc.wait_for_kernels()
    for label, clear in (("first build", cold), ("build", new_batch)):
        builds = []
        for _ in range(5):
            clear()
            sync()
            t = time.perf_counter()
            impl.packed_launches(q, k, offsets)
            sync()
            builds.append((time.perf_counter() - t) * 1e3)
        row[label] = statistics.median(builds)
    grads = (q, k, v)
    row["pcc"] = timed(pcc_fb, warmup, reps, device, grads)
    row["pcc+build"] = timed(pcc_build_fb, warmup, reps, device, grads)
    row["one by one"] = timed(one_by_one_fb, warmup, reps, device, grads)
    if flex:
        try:
            flex_attention, create_block_mask = _flex(device)
            doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          torch.tensor(lengths, device=device))
            mask_mod = document_mask_mod(name, doc)

            def make_mask():
                return create_block_mask(mask_mod, None, None, total, total, device=device, BLOCK_SIZE=FLEX_BLOCK)

            block_mask = make_mask()
            masks = []
            for _ in range(5):
                sync()
                t = time.perf_counter()
                make_mask()
                sync()
                masks.append((time.perf_counter() - t) * 1e3)
            row["mask"] = statistics.median(masks)

            def flex_fb():
                flex_attention(q, k, v, block_mask=block_mask).backward(do)

            def flex_build_fb():
                flex_attention(q, k, v, block_mask=make_mask()).backward(do)

            o_flex = flex_attention(q, k, v, block_mask=block_mask)
            o_flex.backward(do)
            row["max_diff"] = (o_flex.float() - o_pcc.float()).abs().max().item()
            row["flex"] = timed(flex_fb, warmup, reps, device, grads)
            row["flex+build"] = timed(flex_build_fb, warmup, reps, device, grads)
        except Exception as err:  # a row with a note beats no table
            row["notes"].append(f"flex failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
    return row


def build_times(heads: int = 16, head_dim: int = 64, repeats: int = 5) -> str:
    """A markdown table of the host time (median ms of ``repeats``) to build
    a packed batch's launches (layouts and device tables, on the meta device
    so no GPU is needed): a new batch (the pattern's plan, its natural
    layout's step lists and its residue layouts kept) and a first batch
    (nothing kept). Batches: 1,000 sequences of about 1,049 tokens (1M in
    all), and log-uniform 128..32K lengths to 16K, 128K and 1M."""
    import numpy as np
    import torch

    import patterncc as pcc

    rng = np.random.default_rng(0)
    batches = {"1,000 x ~1K": (rng.multinomial(2**20 - 1000, np.ones(1000) / 1000) + 1).tolist()}
    for total in (16384, 131072, 2**20):
        batches[f"log-uniform {total // 1024}K"] = draw_lengths(total)
    lines = ["| batch | seqs | total | pattern | new batch ms | first batch ms |", "|---|---|---|---|---|---|"]
    for label, lengths in batches.items():
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for name in PATTERNS:
            impl = pcc.compile(pcc.parse(name), backend="triton").impl("triton")
            q = torch.empty(1, heads, int(offsets[-1]), head_dim, dtype=torch.bfloat16, device="meta")
            impl._build_packed(q, q, offsets)  # the kernels loaded once
            times = {"new": [], "first": []}
            for _ in range(repeats):
                impl._at_length.clear()
                for kind in ("first", "new"):
                    t = time.perf_counter()
                    impl._build_packed(q, q, offsets)
                    times[kind].append((time.perf_counter() - t) * 1e3)
            lines.append(f"| {label} | {len(lengths)} | {int(offsets[-1])} | {name} | "
                         f"{statistics.median(times['new']):.1f} | {statistics.median(times['first']):.1f} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    def diff(x):
        return "-" if x is None else f"{x:.3g}"

    lines = ["| total | seqs | pattern | D | pcc | pcc+build | flex | flex+build | one by one | flex / pcc "
             "| flex+build / pcc+build | build ms | first build ms | flex mask ms | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r.get
        lines.append(f"| {r['total']} | {r['seqs']} | {r['pattern']} | {r['D']} | {ms(g('pcc'))} | "
                     f"{ms(g('pcc+build'))} | {ms(g('flex'))} | {ms(g('flex+build'))} | {ms(g('one by one'))} | "
                     f"{ratio(g('flex'), g('pcc'))} | {ratio(g('flex+build'), g('pcc+build'))} | {ms(g('build'))} | "
                     f"{ms(g('first build'))} | "
                     f"{ms(g('mask'))} | {diff(g('max_diff'))} |")
    notes = [f"- {r['pattern']} {r['total']} D={r['D']}: {n}" for r in rows for n in r["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--totals", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="a dry run on the CPU under TRITON_INTERPRET=1: tiny shapes, block 16, no Flex")
    parser.add_argument("--build-times", action="store_true",
                        help="only the host time to build batches' layouts and tables (CPU)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    import torch

    if args.build_times:
        print(f"H = {args.heads}, D = 64, bf16: host ms to build a packed batch's layouts and tables")
        print(build_times(args.heads))
        return 0

    config = None
    device = "cuda"
    if args.smoke:
        from patterncc.backends.triton import KernelConfig

        device = "cpu"
        config = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
        args.totals, args.heads, args.head_dims, args.no_flex = [96], 2, [16], True
        patterns = [p.replace("1024", "16").replace("128", "8") for p in args.patterns]
    else:
        patterns = args.patterns
        if not torch.cuda.is_available():
            print("bench_packed.py needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
            return 2
    rows = []
    for total in args.totals:
        lengths = draw_lengths(total, args.seed, *((4, 40) if args.smoke else ()))
        print(f"# total {total}: {len(lengths)} sequences, lengths {sorted(lengths)}", file=sys.stderr)
        for D in args.head_dims:
            for name in patterns:
                t = time.perf_counter()
                rows.append(bench_case(name, lengths, args.heads, D, torch.bfloat16 if not args.smoke else
                                       torch.float32, device=device, flex=not args.no_flex, warmup=args.warmup,
                                       reps=args.reps, config=config))
                # each row as soon as it exists: a run cut short still reports what it measured
                print(markdown(rows[-1:]).splitlines()[-1], f"  # {time.perf_counter() - t:.1f} s", flush=True)
    table = markdown(rows)
    dtype = "float32, a CPU dry run" if args.smoke else "bf16"
    print(f"{dtype}, H = {args.heads}, forward + backward, median ms; lengths log-uniform 128..32K (seed {args.seed})")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
