"""Decoding from a KV cache on one GPU: patterncc's query-rows kernel against
SDPA on the full cache and FlexAttention's decoding with a block mask.

    python bench/bench_decode.py                           # the table below, markdown
    python bench/bench_decode.py --contexts 32768 131072 --batches 1 --patterns causal

One decode step: q ``[B, 32, 1, 128]`` bf16 at position ``n - 1`` against
caches ``[B, 8, n, 128]`` (GQA 4:1). Contenders, timed back to back in
rounds (order reversed every other round), median over rounds of
``triton.testing.do_bench`` medians:

- ``pcc``: ``attn(q, k, v, cache_seqlens=lens)`` at a fixed length, lengths
  as host ints (the lists of key blocks cached: the kernels and the per-call
  host work);
- ``pcc loop``: 64 steps at lengths ``n - 63 .. n`` (each a new length, so
  the host builds the lists as a generation loop does), per step;
- variants, one table row each (``--variants``): ``contiguous`` the cache
  above; ``paged`` the same keys in a pool of 256-token pages in a random
  order, read through ``block_table``; ``graph`` the lengths as a CUDA
  tensor (nothing read back: the layout's lists per block row) and the
  step captured in a CUDA graph, ``pcc`` timing its replay and ``pcc loop``
  64 replays at new lengths written into the lengths tensor (a pattern
  whose lists do not fit ``decode.ROW_LIST_LIMIT`` reads its lengths back
  and is not captured: its row says "no graph");
- ``sdpa <backend>``: ``scaled_dot_product_attention`` over the whole cache
  (dense: a decoding query attends every earlier key under causal), each
  SDPA backend that runs, named;
- ``flex``: ``flex_attention`` (compiled) with the pattern's block mask for
  the one query row (``create_block_mask`` over ``1 x n``, built outside
  the timing).

``bytes`` is what the pattern makes a step read at least: the K and V rows
of the keys the query may attend, for every batch row and key/value head;
``GB/s`` that over ``pcc``'s time, and ``% copy`` against the card's
device-to-device copy bandwidth measured in the same run. ``read ms`` is
the floor for reading those bytes in one launch at that size: a
CUDA-graph replay of ``torch.sum`` over a tensor of the same bytes (one
kernel, nothing written back); ``read/pcc`` how close a step comes to it.
A step that reads a few MiB is bound by a launch's latency, not by the
card's bandwidth, and this column says by how much.
"""

from __future__ import annotations

import argparse
import statistics
import time

PATTERNS = ["causal", "sliding_window(4096)", "strided(128)", "fixed(128, 32)"]


def copy_bandwidth(torch, gib: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), rep=200)
    return 2 * x.numel() * 2 / (ms * 1e-3)


