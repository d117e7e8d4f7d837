"""Where a planned call spends its time, launch by launch (one GPU).

    python bench/profile_plan.py [--pattern "strided(128)"] [--seq-len 16384 65536]

For each length: the whole planned call (forward, forward+backward; GPU
medians from do_bench), the host's time to issue one call (CPU wall time per
call with the GPU never waited on: if it is near the GPU time, the call is
host-bound), and each component's kernels alone (forward, without the
merge a planned call does in its epilogue; dK/dV; dQ), so the gap between
the measured time and the floor (FLOPs and bytes, PERFORMANCE.md) can be
assigned to a launch.
"""

from __future__ import annotations

import argparse
import time

import torch
from triton.testing import do_bench

import patterncc as pcc


def profile(pattern: str, n: int, heads: int, head_dim: int) -> list[str]:
    attn = pcc.compile(pattern, backend="triton")
    shape = (1, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    attn(q, k, v).backward(do)  # compile and build everything
    impl = attn.impl("triton")
    plan = impl.plan(n, heads)
    lines = [f"### {pattern}, n = {n}, H = {heads}, D = {head_dim}", "", "```", plan.describe(), "```", ""]

    def call():
        return attn(q, k, v)

    def call_fb():
        attn(q, k, v).backward(do)

    lines += ["| what | ms |", "|---|---|",
              f"| planned call, forward (GPU) | {do_bench(call, return_mode='median'):.3f} |",
              f"| planned call, forward+backward (GPU) | "
              f"{do_bench(call_fb, grad_to_none=[q, k, v], return_mode='median'):.3f} |"]
    for label, fn, reps in (("forward", call, 200), ("forward+backward", call_fb, 50)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t0) / reps * 1e3
        torch.cuda.synchronize()
        lines.append(f"| host time to issue one call, {label} | {host:.3f} |")
    if plan.strategy != "planned":
        return lines + [""]
    scale = head_dim ** -0.5
    with torch.no_grad():
        qd, kd, vd = (x.detach() for x in (q, k, v))
        runs = impl._runs(plan, q.device)
        for i, (run, (launch, order)) in enumerate(zip(runs, impl.launches(runs, qd, kd))):
            o, lse = launch.forward(qd, kd, vd, scale, order)
            delta = torch.randn_like(lse)
            dk, dv, dq = (torch.empty_like(x) for x in (kd, vd, qd))
            t_f = do_bench(lambda: launch.forward(qd, kd, vd, scale, order), return_mode="median")
            t_kv = do_bench(lambda: launch.dkdv(qd, kd, vd, lse, do, delta, scale, order, dk, dv),
                            return_mode="median")
            t_q = do_bench(lambda: launch.dq(qd, kd, vd, lse, do, delta, scale, order, dq), return_mode="median")
            lines.append(f"| component {i} ({run.component.q_order.kind} x {run.component.k_order.kind}, "
                         f"{run.component.layout.nnz} blocks): forward / dK,dV / dQ | "
                         f"{t_f:.3f} / {t_kv:.3f} / {t_q:.3f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", nargs="+", default=["strided(128)"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    for pattern in args.pattern:
        for n in args.seq_len:
            print("\n".join(profile(pattern, n, args.heads, args.head_dim)), flush=True)


if __name__ == "__main__":
    main()
