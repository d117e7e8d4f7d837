"""Does a forward+backward's time depend on where its inputs sit in memory?

    python bench/placement.py [--pattern "sliding_window(1024)"] [--seq-len 16384] [--head-dim 128]

The D = 128 sliding_window(1024) forward+backward moved 1.511-1.589 ms from
process to process (sessions 6 and 7, PERFORMANCE.md) while each process's
own repeats agreed within 1%: something fixed per process, not per call.
One suspect is placement: at n = 16384, H = 16, D = 128 each of q, k, v, dO
is exactly 2**26 bytes, so tensors allocated back to back sit a power of two
apart and the rows a kernel reads together may share L2 sets and slices.

This places q, k, v and dO in one buffer with a chosen gap between them
(0: back to back; then odd multiples of 256 bytes and of pages), times the
patterncc forward+backward with do_bench as the bench does (median, L2
flushed, grads set to None) for each placement, twice, in one process, and
prints the table with the address of each tensor modulo 2**26 and the
gradients' (which the caching allocator places). A measuring tool: it
asserts nothing about speed. Run it in several processes to separate
placement from whatever else differs between them.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import patterncc as pcc
from patterncc.backends.triton import TritonAttention

GAPS = (0, 256, 4096, 65536 + 256, 2**21, 2**21 + 4096, 3 * 2**20 + 768)  # bytes between tensors


def placed(gap: int, shape, dtype) -> list[torch.Tensor]:
    """q, k, v, dO: normal random, in one buffer, ``gap`` bytes apart."""
    size = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    buf = torch.empty(4 * (size + gap) + 4096, dtype=torch.uint8, device="cuda")
    out, at = [], 0
    for _ in range(4):
        t = buf[at:at + size].view(dtype).view(shape)
        t.normal_()
        out.append(t.detach())
        at += size + gap
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="sliding_window(1024)")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rep", type=int, default=200, help="do_bench's rep (ms) per placement")
    args = ap.parse_args()
    shape = (1, args.heads, args.seq_len, args.head_dim)
    attn = TritonAttention(pcc.parse(args.pattern))
    print(f"{args.pattern}, n={args.seq_len}, H={args.heads}, D={args.head_dim}, bf16; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| gap (bytes) | q, k, v, dO at (mod 2**26) | dq, dk, dv at (mod 2**26) | fwd+bwd ms, run 1 | run 2 |")
    print("|---|---|---|---|---|")
    for gap in GAPS:
        q, k, v, do = placed(gap, shape, torch.bfloat16)
        for t in (q, k, v):
            t.requires_grad_(True)

        def step():
            attn(q, k, v).backward(do)

        step()
        grads = [t.grad.data_ptr() % 2**26 for t in (q, k, v)]
        times = [do_bench(step, rep=args.rep, grad_to_none=[q, k, v], return_mode="median") for _ in range(2)]
        where = ", ".join(f"{t.data_ptr() % 2**26:#x}" for t in (q, k, v, do))
        print(f"| {gap} | {where} | {', '.join(f'{g:#x}' for g in grads)} | {times[0]:.3f} | {times[1]:.3f} |",
              flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
