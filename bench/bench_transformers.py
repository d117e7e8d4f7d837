"""A ~1B-parameter Llama-shaped model in Hugging Face transformers at 32K
context: training step and generation with each attention implementation,
on the same weights in one process.

    python bench/bench_transformers.py                  # one GPU, ~4 minutes on an H200
    python bench/bench_transformers.py --context 16384 --new-tokens 16
    python bench/bench_transformers.py --smoke          # a tiny model on the CPU: the script still runs

The model is built from a config with random weights (nothing downloaded):
hidden 2048, 16 layers, 32 heads, 8 key/value heads (head dim 64),
intermediate 8192, vocab 32000, bf16, batch 1. Rows, in this order:

- ``sdpa``, ``flex_attention``: transformers' own implementations;
- ``patterncc``: the model's own causal masking through patterncc;
- ``patterncc strided(128) / causal``: ``strided(128)`` on every other layer
  (``patterncc.integrations.transformers.apply``), causal on the rest;
- ``patterncc sliding_window(4096)``: every layer.

Each row times, with CUDA events, the median of ``--repeats`` runs after
warm-up:

- ``fwd+bwd``: ``model(ids, labels=ids).loss.backward()`` (gradients reset
  to None between runs; no optimizer step);
- ``prefill``: ``generate`` of one new token (the 32K-token forward that
  fills transformers' DynamicCache, and one token);
- ``per token``: ``(generate of N new tokens - generate of 1) / (N - 1)``,
  greedy, ``min_new_tokens`` so that none stops early.

Gradient checkpointing is off unless ``--checkpointing on``, or ``auto``
(the default) and a row runs out of memory: the row is then retried with it
on, and the table says so. A row that fails prints its error and the rest
run. For patterncc rows the table also says whether generation's new tokens
took the decode path (the query-rows kernel) and how many calls it made, and
how many calls patterncc handed to SDPA itself (its cost model does so for
a plain causal layer where that is cheaper).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64)
SMOKE_SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@dataclass
class Row:
    name: str
    implementation: str
    patterns: dict | None = None  # for patterncc.integrations.transformers.apply
    ms: dict = field(default_factory=dict)  # "fwd+bwd", "prefill", "per token" -> median ms
    notes: list = field(default_factory=list)
    tokens: list | None = None  # the greedy new tokens of the last generation


def rows_for(layers: int) -> list[Row]:
    every_other = {i: "strided(128)" for i in range(0, layers, 2)}
    return [Row("sdpa", "sdpa"), Row("flex_attention", "flex_attention"), Row("patterncc", "patterncc"),
            Row("patterncc strided(128) / causal", "patterncc", every_other),
            Row("patterncc sliding_window(4096)", "patterncc", {i: "sliding_window(4096)" for i in range(layers)})]


class Clock:
    """Milliseconds of a call: CUDA events on the GPU, the wall clock on the CPU."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda = torch, device == "cuda"

    def __call__(self, fn) -> float:
        torch = self.torch
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def median(self, fn, warmup: int, repeats: int) -> float:
        from patterncc import wait_for_kernels

        for _ in range(warmup):
            fn()
        wait_for_kernels()  # a new pattern's first calls ran the stand-in kernels: time its own
        return statistics.median(self(fn) for _ in range(repeats))


def use(model, row: Row, pt) -> None:
    """Switch the model to the row's attention: the implementation, and the
    user patterns on their layers (none left from an earlier row)."""
    for layer in model.model.layers:
        layer.self_attn.__dict__.pop("patterncc_pattern", None)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(row.implementation)
    else:
        model.config._attn_implementation = row.implementation
    if row.patterns:
        pt.apply(model, row.patterns)


def decode_calls():
    """A counter of the query-rows kernel's calls (the decode path on the
    Triton backend), or None where that kernel cannot be imported."""
    try:
        from patterncc.backends.triton.decode import RowsAttention
    except Exception:  # no triton: the reference backend serves every call
        return None
    counter = {"calls": 0}
    original = RowsAttention.__call__

    def counted(self, *args, **kwargs):
        counter["calls"] += 1
        return original(self, *args, **kwargs)

    RowsAttention.__call__ = counted
    counter["restore"] = lambda: setattr(RowsAttention, "__call__", original)
    return counter


def checkpoint(model, on: bool) -> None:
    """Gradient checkpointing on or off, by the names transformers has
    (``activation_checkpointing_*`` in newer releases, ``gradient_*`` before)."""
    verb = "enable" if on else "disable"
    switch = getattr(model, f"activation_checkpointing_{verb}", None)
    (switch or getattr(model, f"gradient_checkpointing_{verb}"))()


def dense_sdpa_calls():
    """A counter of the calls in which patterncc itself hands a plain causal
    attention to SDPA (its cost model does where that is cheaper), installed
    before the first patterncc attention is made."""
    import patterncc.attention as attention

    counter = {"calls": 0}
    original = attention.sdpa_dense

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        counter["calls"] += out is not None
        return out

    attention.sdpa_dense = counted
    return counter


