"""Nothing O(n * n): forward+backward of a pattern at a very long length (one GPU).

    python bench/long_context.py [--pattern "local_global(512,64)"] [--seq-len 262144]

Prints the layout build time, the median forward and forward+backward times,
and the peak GPU memory against the bytes of q, k, v, o, dO and the three
gradients themselves (what any attention must hold), then tries
FlexAttention's uncompiled ``create_block_mask`` at each length given by
``--flex-lengths`` (it materializes an n x n mask: 131072 runs out of memory
on an 80 GB card) and reports what happened.
"""

from __future__ import annotations

import argparse
import time

import torch
from triton.testing import do_bench

import patterncc as pcc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="local_global(512,64)")
    ap.add_argument("--seq-len", type=int, default=262144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--flex-lengths", type=int, nargs="*", default=[131072])
    args = ap.parse_args()
    n, H, D = args.seq_len, args.heads, args.head_dim
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    attn = pcc.compile(args.pattern, backend="triton")
    shape = (1, H, n, D)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    attn(q, k, v).backward(do)  # layout, plan, kernels
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    pcc.wait_for_kernels()  # the first call may have run the stand-in kernels: measure the pattern's own
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attn(q, k, v).backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    fwd = do_bench(lambda: attn(q, k, v), return_mode="median")
    fb = do_bench(lambda: attn(q, k, v).backward(do), grad_to_none=[q, k, v], return_mode="median")
    tensor_bytes = q.numel() * q.element_size()
    print(f"{args.pattern} n={n} H={H} D={D} bf16: first call (layout, plan, kernels) {first:.2f} s; "
          f"forward {fwd:.3f} ms, forward+backward {fb:.3f} ms; peak memory above q, k, v, dO: "
          f"{peak / 2**30:.2f} GiB = {peak / tensor_bytes:.2f} x one [1, H, n, D] tensor "
          f"(o and dq, dk, dv are 4 of them); an n x n bool mask would be {n * n / 2**30:.0f} GiB")
    del q, k, v, do
    torch.cuda.empty_cache()
    from torch.nn.attention.flex_attention import create_block_mask

    from patterncc.backends.triton import flex

    for m in args.flex_lengths:
        try:
            mask_mod = flex.mask_mod(pcc.parse(args.pattern), m, "cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            create_block_mask(mask_mod, None, None, m, m, device="cuda", _compile=False)
            torch.cuda.synchronize()
            print(f"flex create_block_mask (uncompiled) n={m}: {time.perf_counter() - t0:.2f} s, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        except torch.OutOfMemoryError as err:
            print(f"flex create_block_mask (uncompiled) n={m}: out of memory ({str(err).splitlines()[0][:90]})")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
