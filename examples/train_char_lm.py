#!/usr/bin/env python3
"""Character-level language models on the Python standard library's own
source: dense causal attention against the Sparse Transformer's patterns,
trained with one budget (steps, batch, learning-rate schedule, seed).

    python examples/train_char_lm.py --tiny --out out/tiny          # CPU, under a minute
    python examples/train_char_lm.py --device cuda --context 16384 --batch 2 \\
        --models dense,fixed,strided --steps 1200 --out out/gpu
    python examples/train_char_lm.py --device cuda --no-train --sweep --out out/sweep

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (not
``site-packages``), sorted by relative path and concatenated as bytes; the
vocabulary is the 256 byte values and the last 5% is held out. So the data
is offline everywhere, but differs between Python versions: results.json
records the version, file count, size and a hash. "Bits per character" are
bits per byte (the source is almost all ASCII).

Models (``--models``, comma separated):

    dense                  dense causal attention (torch SDPA, is_causal=True)
    strided, fixed         the library patterns strided(l), fixed(l, c), every layer and head
    strided-MODE           the two factors of a pattern, arranged by MODE (see patterncc.nn):
    fixed-MODE               interleaved (alternate layers), merged (their union),
                             multihead (half the heads each)
    NAME                   a custom pattern given as --pattern NAME=SOURCE (.pat text or file)

The factors are the paper's: strided = causal & local(l), causal & stride(l);
fixed = causal & block(l), causal & summary(l, c).

Measured per model: training loss (every step) and validation loss (every
--eval-every steps) in bits per character, median step time after
--timing-warmup steps (synchronized on CUDA), peak memory
(torch.cuda.max_memory_allocated on CUDA; peak resident set size on the CPU).
--sweep adds forward+backward time and peak activation memory over context
lengths, for each --sweep-models model with and without recomputation.

Outputs in --out: results.json, results.md, loss_curves.png and sweep.png
(the PNGs when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import patterncc as pcc
from patterncc import ir
from patterncc.nn import MODES, SparseTransformer, resolve_pattern
from patterncc.pipeline import mask  # not pcc.mask: the submodule patterncc.masks can shadow it

LN2 = math.log(2.0)
VOCAB = 256  # bytes
MIB = 2**20

# --tiny: a CPU configuration that exercises every path in well under a minute.
TINY = dict(
    device="cpu", backend="reference", context=64, batch=4, dim=32, depth=2, heads=2,
    steps=16, eval_every=8, eval_batches=2, timing_warmup=2, lr=3e-3, l=8, c=2, threads=1,
    max_bytes=1_000_000, models="dense,strided,fixed,strided-interleaved,strided-merged,fixed-multihead",
    sweep=True, sweep_contexts="32,64,128", sweep_models="dense,fixed", sweep_steps=2,
    sweep_warmup=1,
)


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 (n_train,)
    val: torch.Tensor  # uint8 (n_val,)
    info: dict


def stdlib_files() -> tuple[Path, list[Path]]:
    """Every .py file of the standard library, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def load_corpus(max_bytes: int | None = None, val_fraction: float = 0.05) -> Corpus:
    root, files = stdlib_files()
    chunks, total, used = [], 0, 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        used += 1
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 1000:
        raise SystemExit(f"the standard library under {root} gave only {len(data)} bytes of .py source")
    split = int(len(data) * (1.0 - val_fraction))
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    info = {
        "python": platform.python_version(),
        "stdlib": str(root),
        "files": used,
        "bytes": len(data),
        "train_bytes": split,
        "val_bytes": len(data) - split,
        "sha256": hashlib.sha256(data).hexdigest()[:16],
        "distinct_bytes": int(torch.unique(tokens).numel()),
    }
    return Corpus(tokens[:split], tokens[split:], info)


def sample_batch(data: torch.Tensor, batch: int, context: int, gen: torch.Generator, device):
    """Random windows: x, y ``(batch, context)`` int64, y shifted by one."""
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
    chunk = data[starts[:, None] + torch.arange(context + 1)].long().to(device)  # (batch, context + 1)
    return chunk[:, :-1], chunk[:, 1:]


