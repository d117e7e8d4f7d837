"""FlexAttention and patterncc, kernel by kernel, on one GPU.

    python bench/flex_profile.py --pattern "sliding_window(1024)" --seq-len 16384 --head-dim 128 \
        [--source flex_kernels.py] [--timeline] [--only flex|pcc]
    ncu --clock-control none -k regex:attn_bwd_dkdv --launch-count 1 --section SpeedOfLight \
        python bench/flex_profile.py --plain

Runs forward+backward of both on the same inputs under ``torch.profiler``
and prints every GPU kernel's mean time per call (what each backward spends
in its delta pass, its dK/dV and dQ work), then, with ``--source``, writes
the Triton source Inductor generated for Flex's kernels to that file (its
tiles, warps and stages are in the ``triton_meta``/launch lines), for
reading next to ours. A measuring tool: no assertion about speed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import patterncc as pcc
from patterncc.backends.triton import flex as flex_interop
from patterncc.backends.triton.bench import PATTERNS, backward_tile_spec, with_backward_tiles
from patterncc.backends.triton.config import DEFAULT_BLOCK
from patterncc.backends.triton.runtime import TritonAttention


def kernel_times(fn, iters: int) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches per call, mean microseconds per call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.key] += getattr(ev, "device_time_total", None) or ev.cuda_time_total
            count[ev.key] += ev.count
    if not total:  # a profiler whose events this reading does not know: its own table
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    return {name: (count[name] // iters, total[name] / iters) for name in total}


def timeline(fn, grads, iters: int, forward=None, grad=None) -> list[str]:
    """Each forward+backward as ``do_bench`` runs it (grads set to None, L2
    flushed by a fill kernel, then the call), under the profiler: the span
    from the call's first kernel's start to its last kernel's end, the
    kernels' busy time inside it, the idle gaps between them, the lead-in
    from the flush's end to the first kernel (where the GPU waited for the
    host to issue the call's first launch), and for each kernel the host's
    time to its launch from the call's first launch. Also do_bench's median
    and the host's time to issue one call while the GPU is kept busy; given
    ``forward`` (the call's forward, whose output takes ``grad``), the same
    loop without the profiler, timed by CUDA events around the forward and
    the backward."""
    from triton.testing import do_bench

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for g in grads:
                g.grad = None
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = trace["traceEvents"]
    launched = {e["args"]["correlation"]: e["ts"] for e in events  # host side of each launch
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = sorted((e["ts"], e["dur"], e["name"], launched.get(e.get("args", {}).get("correlation")))
                     for e in events if e.get("cat") == "kernel" and "dur" in e)
    calls, current = [], None  # split at the flush (a fill kernel)
    for ts, dur, name, host in kernels:
        if "fill" in name.lower() or "FillFunctor" in name:
            current = []
            calls.append((ts + dur, current))
        elif current is not None:
            current.append((ts, dur, name, host))
    rows = []
    for flush_end, call in calls:
        if call:
            span = call[-1][0] + call[-1][1] - call[0][0]
            busy = sum(c[1] for c in call)
            gaps = [b[0] - (a[0] + a[1]) for a, b in zip(call, call[1:])]
            issued = [None if c[3] is None or call[0][3] is None else c[3] - call[0][3] for c in call]
            rows.append((span, busy, gaps, [c[2] for c in call], call[0][0] - flush_end, issued))
    rows.sort(key=lambda r: r[0])
    span, busy, gaps, names, lead, issued = rows[len(rows) // 2]
    leads = sorted(r[4] for r in rows)
    lines = [f"calls profiled: {len(rows)}; median span {span:.1f} us, kernels busy {busy:.1f} us, "
             f"idle {span - busy:.1f} us; lead-in (flush end to first kernel) median {leads[len(leads) // 2]:.1f} us",
             "kernels of the median call, the gap before each and the host's launch time after the first launch: "
             + ", ".join(f"{n[:32]} (+{g:.1f}, host +{'?' if h is None else f'{h:.0f}'})"
                         for n, g, h in zip(names, [lead] + gaps, issued))]
    lines.append(f"do_bench median: {do_bench(fn, grad_to_none=grads, return_mode='median') * 1e3:.1f} us")
    if forward is not None:  # the same loop, no profiler, CUDA events between the forward and the backward
        parts = []
        for _ in range(iters):
            for g in grads:
                g.grad = None
            flush.zero_()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            out = forward()
            ev[1].record()
            torch.autograd.backward(out, grad)
            ev[2].record()
            torch.cuda.synchronize()
            parts.append((ev[0].elapsed_time(ev[1]) * 1e3, ev[1].elapsed_time(ev[2]) * 1e3))
        fw, bw = (sorted(p[i] for p in parts)[len(parts) // 2] for i in (0, 1))
        lines.append(f"event-timed, no profiler (medians): forward {fw:.1f} us, backward {bw:.1f} us")
    _queue_behind_gpu_sleep(fn)
    t0 = time.perf_counter()
    for _ in range(50):
        fn()
    lines.append(f"host time to issue one call: {(time.perf_counter() - t0) / 50 * 1e6:.1f} us")
    torch.cuda.synchronize()
    return lines


def host_profile(fn, grads, calls: int = 50) -> None:
    """Where the host's time to issue a call goes: cProfile over ``calls``
    calls queued behind a long GPU sleep (no call waits on the device)."""
    import cProfile
    import pstats

    _queue_behind_gpu_sleep(fn)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        for g in grads:
            g.grad = None
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def _queue_behind_gpu_sleep(fn) -> None:
    """Call ``fn`` once (warm), then queue ~1 s of GPU work: the calls issued
    next never wait on the device, so the host's own time shows."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))


def report(who: str, times: dict[str, tuple[int, float]]) -> None:
    print(f"\n{who}: GPU time per forward+backward, by kernel")
    print("| kernel | launches | us |\n|---|---|---|")
    for name, (count, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name[:90]} | {count} | {us:.1f} |")
    print(f"| total | | {sum(us for _, us in times.values()):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="sliding_window(1024)")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--source", help="write Inductor's Triton source for Flex's kernels here")
    ap.add_argument("--only", choices=("flex", "pcc"), help="run one of the two")
    ap.add_argument("--timeline", action="store_true",
                    help="idle gaps between a call's kernels, do_bench's median, the host's time per call")
    ap.add_argument("--host-profile", action="store_true",
                    help="a cProfile of 50 forward+backward calls issued while the GPU is kept busy")
    ap.add_argument("--plain", action="store_true",
                    help="run each forward+backward twice, no profiler (for running under ncu)")
    ap.add_argument("--bwd-tiles", type=backward_tile_spec, metavar="M1xN1/M2xN2:W:S",
                    help="patterncc's backward tiles, warps and stages (default: the table's)")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pattern = PATTERNS[args.pattern] if args.pattern in PATTERNS else pcc.parse(args.pattern)
    n, H, D = args.seq_len, args.heads, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    mask = flex_interop.mask_mod(pattern, n, "cuda")
    bm = create_block_mask(mask, 1, None, n, n, device="cuda", _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    config = None
    if args.bwd_tiles:
        base = TritonAttention(pattern).config_for(D, torch.bfloat16, pcc.layout(pattern, n, block=DEFAULT_BLOCK))
        config = with_backward_tiles(base, args.bwd_tiles)
    attn = pcc.compile(pattern, backend="triton", config=config)

    def step(f):
        return lambda: torch.autograd.backward(f(), do)

    print(f"{args.pattern}, n={n}, H={H}, D={D}, bf16; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for who, f in (("FlexAttention", lambda: flex(q, k, v, block_mask=bm)), ("patterncc", lambda: attn(q, k, v))):
        if args.only and who != {"flex": "FlexAttention", "pcc": "patterncc"}[args.only]:
            continue
        if args.plain:
            step(f)(), step(f)()
            torch.cuda.synchronize()
        else:
            report(who, kernel_times(step(f), args.iters))
        if args.timeline:
            print("\n".join(timeline(step(f), [q, k, v], args.iters, forward=f, grad=do)))
        if args.host_profile:
            host_profile(step(f), [q, k, v])

    if args.source:
        root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{os.environ.get('USER', 'root')}"
        with open(args.source, "w") as out:
            for path in sorted(glob.glob(f"{root}/**/*.py", recursive=True)):
                text = open(path).read()
                if "@triton.jit" in text and ("flex_attention" in text or "flex_decoding" in text):
                    out.write(f"# ==== {path}\n{text}\n")
        print(f"\nFlex's kernel source: {args.source}")


if __name__ == "__main__":
    main()
