"""``patterncc demo``: the main job on whatever machine this is.

1. Compile the standard patterns and print their densities and block counts
   at a long length (the layouts are analytic: milliseconds, no n*n work).
2. Run attention on the reference backend at a small size and check it,
   forward and gradients, against an independent dense float64 computation.
   On a GPU, also run the generated Triton kernels, check them against the
   reference and time them against dense SDPA.
3. Draw every pattern like the Sparse Transformer paper's figure 3.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from . import pipeline

STANDARD = {
    "strided(128)": "strided(128)",
    "fixed(128, 32)": "fixed(128, 32)",
    "sliding_window(1024)": "sliding_window(1024)",
    "local_global(512, 64)": "local_global(512, 64)",
    "longformer(512, 64)": "longformer(512, 64)",
    "bigbird(192, 64, 3, 128, 0)": "bigbird(192, 64, 3, 128, 0)",
    "axial(128)": "axial(128)",
    "causal": "causal",
}

# The same patterns with parameters small enough that n = 200 sees every part.
SMALL = ("strided(16)", "fixed(16, 4)", "local_global(24, 8)", "bigbird(12, 4, 2, 16, 0)")

TABLE_LEN = 65536
BLOCK = 128


class Progress:
    """A one-line progress display on stderr for work that takes more than a second."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, what: str = "") -> None:
        self.done += 1
        if time.perf_counter() - self.start < 1.0 and self.done < self.total:
            return
        line = f"{self.label} [{self.done}/{self.total}] {what}"
        print(("\r" + line.ljust(78)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and time.perf_counter() - self.start >= 1.0:
            print(file=sys.stderr)


def picture_support() -> bool:
    """Whether matplotlib is importable (pictures are optional: the plot extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out_dir: str = "out", seq_len: int | None = None) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patterns = {name: pipeline.parse(src) for name, src in STANDARD.items()}

    print(f"1. Block layouts and plans at n = {TABLE_LEN}, block = {BLOCK}")
    print("| pattern | element density | block density | partial | full | natural blocks / causal "
          "| planned blocks / causal | layout ms |")
    print("|---|---|---|---|---|---|---|---|")
    causal_nnz = None
    rows = []
    progress = Progress(len(patterns), "layouts")
    for name, pat in patterns.items():
        t0 = time.perf_counter()
        lay = pipeline.layout(pat, TABLE_LEN, BLOCK)
        ms = (time.perf_counter() - t0) * 1e3
        full = int(lay.kv_full.sum())
        plan = pipeline.plan(pat, TABLE_LEN, BLOCK)
        rows.append((name, _element_density(lay), lay.density, lay.nnz - full, full, lay.nnz, plan, ms))
        if name == "causal":
            causal_nnz = lay.nnz
        progress.step(name)
    progress.close()
    for name, elem, dens, partial, full, nnz, plan, ms in rows:
        planned = f"{plan.computed_blocks / causal_nnz:.3f} ({plan.strategy})"
        print(f"| {name} | {elem:.4f} | {dens:.4f} | {partial} | {full} | {nnz / causal_nnz:.3f} | {planned} | {ms:.1f} |")

    n = seq_len or 200
    print(f"\n2. Attention on the reference backend, n = {n}, B = 2, H = 4, Hkv = 2, D = 32, float64")
    worst = 0.0
    for src in SMALL:
        pat = pipeline.parse(src)
        err = _check_reference(pat, n)
        worst = max(worst, err)
        print(f"  {str(pat):60s} max |ref - independent| = {err:.2e}")
    ok = worst < 1e-10
    print("  reference backend agrees with the independent computation" if ok else "  MISMATCH")

    _gpu_section()

    if not picture_support():
        print("\n3. Pictures: skipped, matplotlib is not installed (pip install matplotlib)")
        return 0 if ok else 1
    print(f"\n3. Pictures in {out}/")
    progress = Progress(len(patterns), "pictures")
    from .pictures import draw_pattern

    for name, pat in patterns.items():
        small = pipeline.layout(pat, 4096, BLOCK)
        path = out / (name.split("(")[0] + ".png")
        draw_pattern(pat, small, str(path), title=name)
        progress.step(str(path))
    progress.close()
    for name in patterns:
        print(f"  {out / (name.split('(')[0] + '.png')}")
    return 0 if ok else 1


def _element_density(lay) -> float:
    """Allowed (q, k) pairs over n * n, from the layout (no n*n work)."""
    if hasattr(lay, "element_density"):
        value = lay.element_density
        return value() if callable(value) else value
    return float("nan")


def _check_reference(pat, n: int) -> float:
    """Reference forward and backward against a dense float64 torch computation."""
    import torch

    rng = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 2, 4, 2, 32
    q = torch.randn(B, H, n, D, dtype=torch.float64, generator=rng, requires_grad=True)
    k = torch.randn(B, Hkv, n, D, dtype=torch.float64, generator=rng, requires_grad=True)
    v = torch.randn(B, Hkv, n, D, dtype=torch.float64, generator=rng, requires_grad=True)
    do = torch.randn(B, H, n, D, dtype=torch.float64, generator=rng)

    o = pipeline.compile(pat, backend="reference")(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do)

    allowed = torch.from_numpy(pipeline.mask(pat, n, H))
    kk, vv = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    scores = (q @ kk.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o_ref = probs @ vv
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    errs = [(o - o_ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, grads_ref)]
    return float(np.max(errs))


def _gpu_section() -> None:
    import torch

    if not torch.cuda.is_available():
        print("\n   (no CUDA GPU here: the Triton kernels run in `pytest` under TRITON_INTERPRET=1;"
              " on a GPU this demo also checks and times them)")
        return
    import triton.testing

    print("\n   Triton kernels on", torch.cuda.get_device_name())
    for src, err, ms, sdpa in kernel_checks("cuda", lambda fn: triton.testing.do_bench(fn, return_mode="median")):
        print(f"   {src:24s} rel. error {err:.1e}   {ms:7.3f} ms   dense causal SDPA {sdpa:7.3f} ms   ({sdpa / ms:.2f}x)")


def kernel_checks(device, timer, n: int = 16384, heads: int = 16, head_dim: int = 64, prefix: int = 1024):
    """``(pattern, relative error, ms, dense causal SDPA ms)`` for each pattern
    the GPU section shows: the Triton kernels' bf16 forward on ``[1, heads, n,
    head_dim]`` inputs, checked against the reference backend on the first
    ``prefix`` queries of two heads, and ``timer(fn)`` (milliseconds) of it
    and of SDPA."""
    import torch

    out = []
    for src in ("causal", "sliding_window(1024)", "fixed(128, 32)", "strided(128)"):
        pat = pipeline.parse(src)
        attn = pipeline.compile(pat, backend="triton")
        q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        o = attn(q, k, v)
        # Every one of these patterns is causal: the first `prefix` queries see
        # only the first `prefix` keys, so the reference on that prefix checks the long run.
        small = [t[:, :2, :prefix].double().cpu() for t in (q, k, v)]
        ref = pipeline.compile(pat, backend="reference")(*small)
        err = ((o[:, :2, :prefix].double().cpu() - ref).norm() / ref.norm()).item()
        ms = timer(lambda: attn(q, k, v))
        sdpa = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        out.append((src, err, ms, sdpa))
    return out
