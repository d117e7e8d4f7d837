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
import cProfile
import io
import pstats
import time

import torch
from triton.testing import do_bench

import patterncc as pcc
from patterncc.backends.triton.launch import aligned_rows, with_aligned_rows


def profile(pattern: str, n: int, heads: int, head_dim: int) -> list[str]:
    attn = pcc.compile(pattern, backend="triton")
    shape = (1, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    attn(q, k, v).backward(do)  # compile and build everything
    pcc.wait_for_kernels()  # (that call may have run the stand-in kernels while they compiled)
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
            lse = with_aligned_rows(lse)  # as a backward pass takes them (rows a multiple of 16 apart)
            delta = aligned_rows(*lse.shape, lse.device).normal_()
            dk, dv, dq = (torch.empty_like(x) for x in (kd, vd, qd))
            t_f = do_bench(lambda: launch.forward(qd, kd, vd, scale, order), return_mode="median")
            t_kv = do_bench(lambda: launch.dkdv(qd, kd, vd, lse, do, delta, scale, order, dk, dv),
                            return_mode="median")
            t_q = do_bench(lambda: launch.dq(qd, kd, vd, lse, do, delta, scale, order, dq), return_mode="median")
            lines.append(f"| component {i} ({run.component.q_order.kind} x {run.component.k_order.kind}, "
                         f"{run.component.layout.nnz} blocks): forward / dK,dV / dQ | "
                         f"{t_f:.3f} / {t_kv:.3f} / {t_q:.3f} |")
    return lines + [""]


def _host_us(fn, reps: int = 300) -> float:
    """Host microseconds per call of ``fn`` while the GPU is kept busy (a
    sleep kernel queued first), so no call waits on the device."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: the queue never drains
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return us


class _Identity(torch.autograd.Function):
    """The cheapest autograd Function of the same shape as the attention's:
    what autograd itself costs per call."""

    @staticmethod
    def forward(ctx, q, k, v, scale, launches):
        o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device)
        ctx.save_for_backward(q, k, v, o, lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return None, None, None, None, None


def host_split(pattern: str, n: int, heads: int, head_dim: int) -> list[str]:
    """Host cost of a planned forward layer by layer, its time measured as the
    benchmark does and as GPU time alone (a CUDA graph of it), and cProfile's top entries."""
    attn = pcc.compile(pattern, backend="triton")
    shape = (1, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attn(q, k, v)
    impl = attn.impl("triton")
    plan = impl.plan(n, heads)
    scale = head_dim ** -0.5
    qd, kd, vd = (x.detach() for x in (q, k, v))
    runs = impl._runs(plan, q.device)
    launches = impl.launches(runs, qd, kd)
    launch, order = launches[0]
    o, lse = launch.forward(qd, kd, vd, scale, order)
    grad = lambda: attn(q, k, v)  # noqa: E731
    no_grad = lambda: attn(qd, kd, vd)  # noqa: E731
    rows = [("planned forward, inputs requiring grad", grad),
            ("planned forward, no_grad inputs", no_grad),
            ("planned forward, inputs requiring grad (again)", grad),
            ("planned forward, no_grad inputs (again)", no_grad),
            ("one component's kernel launch (outputs given)", lambda: launch.forward(qd, kd, vd, scale, order, o, lse)),
            ("autograd round trip alone, inputs requiring grad", lambda: _Identity.apply(q, k, v, scale, launches)),
            ("autograd round trip alone, no_grad inputs", lambda: _Identity.apply(qd, kd, vd, scale, launches)),
            ("torch.empty of o's shape", lambda: torch.empty(shape, dtype=torch.bfloat16, device="cuda"))]
    lines = [f"### host cost, {pattern}, n = {n} ({len(plan.components)} components)", "",
             "| what | host us per call |", "|---|---|"]
    lines += [f"| {label} | {_host_us(fn):.1f} |" for label, fn in rows]
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            no_grad()
        replay = f"{do_bench(graph.replay, return_mode='median'):.3f}"
    except RuntimeError as err:
        replay = f"capture failed: {str(err).splitlines()[0][:100]}"
    lines += ["", "| planned forward | ms |", "|---|---|",
              f"| do_bench median, inputs requiring grad (as bench_triton.py) | "
              f"{do_bench(grad, return_mode='median'):.3f} |",
              f"| GPU alone: do_bench median of a CUDA graph replay | {replay} |"]
    prof = cProfile.Profile()
    torch.cuda._sleep(int(2e9))
    prof.enable()
    for _ in range(300):
        attn(q, k, v)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    lines += ["", "cProfile of 300 planned forwards (tottime):", "```", text.getvalue().strip(), "```", ""]
    do = torch.randn_like(qd)
    prof = cProfile.Profile()
    attn(q, k, v).backward(do)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    prof.enable()
    for _ in range(100):
        attn(q, k, v).backward(do)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return lines + ["cProfile of 100 planned forward+backward calls (tottime):", "```", text.getvalue().strip(),
                    "```", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", nargs="+", default=["strided(128)"])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--host", action="store_true", help="the host's cost per layer and a cProfile instead")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    for pattern in args.pattern:
        for n in args.seq_len:
            report = host_split if args.host else profile
            print("\n".join(report(pattern, n, args.heads, args.head_dim)), flush=True)


if __name__ == "__main__":
    main()
