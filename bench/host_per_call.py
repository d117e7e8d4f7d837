"""The host's time per call: what an eager call costs the CPU, with the GPU kept busy.

    python bench/host_per_call.py

At short lengths a call's GPU work is smaller than the host's work to issue
it, so an eager call's wall time is the host's. For three patterns at
lengths where that happens (bf16, H = 16, D = 64), the host's milliseconds
per call (median of 5 rounds of 100 calls, each round queued behind a
``torch.cuda._sleep`` kernel, so that no call waits on the device):

- the forward with inputs that require grad, and without;
- forward+backward (``.backward(do)``), with the gradients left to
  accumulate and reset to None before each call, and with the autograd
  engine on the calling thread (``set_multithreading_enabled(False)``);
- the backward alone (``torch.autograd.grad`` on a kept graph);
- for scale: ten ``torch.empty`` of q's shape, and one in-place add (the
  cost of one PyTorch kernel launch).
"""

import statistics
import sys
import time

import torch

import patterncc as pcc
from patterncc.backends.triton import TritonAttention


def host_ms(fn, reps=100, rounds=5):
    fn()
    pcc.wait_for_kernels()  # a first call may run the stand-in kernels: time the pattern's own
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        torch.cuda._sleep(int(1e9))
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps * 1e3)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> int:
    torch.manual_seed(0)
    for pat, n in (("strided(128)", 16384), ("causal", 4096), ("sliding_window(1024)", 4096)):
        # causal through our kernel, as the limits' rate (pcc.compile may hand it to SDPA)
        attn = TritonAttention(pcc.parse(pat)) if pat == "causal" else pcc.compile(pat)
        q, k, v, do = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for x in (q, k, v):
            x.requires_grad_()
        qd, kd, vd = (x.detach() for x in (q, k, v))
        rows = {}
        rows["fwd, grad"] = host_ms(lambda: attn(q, k, v))
        rows["fwd, no grad"] = host_ms(lambda: attn(qd, kd, vd))
        rows["f+b"] = host_ms(lambda: attn(q, k, v).backward(do))

        def fb_grads():
            for x in (q, k, v):
                x.grad = None
            attn(q, k, v).backward(do)

        rows["f+b, grads reset"] = host_ms(fb_grads)
        torch.autograd.set_multithreading_enabled(False)
        rows["f+b, autograd one thread"] = host_ms(fb_grads)
        torch.autograd.set_multithreading_enabled(True)
        o = attn(q, k, v)
        rows["torch.autograd.grad only (retain)"] = host_ms(
            lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        rows["10 x torch.empty"] = host_ms(lambda: [torch.empty(1, 16, n, 64, device="cuda") for _ in range(10)])
        x = torch.randn(1, 16, n, 64, device="cuda")
        rows["1 x add_ (torch launch)"] = host_ms(lambda: x.add_(1.0))
        print(f"## {pat}, n = {n}")
        for name, ms in rows.items():
            print(f"  {name}: {ms:.3f} ms")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
