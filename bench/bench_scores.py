"""The score terms' cost on one GPU: each term against the same pattern without it, and against Flex.

    python bench/bench_scores.py                      # n = 16384, H = 16, D = 64 and 128, bf16 -> markdown table
    python bench/bench_scores.py --out scores.md      # also write the table
    python bench/bench_scores.py --patterns causal --head-dims 64 --rounds 1
    TRITON_INTERPRET=1 python bench/bench_scores.py --device cpu --seq-len 256 --heads 2 --head-dims 16 --rounds 1
                                                      # a dry run of the harness on the CPU (times mean nothing)

For each pattern and head dim, on the same random inputs in one process:
patterncc (``TritonAttention``, natural order: both patterns run unplanned)
with no term, each term alone and all four together, and FlexAttention
(``torch.compile``'d, BlockMask from ``create_block_mask``) with the
equivalent ``score_mod``:

- softcap(c): ``c * tanh(score / c)``;
- alibi: ``score - slopes[h] * |q - k|`` (standard slopes ``2^(-8 (h + 1) / H)``,
  a captured tensor that requires grad); alibi_fixed: the same slopes wanting
  no gradient, as BLOOM and MPT hold them (neither backward sums one);
- rel_bias: ``score + t[h, clamp(q - k, -M, M) + M]`` (captured, requires grad);
- sinks: Flex has no sink term; it is applied to Flex's output the way a
  sink is defined, ``o * sigmoid(lse - t[h])`` with ``lse`` from
  ``return_lse=True`` (so its cost includes one elementwise pass over o).

Forward and forward+backward medians (``triton.testing.do_bench``, median
over ``--rounds`` rounds, contenders back to back in each round, in reverse
order every other round, as ``patterncc bench`` does), the overhead of each
term over the same contender without terms (%), the ratio flex/pcc (> 1:
patterncc faster), and the largest |o_pcc - o_flex|.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

PATTERNS = ("sliding_window(4096)", "causal")
TERMS = ("none", "softcap", "alibi", "alibi_fixed", "sinks", "rel_bias", "all")


def _pattern(name: str):
    from patterncc import ir

    if name == "causal":
        return ir.Causal()
    if name.startswith("sliding_window(") and name.endswith(")"):
        return ir.Causal() & ir.Local(int(name[len("sliding_window("):-1]))
    import patterncc

    return patterncc.parse(name)


def alibi_slopes(H: int):
    """The standard ALiBi slopes for a power-of-two H: 2^(-8 (h + 1) / H)."""
    import torch

    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


def term_values(term: str, H: int, softcap: float, max_distance: int, device) -> dict:
    """The keyword arguments of one term (all four for "all"), tensors
    requiring grad but alibi_fixed's slopes."""
    import torch

    g = torch.Generator().manual_seed(1)
    values = {}
    if term in ("softcap", "all"):
        values["softcap"] = softcap
    if term in ("alibi", "alibi_fixed", "all"):
        values["alibi_slopes"] = alibi_slopes(H)
    if term in ("sinks", "all"):
        values["sinks"] = torch.randn(H, generator=g)
    if term in ("rel_bias", "all"):
        values["rel_bias"] = 0.1 * torch.randn(H, 2 * max_distance + 1, generator=g)
    return {k: v.to(device).requires_grad_(term != "alibi_fixed") if torch.is_tensor(v) else v
            for k, v in values.items()}


def flex_call(flex_attention, block_mask, values: dict):
    """(q, k, v) -> o through Flex with the terms as a score_mod (and the sink on its output)."""
    import torch

    softcap = values.get("softcap")
    slopes = values.get("alibi_slopes")
    rel = values.get("rel_bias")
    sinks = values.get("sinks")
    M = None if rel is None else (rel.shape[1] - 1) // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx - kv_idx).abs()
        if rel is not None:
            score = score + rel[h, (q_idx - kv_idx).clamp(-M, M) + M]
        return score

    mod = score_mod if (softcap is not None or slopes is not None or rel is not None) else None

    def call(q, k, v):
        if sinks is None:
            return flex_attention(q, k, v, score_mod=mod, block_mask=block_mask)
        o, lse = flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, return_lse=True)
        w = torch.sigmoid(lse - sinks.view(1, -1, 1))  # exp(lse) / (exp(lse) + exp(t_h))
        return o * w.unsqueeze(-1).to(o.dtype)

    return call