def is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def run_row(model, row: Row, ids, args, clock, torch, pt, checkpointing: bool) -> None:
    use(model, row, pt)
    checkpoint(model, checkpointing)
    if checkpointing:
        row.notes.append("gradient checkpointing")
    model.train()

    def step():
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    row.ms["fwd+bwd"] = clock.median(step, args.warmup, args.repeats)
    model.zero_grad(set_to_none=True)
    model.eval()
    n = args.new_tokens

    def generate(new: int):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == args.context + new, out.shape
        row.tokens = out[0, args.context:].tolist()

    triton_backend = row.implementation == "patterncc" and ids.is_cuda
    counter = decode_calls() if triton_backend else None
    try:
        row.ms["prefill"] = clock.median(lambda: generate(1), args.warmup, args.repeats)
        seen = counter["calls"] if counter else 0
        full = clock.median(lambda: generate(n), args.warmup, args.repeats)
        if counter is not None:
            calls = counter["calls"] - seen
            expected = (args.warmup + args.repeats) * (n - 1) * len(model.model.layers)
            verdict = "decode path" if calls == expected else "NOT only the decode path"
            row.notes.append(f"{verdict}: {calls} query-rows kernel calls, decode steps x layers {expected}")
    finally:
        if counter is not None:
            counter["restore"]()
    row.ms["per token"] = (full - row.ms["prefill"]) / max(n - 1, 1)


def measure(model, row: Row, ids, args, clock, torch, pt) -> None:
    """``run_row``, failing soft: an error becomes the row's note (its
    traceback printed, the figures measured before it kept); running out of
    memory retries the row with gradient checkpointing when
    ``--checkpointing auto``."""
    checkpointing = args.checkpointing == "on"
    while True:
        try:
            run_row(model, row, ids, args, clock, torch, pt, checkpointing)
            return
        except Exception as err:
            model.zero_grad(set_to_none=True)
            if ids.is_cuda:
                torch.cuda.empty_cache()
            if is_oom(err) and args.checkpointing == "auto" and not checkpointing:
                row.ms.clear()
                row.notes.clear()
                checkpointing = True
                print(f"{row.name}: out of memory, again with gradient checkpointing", flush=True)
                continue
            first_line = str(err).splitlines()[0][:160] if str(err) else ""
            row.notes.append(f"failed: {type(err).__name__}: {first_line}")
            traceback.print_exc(limit=4)
            return


def markdown(rows: list[Row], base: str = "sdpa") -> str:
    ref = next((r for r in rows if r.name == base and r.ms), None)
    keys = ["fwd+bwd", "prefill", "per token"]
    lines = ["| attention | fwd+bwd ms | prefill ms | per new token ms | time / sdpa's (fwd+bwd / prefill / token) | notes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r.ms[k]:.2f}" if k in r.ms else "-" for k in keys]
        ratios = [f"{r.ms[k] / ref.ms[k]:.2f}x" if ref and k in r.ms and k in ref.ms else "-" for k in keys]
        lines.append(f"| {r.name} | {' | '.join(cells)} | {' / '.join(ratios)} | {'; '.join(r.notes)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (reference backend)")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="seconds after which the rows not yet started are skipped (default 330)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import patterncc.integrations.transformers as pt

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU dry run")
        return 2
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        args.context, args.new_tokens, args.repeats, args.warmup = min(args.context, 48), min(args.new_tokens, 4), 1, 0
    pt.register(backend="reference" if args.smoke else "auto")

    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=args.context + args.new_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype)
    ids = torch.randint(1, shape["vocab_size"], (1, args.context), device=device)
    params = sum(p.numel() for p in model.parameters())
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    header = (f"{card}; torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}; "
              f"patterncc backend {'reference' if args.smoke else 'auto (Triton)'}\n"
              f"Llama-shaped, {params / 1e9:.2f}B parameters: hidden {shape['hidden_size']}, "
              f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / "
              f"{shape['num_key_value_heads']} kv heads, head dim {shape['head_dim']}, intermediate "
              f"{shape['intermediate_size']}, vocab {shape['vocab_size']}; {str(dtype).removeprefix('torch.')}, "
              f"batch 1, context {args.context}, {args.new_tokens} new tokens; median of {args.repeats} after "
              f"{args.warmup} warm-up")
    print(header, flush=True)

    clock = Clock(torch, device)
    dense = dense_sdpa_calls()
    rows = [r for r in rows_for(shape["num_hidden_layers"]) if not args.only or r.name in args.only]
    started = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        if t0 - started > args.budget_s:
            row.notes.append(f"skipped: the run's {args.budget_s:.0f} s budget was spent")
            print(f"{row.name}: skipped, over budget", flush=True)
            continue
        if row.implementation == "flex_attention" and device != "cuda":
            row.notes.append("skipped: flex_attention is measured on the GPU only")
            print(f"{row.name}: skipped on the CPU", flush=True)
            continue
        before = dense["calls"]
        measure(model, row, ids, args, clock, torch, pt)
        if row.implementation == "patterncc" and dense["calls"] > before:
            row.notes.append(f"{dense['calls'] - before} calls ran patterncc's dense SDPA path")
        if row.patterns is None and row.tokens and rows[0].tokens and row is not rows[0]:
            agree = next((i for i, (a, b) in enumerate(zip(row.tokens, rows[0].tokens)) if a != b), len(row.tokens))
            row.notes.append(f"greedy tokens as {rows[0].name}'s: the first {agree} of {len(row.tokens)}")
        peak = ""
        if device == "cuda":
            peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            torch.cuda.reset_peak_memory_stats()
        print(f"{row.name}: {', '.join(f'{k} {v:.2f} ms' for k, v in row.ms.items())} "
              f"({time.perf_counter() - t0:.0f} s{peak})", flush=True)
    print(f"\n{header}\n\n{markdown(rows)}\n\n({time.perf_counter() - started:.0f} s in all)")
    return 0 if any(r.ms for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