def val_batches(val: torch.Tensor, batch: int, context: int, count: int, device):
    """``count`` batches of evenly spaced held-out windows, the same for every model."""
    last = len(val) - context - 1
    if last < 0:
        raise SystemExit(f"the held-out split ({len(val)} bytes) is shorter than --context + 1 = {context + 1}")
    starts = torch.linspace(0, last, count * batch).long().view(count, batch)
    out = []
    for row in starts:
        chunk = val[row[:, None] + torch.arange(context + 1)].long().to(device)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def factors(family: str, l: int, c: int) -> list[ir.Pattern]:
    """The paper's two factors of the strided and fixed patterns."""
    if family == "strided":
        return [ir.Causal() & ir.Local(l), ir.Causal() & ir.Stride(l)]
    return [ir.Causal() & ir.Block(l), ir.Causal() & ir.Summary(l, c)]


def library_pattern(family: str, l: int, c: int) -> ir.Pattern:
    """strided(l) and fixed(l, c) exactly as the standard library writes them."""
    if family == "strided":
        return ir.Causal() & (ir.Local(l) | ir.Stride(l))
    return ir.Causal() & (ir.Block(l) | ir.Summary(l, c))


@dataclass
class ModelSpec:
    name: str
    patterns: list | None  # None: dense causal
    mode: str
    attention: str  # human-readable

    def build(self, args, max_len: int, recompute: bool = False) -> SparseTransformer:
        return SparseTransformer(
            VOCAB, args.dim, args.depth, args.heads, self.patterns, mode=self.mode,
            max_len=max_len, recompute=recompute, dropout=args.dropout, kv_heads=args.kv_heads,
            mlp_ratio=args.mlp_ratio, backend=args.backend,
        )


def model_spec(name: str, args) -> ModelSpec:
    if name == "dense":
        return ModelSpec(name, None, "interleaved", "dense causal (SDPA)")
    if name in args.custom:
        pattern = resolve_pattern(args.custom[name])
        return ModelSpec(name, [pattern], "interleaved", f"`{pattern}`")
    family, _, mode = name.partition("-")
    if family not in ("strided", "fixed") or (mode and mode not in MODES):
        raise SystemExit(
            f"unknown model {name!r}: use dense, strided, fixed, strided-MODE or fixed-MODE "
            f"(MODE: {', '.join(MODES)}), or define it with --pattern {name}=SOURCE"
        )
    if not mode:
        pattern = library_pattern(family, args.l, args.c)
        return ModelSpec(name, [pattern], "merged", f"`{pattern}`")
    a, b = factors(family, args.l, args.c)
    how = {"interleaved": "layers alternate", "merged": "union of", "multihead": "heads split"}[mode]
    return ModelSpec(name, [a, b], mode, f"{how} `{a}` / `{b}`")