def bench_pattern(name: str, n: int, H: int, D: int, dtype, *, terms, softcap: float, max_distance: int,
                  rounds: int, rep: int, device: str, flex: bool) -> list[dict]:
    """One row per term: median ms of pcc and flex, forward and forward+backward."""
    import torch

    from patterncc.backends.triton import TritonAttention
    from patterncc.backends.triton import flex as flex_interop
    from patterncc.backends.triton.bench import FLEX_BLOCK, _bench, _flex

    pattern = _pattern(name)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, n, D, device=device, dtype=dtype, generator=g)
    attn = TritonAttention(pattern)
    rows = {t: {"term": t, "notes": []} for t in terms}
    contenders = []  # (term, who, forward, forward+backward, tensors to zero the grads of)
    if flex:
        flex_attention, create_block_mask = _flex(device)
        mask_mod = flex_interop.mask_mod(pattern, n, device)
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=FLEX_BLOCK)
    for term in terms:
        values = term_values(term, H, softcap, max_distance, device)
        grads = [q, k, v, *(x for x in values.values() if torch.is_tensor(x))]
        o_pcc = attn(q, k, v, **values)
        o_pcc.backward(do)  # compile
        contenders.append((term, "pcc", lambda values=values: attn(q, k, v, **values),
                           lambda values=values: attn(q, k, v, **values).backward(do), grads))
        if flex:
            try:
                call = flex_call(flex_attention, block_mask, values)
                o_flex = call(q, k, v)
                o_flex.backward(do)  # compile the backward too
                rows[term]["max_diff"] = (o_flex.float() - o_pcc.float()).abs().max().item()
                contenders.append((term, "flex", lambda call=call: call(q, k, v),
                                   lambda call=call: call(q, k, v).backward(do), grads))
            except Exception as err:  # a row with a note beats no table
                rows[term]["notes"].append(f"flex failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
    times = {}
    for r in range(rounds):
        for term, who, fwd, fwd_bwd, grads in contenders[::-1] if r % 2 else contenders:
            try:
                times.setdefault((term, who, "fwd"), []).append(_bench(fwd, rep=rep, device=device))
                times.setdefault((term, who, "f+b"), []).append(_bench(fwd_bwd, grad_to_none=grads, rep=rep,
                                                                       device=device))
            except Exception as err:
                rows[term]["notes"].append(f"{who} timing failed: {type(err).__name__}: "
                                           f"{str(err).splitlines()[0][:100]}")
    for (term, who, mode), ms in times.items():
        rows[term][f"{who} {mode}"] = statistics.median(ms)
    return [dict(pattern=name, n=n, D=D, **row) for row in rows.values()]


def markdown(rows: list[dict]) -> str:
    """The table: median ms, each term's overhead over the same pattern without terms, flex/pcc."""
    head = ("| pattern | n | D | term | pcc fwd | pcc f+b | pcc overhead fwd, f+b | flex fwd | flex f+b "
            "| flex overhead fwd, f+b | flex/pcc fwd, f+b | max abs diff vs flex | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {(r["pattern"], r["D"]): r for r in rows if r["term"] == "none"}

    def ms(x):
        return "" if x is None or math.isnan(x) else f"{x:.3f}"

    def pct(a, b):
        return "" if a is None or b is None else f"{100 * (a / b - 1):+.1f}%"

    def ratio(a, b):
        return "" if a is None or b is None else f"{a / b:.2f}"

    def pair(a, b):
        return f"{a}, {b}" if a or b else ""

    for r in rows:
        b = base.get((r["pattern"], r["D"]), {})
        get = r.get
        diff = "" if get("max_diff") is None else f"{get('max_diff'):.3g}"
        lines.append(
            f"| {r['pattern']} | {r['n']} | {r['D']} | {r['term']} | {ms(get('pcc fwd'))} | {ms(get('pcc f+b'))} "
            f"| {pair(pct(get('pcc fwd'), b.get('pcc fwd')), pct(get('pcc f+b'), b.get('pcc f+b')))} "
            f"| {ms(get('flex fwd'))} | {ms(get('flex f+b'))} "
            f"| {pair(pct(get('flex fwd'), b.get('flex fwd')), pct(get('flex f+b'), b.get('flex f+b')))} "
            f"| {pair(ratio(get('flex fwd'), get('pcc fwd')), ratio(get('flex f+b'), get('pcc f+b')))} "
            f"| {diff} "
            f"| {'; '.join(r['notes'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--terms", nargs="+", default=list(TERMS), choices=TERMS)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--softcap", type=float, default=50.0, help="Gemma 2's logit softcap")
    parser.add_argument("--max-distance", type=int, default=128, help="rel_bias's M: [H, 2 M + 1] buckets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_scores.py needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1 for a dry run)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.patterns:
        for D in args.head_dims:
            t0 = time.perf_counter()
            try:
                got = bench_pattern(name, args.seq_len, args.heads, D, dtype, terms=args.terms,
                                    softcap=args.softcap, max_distance=args.max_distance, rounds=args.rounds,
                                    rep=args.rep, device=args.device, flex=not args.no_flex)
            except Exception as err:  # one failing case must not cost the others' figures
                got = [dict(pattern=name, n=args.seq_len, D=D, term="(all)",
                            notes=[f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"])]
            rows += got
            # each case's rows as soon as they exist: a run cut short still reports what it measured
            print(markdown(got), f"\n# {name} D={D}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    table = markdown(rows)
    print(f"\nAll cases: {args.dtype}, B = 1, H = {args.heads}, softcap {args.softcap}, rel_bias M = {args.max_distance}, "
          f"{args.rounds} rounds; {torch.cuda.get_device_name() if args.device == 'cuda' else args.device}\n")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
