"""FlexAttention and patterncc, kernel by kernel, on one GPU.

    python bench/flex_profile.py --pattern "sliding_window(1024)" --seq-len 16384 --head-dim 128 \
        [--source flex_kernels.py]
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
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import patterncc as pcc
from patterncc.backends.triton import flex as flex_interop
from patterncc.backends.triton.bench import PATTERNS


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
    ap.add_argument("--plain", action="store_true",
                    help="run each forward+backward twice, no profiler (for running under ncu)")
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
    attn = pcc.compile(pattern, backend="triton")

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