def density(model: SparseTransformer, heads: int, seq_len: int) -> float:
    """Allowed pairs / causal pairs, averaged over layers, at ``seq_len``."""
    causal = seq_len * (seq_len + 1) // 2 * heads
    per_pattern = {}
    total = 0.0
    for p in model.layer_patterns:
        if p is None:
            total += 1.0
            continue
        if p not in per_pattern:
            per_pattern[p] = float(mask(p, seq_len=seq_len, heads=heads).sum()) / causal
        total += per_pattern[p]
    return total / len(model.layer_patterns)


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def lr_at(step: int, args) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10%."""
    warmup = max(1, args.steps // 20)
    if step <= warmup:
        return args.lr * step / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------
# Measuring: time, memory, progress
# ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PeakMemory:
    """Peak memory since ``reset()``: CUDA allocator bytes, or the process's
    peak resident set (reset through /proc/self/clear_refs where Linux allows;
    otherwise the process-lifetime peak, which ``method`` then says)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.method = "peak RSS (VmHWM, reset per measurement)" if self._can_reset_rss() else "peak RSS (ru_maxrss, process lifetime)"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        """Start a measurement; ``base`` is what is allocated now."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if "VmHWM" in self.method:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            self.base = (_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _status_kib("VmHWM")
        return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Progress:
    """A one-line progress bar on stderr (a line per 10% when not a terminal)."""

    def __init__(self, total: int, desc: str, stream=sys.stderr):
        self.total, self.desc, self.stream = total, desc, stream
        self.tty = stream.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.every = max(1, total // 10)

    def update(self, done: int, info: str = "") -> None:
        now = time.perf_counter()
        if self.tty and (now - self.last_draw > 0.1 or done == self.total):
            width = 24
            filled = int(width * done / self.total)
            bar = "#" * filled + "." * (width - filled)
            line = f"\r{self.desc:<22} [{bar}] {done}/{self.total} {info} {now - self.start:.0f}s"
            self.stream.write(line[:150].ljust(80))
            self.stream.flush()
            self.last_draw = now
        elif not self.tty and (done % self.every == 0 or done == self.total):
            self.stream.write(f"{self.desc} {done}/{self.total} {info} {now - self.start:.0f}s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------
# Training comparison
# ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, batches, device, dtype: str) -> float:
    """Mean validation loss in bits per character."""
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast(device, dtype):
            total += model.loss(x, y).item()
    model.train()
    return total / len(batches) / LN2


def train_model(spec: ModelSpec, args, corpus: Corpus, device: torch.device) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for every model
    model = spec.build(args, max_len=args.context, recompute=args.recompute).to(device)
    model.train()
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    val = val_batches(corpus.val, args.batch, args.context, args.eval_batches, device)
    mem = PeakMemory(device)
    mem.reset()

    train_bpc, val_curve, step_times = [], [], []
    progress = Progress(args.steps, spec.name)
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = sample_batch(corpus.train, args.batch, args.context, gen, device)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, args.dtype):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        synchronize(device)
        step_times.append(time.perf_counter() - t0)
        bpc = loss.item() / LN2
        if not math.isfinite(bpc):
            raise RuntimeError(f"{spec.name}: the training loss is {bpc} at step {step}")
        train_bpc.append(bpc)
        if step % args.eval_every == 0 or step == args.steps:
            val_curve.append((step, evaluate(model, val, device, args.dtype)))
        progress.update(step, f"loss {bpc:.3f} bpc, val {val_curve[-1][1]:.3f}" if val_curve else f"loss {bpc:.3f} bpc")
    progress.close()

    timed = step_times[args.timing_warmup:] or step_times
    median_s = statistics.median(timed)
    tail = train_bpc[-max(1, len(train_bpc) // 10):]
    record = {
        "model": spec.name,
        "status": "ok",
        "attention": spec.attention,
        "mode": spec.mode if spec.patterns else None,
        "layer_patterns": [None if p is None else str(p) for p in model.layer_patterns],
        "density_vs_causal": density(model, args.heads, min(args.context, 1024)),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "val_bpc": val_curve[-1][1],
        "train_bpc_last10pct": sum(tail) / len(tail),
        "step_time_ms_median": median_s * 1e3,
        "tokens_per_s": args.batch * args.context / median_s,
        "peak_memory_bytes": mem.peak(),
        "memory_method": mem.method,
        "train_bpc": train_bpc,
        "val_curve": val_curve,
        "step_times_ms": [t * 1e3 for t in step_times],
    }
    del model, opt
    release(device)
    return record


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# Memory and time over context lengths
# ----------------------------------------------------------------------------


def measure(spec: ModelSpec, args, corpus: Corpus, device: torch.device, seq_len: int, recompute: bool) -> dict:
    """Forward+backward of one training batch: median time and peak activation memory."""
    record = {"model": spec.name, "context": seq_len, "recompute": recompute, "batch": args.sweep_batch}
    model = None
    try:
        torch.manual_seed(args.seed)
        model = spec.build(args, max_len=seq_len, recompute=recompute).to(device)
        model.train()
        gen = torch.Generator().manual_seed(args.seed)
        x, y = sample_batch(corpus.train, args.sweep_batch, seq_len, gen, device)
        mem = PeakMemory(device)
        times = []
        warmup = max(1, args.sweep_warmup)  # the first backward allocates the gradient buffers
        for i in range(warmup + args.sweep_steps):
            if i == warmup:
                mem.reset()  # weights and gradient buffers now allocated: base
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, args.dtype):
                loss = model.loss(x, y)
            loss.backward()  # gradients accumulate in place: no new buffers
            synchronize(device)
            times.append(time.perf_counter() - t0)
            del loss
        peak = mem.peak()
        record.update(
            status="ok",
            step_time_ms=statistics.median(times[warmup:]) * 1e3,
            peak_memory_bytes=peak,
            activation_bytes=peak - mem.base,
            activation_bytes_per_token=(peak - mem.base) / (args.sweep_batch * seq_len),
            memory_method=mem.method,
        )
    except torch.cuda.OutOfMemoryError:
        record.update(status="oom")
    except Exception as err:  # recorded; the rest of the sweep still runs
        traceback.print_exc()
        record.update(status="error", error=repr(err))
    finally:
        del model
        release(device)
    return record


def run_sweep(args, corpus: Corpus, device: torch.device, records: list, save_progress=lambda: None) -> list[dict]:
    """Append one record per (context, model, recompute) to ``records``, saving after each."""
    contexts = [int(n) for n in args.sweep_contexts.split(",")]
    names = [m for m in args.sweep_models.split(",") if m]
    specs = [model_spec(m, args) for m in names]
    runs = [(n, s, r) for n in contexts for s in specs for r in (False, True)]
    progress = Progress(len(runs), "sweep")
    for i, (n, spec, recompute) in enumerate(runs, 1):
        rec = measure(spec, args, corpus, device, n, recompute)
        records.append(rec)
        save_progress()  # a sweep cut off by a timeout keeps what it measured
        what = f"{spec.name} n={n} recompute={recompute}: " + (
            f"{rec['step_time_ms']:.1f} ms, {rec['activation_bytes'] / MIB:.0f} MiB" if rec["status"] == "ok" else rec["status"]
        )
        progress.update(i, what)
    progress.close()
    return records


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------


def write_markdown(results: dict, path: Path) -> None:
    env, cfg, corpus = results["environment"], results["config"], results["corpus"]
    lines = [
        f"# Character-level LM on the Python {corpus['python']} standard library",
        "",
        f"- device: {env['device_name']} ({env['device']}), torch {env['torch']}, dtype {env['dtype']}",
        f"- corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.2f} MB "
        f"(train {corpus['train_bytes']:,} B, held out {corpus['val_bytes']:,} B, sha256 {corpus['sha256']})",
        f"- model: dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads']}, "
        f"kv_heads {cfg['kv_heads'] or cfg['heads']}, mlp_ratio {cfg['mlp_ratio']}, dropout {cfg['dropout']}",
        f"- budget: {cfg['steps']} steps of {cfg['batch']} x {cfg['context']} tokens, AdamW lr {cfg['lr']} "
        f"(warmup 5%, cosine to 10%), seed {cfg['seed']}, recompute {cfg['recompute']}",
        "",
    ]
    train = [r for r in results.get("train") or [] if r["status"] == "ok"]
    broken = [r for r in results.get("train") or [] if r["status"] != "ok"]
    if train or broken:
        dense = next((r for r in train if r["model"] == "dense"), None)
        lines += [
            "## Training with equal budgets",
            "",
            "Bits per character; step time is the median after warmup; density is allowed / causal pairs "
            f"at context {min(cfg['context'], 1024)}.",
            "",
            "| model | attention | density | val bpc | vs dense | train bpc (last 10%) | step ms | vs dense | tokens/s | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in train:
            rel_loss = f"{(r['val_bpc'] / dense['val_bpc'] - 1) * 100:+.1f}%" if dense else "-"
            rel_time = f"{r['step_time_ms_median'] / dense['step_time_ms_median']:.2f}x" if dense else "-"
            lines.append(
                f"| {r['model']} | {_cell(r['attention'])} | {r['density_vs_causal']:.3f} | {r['val_bpc']:.4f} | {rel_loss} "
                f"| {r['train_bpc_last10pct']:.4f} | {r['step_time_ms_median']:.2f} | {rel_time} "
                f"| {r['tokens_per_s']:,.0f} | {r['peak_memory_bytes'] / MIB:.0f} |"
            )
        for r in broken:
            lines.append(f"| {r['model']} | {_cell(r['attention'])} | {r['status']}: {_cell(r['error'])[:200]} |||||||| ")
        lines.append("")
    sweep = results.get("sweep") or []
    if sweep:
        lines += [
            f"## Memory and time over context length (forward + backward, batch {cfg['sweep_batch']})",
            "",
            "Activation memory is the peak above what weights and gradients hold; if it grows linearly "
            "with context, bytes/token stays flat.",
            "",
            "| context | model | recompute | step ms | peak MiB | activation MiB | activation bytes/token |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sweep:
            if r["status"] != "ok":
                why = f"{r['status']}: {_cell(r['error'])[:120]}" if "error" in r else r["status"]
                lines.append(f"| {r['context']} | {r['model']} | {r['recompute']} | {why} | | | |")
                continue
            lines.append(
                f"| {r['context']} | {r['model']} | {r['recompute']} | {r['step_time_ms']:.2f} "
                f"| {r['peak_memory_bytes'] / MIB:.0f} | {r['activation_bytes'] / MIB:.1f} "
                f"| {r['activation_bytes_per_token']:,.0f} |"
            )
        method = next((r["memory_method"] for r in sweep if "memory_method" in r), "-")
        lines += ["", f"Memory: {method}.", ""]
    path.write_text("\n".join(lines))


def _cell(text: str) -> str:
    """Markdown table cell: a pattern's `|` would end the cell."""
    return text.replace("|", "\\|")


