"""Every pattern against our own limit: causal's time per computed block.

    python bench/block_rate.py --seq-lens 16384 65536 --head-dims 64 128

Our causal kernel's time per computed 128 x 128 block (forward, and
forward+backward) is the rate any pattern could reach: a pattern's limit is
that rate times the blocks its plan computes. For each (D, n), in one
process, on the same inputs (bf16, B = 1, H = 16), every contender timed
once per round and the median over rounds kept (``bench.bench_case``'s
method):

- causal through our kernel (``TritonAttention``: the rate), and SDPA's
  cuDNN and flash backends on causal (``--no-sdpa`` leaves them out);
- each pattern through ``pcc.compile`` (what a user runs: the plan where the
  planner reorders), its blocks counted as the performance targets in
  PERFORMANCE.md count them: the layouts of the strategy that runs, built at block 128
  (``blocks``); and the area its kernels do compute at their own block
  (``area``, in 128 x 128 units: planned components skip 64-key steps);
- the same call captured in a CUDA graph and replayed (``graph``): the GPU's
  time alone, without the host's per-call work, as inside a captured
  training step;
- FlexAttention (``torch.compile``'d, block mask from ``create_block_mask``)
  on the patterns named in ``--flex``.

Printed: a markdown table per head dim (ms; limit = blocks x causal's rate;
% = limit / measured, for the eager call and the graph replay; the time per
block over causal's) and one JSON line per row for the record.
``--device cpu`` under ``TRITON_INTERPRET=1`` runs the harness on tiny
shapes (its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import patterncc as pcc
from patterncc.attention import Attention
from patterncc.backends.triton import TritonAttention
from patterncc.backends.triton import flex as flex_interop
from patterncc.backends.triton.bench import _bench, _flex
from patterncc.planner import build_plan

BLOCK = 128
DEFAULT_PATTERNS = ["strided(128)", "fixed(128,32)", "sliding_window(1024)", "local_global(512,64)",
                    "longformer(512,64)", "axial(256)", "strided(256)", "causal & dilated(256, 4)",
                    "causal & (local(256) | stride(512) | sink(16))"]


def computed_blocks(pattern: str, n: int, heads: int) -> tuple[str, float, float]:
    """(strategy, blocks per head at block 128, area per head in 128 x 128
    units at the kernels' own block) of what ``pcc.compile(pattern)`` runs at
    length n. The blocks are counted on the same strategy's layouts built at
    block 128 (a dense strategy counts as natural order: our kernels or SDPA
    compute causal's blocks either way)."""
    pattern = pcc.parse(pattern)
    plan = Attention(pattern, backend="triton").impl("triton").plan(n, heads)
    at128 = build_plan(pattern, n, BLOCK, heads, mode="planned" if plan.strategy == "planned" else "natural")
    blocks = at128.computed_blocks / at128.heads_effective
    area = sum(c.blocks * c.layout.block ** 2 for c in plan.components) / plan.heads_effective / BLOCK ** 2
    return plan.strategy, blocks, area


def graph_replay(fn, grads):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first);
    returns the replay, or None where capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    for g in grads:
        g.grad = None
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"  capture failed: {str(err).splitlines()[0][:120]}", flush=True)
        return None
    return graph.replay