def read_floor(torch, nbytes: int, rep: int) -> float:
    """ms of a CUDA-graph replay of one ``torch.sum`` over ``nbytes`` bytes of
    bf16: the least a single launch that reads them takes at this size."""
    from triton.testing import do_bench

    x = torch.ones(max(1, nbytes // 2), dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.sum(dtype=torch.float32)  # warm outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.sum(dtype=torch.float32)
    return do_bench(graph.replay, rep=rep)


def allowed_keys(pattern, n: int) -> int:
    """Keys the query at position ``n - 1`` may attend (evaluated exactly)."""
    import numpy as np

    from patterncc import ir
    from patterncc.masks import evaluate

    bound = ir.for_head(ir.bind(pattern, n), 0)
    count = 0
    for start in range(0, n, 2**22):
        k = np.arange(start, min(n, start + 2**22), dtype=np.int64)
        count += int(evaluate(bound, np.int64(n - 1), k, n).sum())
    return count


def rounds(contenders: dict, rounds_: int, rep: int) -> dict:
    """name -> median over rounds of do_bench medians (ms); a contender that
    raises is dropped with its error printed."""
    from triton.testing import do_bench

    times = {name: [] for name in contenders}
    for r in range(rounds_):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            if name not in times:
                continue
            try:
                times[name].append(do_bench(contenders[name], rep=rep))
            except Exception as err:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
                print(f"  {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                del times[name]
    return {name: statistics.median(t) for name, t in times.items() if t}


def variant_calls(torch, attn, q, k, v, n: int, B: int, variant: str, page: int):
    """``(step, loop_steps, note)``: one call at length ``n`` and 64 calls at
    lengths ``n - 63 .. n`` of the variant (module docstring); step None with
    the reason in ``note`` where the variant does not run."""
    if variant == "contiguous":
        loop = [[n - 63 + i] * B for i in range(64)]
        return (lambda: attn(q, k, v, cache_seqlens=[n] * B),
                [lambda s=s: attn(q, k, v, cache_seqlens=s) for s in loop], "")
    if variant == "paged":
        Hkv, D = k.shape[1], k.shape[3]
        pages = -(-n // page)
        pad = pages * page - n
        gen = torch.Generator().manual_seed(1)
        order = torch.randperm(B * pages, generator=gen).to("cuda")
        table = order.view(B, pages).to(torch.int32)
        pools = []
        for x in (k, v):
            pool = torch.empty(B * pages, Hkv, page, D, dtype=x.dtype, device="cuda")
            whole = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, Hkv, pages, page, D).transpose(1, 2)
            pool[order] = whole.reshape(B * pages, Hkv, page, D)
            pools.append(pool)
        kp, vp = pools
        loop = [[n - 63 + i] * B for i in range(64)]
        return (lambda: attn(q, kp, vp, cache_seqlens=[n] * B, block_table=table),
                [lambda s=s: attn(q, kp, vp, cache_seqlens=s, block_table=table) for s in loop], f"({page})")
    from patterncc.backends.triton.decode import RowsAttention

    lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
    attn(q, k, v, cache_seqlens=lens)  # warm: the row lists built and copied
    rows = attn._rows_impl
    if not isinstance(rows, RowsAttention) or rows.row_step(n, B, 1, q.shape[1], k.shape[1], q.shape[3], q.dtype,
                                                            q.device) is None:
        return None, None, "no graph (its row lists are over decode.ROW_LIST_LIMIT, or it depends on n)"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attn(q, k, v, cache_seqlens=lens)
    news = [torch.full((B,), n - 63 + i, dtype=torch.int32, device="cuda") for i in range(64)]

    def step():  # at length n: the lengths tensor holds it until the loop below
        graph.replay()
        return captured

    def replay_at(new):
        lens.copy_(new)
        graph.replay()

    return step, [lambda x=x: replay_at(x) for x in news], ""


def print_row(name: str, B: int, n: int, keys: int, nbytes: int, med: dict, loop: float, bw: float,
              floor: float) -> None:
    pcc_ms = med.get("pcc", float("nan"))
    best_sdpa = min(((t, name) for name, t in med.items() if name.startswith("sdpa")), default=None)
    sdpa_txt = f"{best_sdpa[0]:.3f} ({best_sdpa[1][5:]})" if best_sdpa else "-"
    flex_ms = med.get("flex")
    print(f"| {name} | {B} | {n} | {keys} | {nbytes / 2**20:.1f} MiB | {pcc_ms:.4f} | {loop:.4f} | "
          f"{nbytes / (pcc_ms * 1e-3) / 1e9:.0f} | {100 * nbytes / (pcc_ms * 1e-3) / bw:.0f}% | "
          f"{floor:.4f} | {100 * floor / pcc_ms:.0f}% | "
          f"{sdpa_txt} | {'-' if flex_ms is None else f'{flex_ms:.4f}'} | "
          f"{(best_sdpa[0] / pcc_ms) if best_sdpa else float('nan'):.1f} | "
          f"{(flex_ms / pcc_ms) if flex_ms else float('nan'):.1f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep", type=int, default=50, help="do_bench's rep (ms) per timing")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["contiguous", "paged", "graph"],
                    choices=["contiguous", "paged", "graph"])
    ap.add_argument("--page", type=int, default=256, help="tokens per page of the paged variant")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import patterncc as pcc
    from patterncc.backends.triton.flex import mask_mod

    H, Hkv, D = 32, 8, 128
    bw = copy_bandwidth(torch)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    header = ("| pattern | B | context | keys read | bytes | pcc ms | pcc loop ms/step | GB/s | % copy | "
              "read ms | read/pcc | sdpa (backend) ms | flex ms | sdpa/pcc | flex/pcc |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for B in args.batches:
        for n in args.contexts:
            gen = torch.Generator(device="cuda").manual_seed(0)
            k = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            lens = [n] * B  # host ints, as a generation loop has them (a CUDA tensor costs a device sync)
            sdpa = {}
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                def run_sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                try:
                    run_sdpa()
                    sdpa[backend.name.lower().replace("_attention", "")] = run_sdpa
                except Exception:  # noqa: BLE001 - a backend that does not take this shape is left out
                    pass
            for src in args.patterns:
                pat = pcc.parse(src)
                attn = pcc.compile(pat, backend="triton")
                with torch.no_grad():
                    out = attn(q, k, v, cache_seqlens=lens)
                others = {f"sdpa {name}": fn for name, fn in sdpa.items()}
                if flex is not None:
                    torch._dynamo.reset()  # every row compiles Flex afresh: no fallback after 8 recompiles
                    mm = mask_mod(pat, n, device="cuda")
                    last = n - 1
                    bm = create_block_mask(lambda b, h, qi, ki: mm(b, h, qi + last, ki), None, None, 1, n,
                                           device="cuda")
                    others["flex"] = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)
                    try:
                        with torch.no_grad():
                            ref = others["flex"]()
                        err = (out.float() - ref.float()).abs().max().item()
                        if err > 0.05:
                            print(f"  {src} B={B} n={n}: patterncc differs from Flex by {err:.3g}")
                    except Exception as err:  # noqa: BLE001 - reported in the table's notes, the others still run
                        print(f"  {src} B={B} n={n}: flex failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                        del others["flex"]
                        torch.cuda.empty_cache()
                with torch.no_grad():
                    med_others = rounds(others, args.rounds, args.rep)
                keys = allowed_keys(pat, n)
                nbytes = B * Hkv * keys * D * 2 * 2
                floor = read_floor(torch, nbytes, args.rep)
                for variant in args.variants:
                    with torch.no_grad():
                        step, loop_steps, note = variant_calls(torch, attn, q, k, v, n, B, variant, args.page)
                        if step is None:
                            print(f"  {src} B={B} n={n} {variant}: {note}")
                            continue
                        got = step()
                        err = (got.float() - out.float()).abs().max().item()
                        if err > 0.02:
                            print(f"  {src} B={B} n={n} {variant}: differs from the contiguous call by {err:.3g}")
                        med = rounds({"pcc": step}, args.rounds, args.rep)
                        med.update(med_others)
                        loop_steps[0]()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for s in loop_steps:
                            s()
                        torch.cuda.synchronize()
                        loop = (time.perf_counter() - t0) / len(loop_steps) * 1e3
                    name = src if variant == "contiguous" else f"{src} {variant}{note}"
                    print_row(name, B, n, keys, nbytes, med, loop, bw, floor)
                    del step, loop_steps
                    torch.cuda.empty_cache()
            del k, v
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