def plot(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    written = []
    train = [r for r in results.get("train") or [] if r["status"] == "ok"]
    if train:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in train:
            curve = r["train_bpc"]
            window = max(1, len(curve) // 50)
            smooth = [sum(curve[max(0, i - window + 1): i + 1]) / len(curve[max(0, i - window + 1): i + 1]) for i in range(len(curve))]
            left.plot(range(1, len(curve) + 1), smooth, label=r["model"])
            steps, vals = zip(*r["val_curve"])
            right.plot(steps, vals, marker="o", label=r["model"])
        left.set(title=f"training loss (moving average of {window})", xlabel="step", ylabel="bits per character")
        right.set(title="validation loss", xlabel="step", ylabel="bits per character")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=120)
        plt.close(fig)
        written.append("loss_curves.png")
    sweep = [r for r in results.get("sweep") or [] if r["status"] == "ok"]
    if sweep:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in dict.fromkeys(r["model"] for r in sweep):
            for recompute in (False, True):
                rows = [r for r in sweep if r["model"] == name and r["recompute"] == recompute]
                if not rows:
                    continue
                label = f"{name}{' + recompute' if recompute else ''}"
                style = "--" if recompute else "-"
                ctx = [r["context"] for r in rows]
                left.plot(ctx, [r["step_time_ms"] for r in rows], style, marker="o", label=label)
                right.plot(ctx, [r["activation_bytes"] / MIB for r in rows], style, marker="o", label=label)
        left.set(title="forward + backward time", xlabel="context length", ylabel="ms", xscale="log", yscale="log")
        # Linear axes: linear growth in context shows as a straight line through the origin.
        right.set(title="peak activation memory", xlabel="context length", ylabel="MiB", xlim=(0, None), ylim=(0, None))
        for ax in (left, right):
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=120)
        plt.close(fig)
        written.append("sweep.png")
    return written


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Dense vs sparse attention: char-level LMs on the Python standard library.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="a small CPU configuration (reference backend, < 60 s); other flags still override it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"], help="sparse attention backend (auto: Triton on CUDA, reference on CPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype on CUDA (the CPU runs fp32)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--mlp-ratio", type=float, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--recompute", action="store_true", help="recompute attention and feed-forward in the backward pass while training")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l", type=int, default=128, help="block / stride length l of strided(l) and fixed(l, c)")
    p.add_argument("--c", type=int, default=32, help="summary width c of fixed(l, c)")
    p.add_argument("--models", default="dense,strided,fixed", help="comma-separated: dense, strided, fixed, strided-MODE, fixed-MODE or a --pattern name")
    p.add_argument("--pattern", action="append", default=[], metavar="NAME=SOURCE", help="a custom causal pattern (.pat source or file) usable as model NAME; repeatable")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--timing-warmup", type=int, default=10, help="steps left out of the median step time")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--sweep", action="store_true", help="measure time and activation memory over --sweep-contexts")
    p.add_argument("--sweep-contexts", default="1024,2048,4096,8192,16384")
    p.add_argument("--sweep-models", default="dense,fixed")
    p.add_argument("--sweep-batch", type=int, default=1)
    p.add_argument("--sweep-steps", type=int, default=5)
    p.add_argument("--sweep-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="out/train_char_lm")
    first, _ = p.parse_known_args(argv)
    if first.tiny:
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    args.custom = {}
    for item in args.pattern:
        name, sep, source = item.partition("=")
        if not sep or not name:
            p.error(f"--pattern wants NAME=SOURCE, got {item!r}")
        args.custom[name] = source
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # tiny CPU models run fastest, and steadiest, on one thread
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    corpus = load_corpus(args.max_bytes)
    print(f"corpus: Python {corpus.info['python']} stdlib, {corpus.info['files']} files, "
          f"{corpus.info['bytes'] / 1e6:.2f} MB ({corpus.info['val_bytes']:,} bytes held out)", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k != "custom"}
    results = {
        "config": config,
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "dtype": args.dtype if device.type == "cuda" else "fp32",
            "python": platform.python_version(),
            "patterncc": pcc.__version__,
        },
        "corpus": corpus.info,
        "train": [],
        "sweep": [],
    }
    specs = [model_spec(m, args) for m in args.models.split(",") if m]  # fail early on a bad name
    if args.sweep:
        [model_spec(m, args) for m in args.sweep_models.split(",") if m]
    if not args.no_train:
        for spec in specs:
            try:
                record = train_model(spec, args, corpus, device)
            except Exception as err:  # keep the other models' results (one GPU run, no second try)
                traceback.print_exc()
                record = {"model": spec.name, "attention": spec.attention, "status": "error", "error": repr(err)}
                release(device)
            results["train"].append(record)
            save(results, out, t_start)  # partial results survive a timeout
    if args.sweep:
        run_sweep(args, corpus, device, results["sweep"], lambda: save(results, out, t_start))
    written = save(results, out, t_start, plots=True)
    print((out / "results.md").read_text())
    print(f"wrote {', '.join(str(out / w) for w in written)} in {results['wall_s']:.0f} s", file=sys.stderr)
    return results


def save(results: dict, out: Path, t_start: float, plots: bool = False) -> list[str]:
    results["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "results.md")
    return ["results.json", "results.md", *(plot(results, out) if plots else [])]


def failed(results: dict) -> list[str]:
    return [f"{r['model']}: {r.get('error', r['status'])}" for r in results["train"] + results["sweep"]
            if r.get("status", "ok") not in ("ok", "oom")]


if __name__ == "__main__":
    problems = failed(main())
    if problems:
        sys.exit("failed: " + "; ".join(problems))