def timed(contenders: dict, grads, rounds: int, rep: int, device: str) -> dict:
    """Median over rounds of each contender's do_bench median (ms); every
    other round in reverse order."""
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[::-1] if r % 2 else names:
            fn, needs_grads = contenders[name]
            times[name].append(_bench(fn, grad_to_none=grads if needs_grads else None, rep=rep, device=device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def one_shape(n: int, D: int, heads: int, patterns, flex_patterns, rounds: int, rep: int,
              device: str = "cuda", sdpa_too: bool = True) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    grads = [q, k, v]
    contenders = {}

    def add(name, fwd):
        fwd().backward(do)  # compile and build before anything is timed
        contenders[f"{name} fwd"] = (fwd, False)
        contenders[f"{name} f+b"] = (lambda: fwd().backward(do), True)

    def add_graphs(name, fwd):
        if device != "cuda":
            return
        for mode, fn in (("fwd", fwd), ("f+b", lambda: fwd().backward(do))):
            replay = graph_replay(fn, grads)
            if replay is not None:
                contenders[f"{name} graph {mode}"] = (replay, False)

    # the rate is our causal kernel's (pcc.compile may hand a dense pattern to SDPA)
    attns = {"causal": TritonAttention(pcc.parse("causal")), **{p: pcc.compile(p) for p in patterns}}
    for p, attn in attns.items():
        add(p, lambda attn=attn: attn(q, k, v))
        add_graphs(p, lambda attn=attn: attn(q, k, v))
    backends = (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends if device == "cuda" and sdpa_too else ():
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True)
        add(name, dense)
    if flex_patterns:
        flex_attention, create_block_mask = _flex(device)
        for p in flex_patterns:
            mask_mod = flex_interop.mask_mod(pcc.parse(p), n, device)
            bm = create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=BLOCK)
            add(f"flex {p}", lambda bm=bm: flex_attention(q, k, v, block_mask=bm))
    ms = timed(contenders, grads, rounds, rep, device)
    rows = []
    _, causal_blocks, _ = computed_blocks("causal", n, heads)
    rate = {mode: ms[f"causal {mode}"] / causal_blocks for mode in ("fwd", "f+b")}
    for p in ["causal", *patterns]:
        strategy, blocks, area = computed_blocks(p, n, heads)
        row = dict(pattern=p, n=n, D=D, strategy="our kernel" if p == "causal" else strategy, blocks=blocks,
                   area=area)
        for mode in ("fwd", "f+b"):
            row[f"{mode} ms"] = ms[f"{p} {mode}"]
            row[f"{mode} graph ms"] = ms.get(f"{p} graph {mode}")
            row[f"{mode} limit ms"] = blocks * rate[mode]
            row[f"{mode} per block / causal"] = ms[f"{p} {mode}"] / blocks / rate[mode]
            if f"flex {p} {mode}" in ms:
                row[f"flex {mode} ms"] = ms[f"flex {p} {mode}"]
        rows.append(row)
    for name in ("sdpa cudnn", "sdpa flash") if device == "cuda" and sdpa_too else ():
        rows.append({"pattern": f"causal, {name}", "n": n, "D": D,
                     **{f"{mode} ms": ms[f"{name} {mode}"] for mode in ("fwd", "f+b")}})
    return rows


def markdown(rows: list[dict]) -> str:
    def pct(a, b):
        return f"{100 * a / b:.0f}%" if a and b else "-"

    def num(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    lines = ["| pattern | n | D | strategy | blocks | area | fwd: limit / measured / graph (% of limit) "
             "| f+b: limit / measured / graph (% of limit) | per block / causal fwd, f+b | Flex / pcc fwd, f+b |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "blocks" not in r:
            continue
        cells = []
        for mode in ("fwd", "f+b"):
            lim, got, gr = r[f"{mode} limit ms"], r[f"{mode} ms"], r[f"{mode} graph ms"]
            cells.append(f"{lim:.3f} / {got:.3f} / {num(gr)} ({pct(lim, got)}, {pct(lim, gr)})")
        flex = (f"{r['flex fwd ms'] / r['fwd ms']:.1f}, {r['flex f+b ms'] / r['f+b ms']:.1f}"
                if "flex fwd ms" in r else "-")
        lines.append(f"| {r['pattern']} | {r['n']} | {r['D']} | {r['strategy']} | {r['blocks']:.0f} "
                     f"| {r['area']:.0f} | {cells[0]} | {cells[1]} "
                     f"| {r['fwd per block / causal']:.2f}, {r['f+b per block / causal']:.2f} | {flex} |")
    lines += ["", "| dense causal | n | D | fwd | f+b | pcc / it: fwd, f+b (> 1: it is faster) |",
              "|---|---|---|---|---|---|"]
    causal = {(r["n"], r["D"]): r for r in rows if r["pattern"] == "causal"}
    for r in rows:
        if r["pattern"].startswith("causal, "):
            c = causal[(r["n"], r["D"])]
            lines.append(f"| {r['pattern'][8:]} | {r['n']} | {r['D']} | {r['fwd ms']:.3f} | {r['f+b ms']:.3f} "
                         f"| {c['fwd ms'] / r['fwd ms']:.2f}, {c['f+b ms'] / r['f+b ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 65536])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS)
    ap.add_argument("--flex", nargs="*", default=["strided(128)", "fixed(128,32)"],
                    help="patterns also timed with FlexAttention")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--no-sdpa", action="store_true", help="leave out SDPA's dense causal")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the harness under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    print(f"# {card}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    for D in args.head_dims:
        rows = []
        for n in args.seq_lens:
            flex = [p for p in args.flex if p in args.patterns]
            new = one_shape(n, D, args.heads, args.patterns, flex, args.rounds, args.rep, args.device,
                            not args.no_sdpa)
            rows += new
            for r in new:
                print(json.dumps(r), flush=True)
        print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
