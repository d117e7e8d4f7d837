"""The demo's GPU section, run where CI can: on the CPU, kernels interpreted.

On a GPU ``patterncc demo`` runs ``kernel_checks("cuda", do_bench)`` at
n = 16384; here the same function runs on small CPU tensors under
TRITON_INTERPRET=1 with a timer that calls once, so everything but the
device and the clock is the code the GPU runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from patterncc import demo  # noqa: E402


def test_kernel_checks_run_and_agree_with_the_reference():
    calls = []

    def timer(fn):
        calls.append(fn())
        return 1.0

    rows = demo.kernel_checks("cpu", timer, n=1100, heads=2, head_dim=16, prefix=1100)  # past every window
    assert [src for src, *_ in rows] == ["causal", "sliding_window(1024)", "fixed(128, 32)", "strided(128)"]
    for src, err, ms, sdpa in rows:
        assert 0.0 < err < 2e-2, (src, err)  # bf16 output against the float64 reference
        assert ms == sdpa == 1.0
    assert len(calls) == 8 and all(tuple(o.shape) == (1, 2, 1100, 16) for o in calls)
