"""Our dense causal kernel beside SDPA's cuDNN and flash backends, and
whether a change to the kernels pays. Each variant rewrites the kernel
templates' text (``codegen._KERNEL_TEMPLATES``; the ``rel-warps`` ones a
method of ``launch._KernelTerms``) and is timed in its own
process, with its own module cache, beside the two SDPA backends in that
process, on the same inputs; or runs another bench script on the rewritten
kernels (``--script``), for a before-and-after in one run.

    python bench/hopper_probe.py --variants base --seq-lens 16384 65536 --head-dims 64 128
    python bench/hopper_probe.py --variants alibi-abs --script bench/bench_scores.py --terms none alibi

Variants:

- ``base``: the kernels as they are;
- ``ws``: the forward's key loop asks Triton for automatic warp
  specialization (``tl.range(..., warp_specialize=True)``), which splits the
  loads, the matrix products and the softmax into partitions of warps that
  run side by side;
- ``ws-bwd``: the same on the backward's two loops (dK/dV and dQ);
- ``alibi-abs``: ALiBi's bias as ``-slope |q - k|`` per score everywhere,
  as before the kernels split it for patterns inside causal
  (``ALIBI_SPLIT``);
- ``no-steps``: every kernel's step loop runs no step (wrong results,
  timed only): what a launch costs besides its blocks (its grid, loading
  its tile, the epilogue's writes and merge), the floor that the blocks'
  work comes on top of;
- ``no-exp2``: the forward's unmasked steps without their ``exp2`` (wrong
  results, timed only): how much of the dense forward the special-function
  unit holds;
- ``no-predicate``: the forward's PARTIAL steps allow every pair inside the
  bounds (wrong results, timed only): what evaluating the pattern costs;
- ``no-gather``: every step reads its rows as if in natural order (wrong
  results, timed only): what a planned order's per-row addresses cost;
- ``rel-warps``: a relative bias's forward keeps the table's warps instead
  of taking at least 8 (``launch._KernelTerms.fwd_warps``);
- ``rel-one-loop``: a relative bias's forward walks a run as one loop, not
  as its far steps and its near ones (``_near_steps``);
- ``rel-warps-one-loop``: both;
- ``rel-no-gather``: a relative bias adds its far tail's scalar where it
  would gather the table (wrong results, timed only): what the gather costs.

Triton refuses both for sm_90 (3.9, compiling without a GPU: ``python
bench/bench_triton.py --resources`` after ``_patched``; 3.6 on the H200
gave the same for the forward at D = 64 with descriptor loads): its warp
specialization on Hopper partitions only loops whose loads are
tensor-descriptor loads ("unsupported load type for producer commit"),
and with K and V read through descriptors it still refused the D = 64
forward and left the D = 128 one as it was. Reading keys and values
through descriptors was measured and did not pay (PERFORMANCE.md, "Dense
attention and SDPA's backends"); the commit that measured it keeps the
``tma`` variants.

A variant that fails to compile prints its error and the others go on. The
output of every variant is checked against SDPA before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile

_LOOP = "for i in tl.range(lo, hi, num_stages=NUM_STAGES):"
_WS_LOOP = "for i in tl.range(lo, hi, num_stages=NUM_STAGES, warp_specialize=True):"
_NO_STEPS = "for i in tl.range(lo, lo, num_stages=NUM_STAGES):"
_EXP2 = "p = tl.math.exp2(qk * qk_scale - m_sub[:, None])"
_SPLIT = "ALIBI_SPLIT: tl.constexpr = ALIBI and PAST_ONLY and NATURAL"
_SPLIT_OFF = "ALIBI_SPLIT: tl.constexpr = False"
_REL_ONE_LOOP = ("if RUN and REL_BIAS and NATURAL:\n        na, nb = _near_steps(lo, hi, q_lo, q_hi, rel_m, BLOCK_N)",
                 "if False:\n        na, nb = _near_steps(lo, hi, q_lo, q_hi, rel_m, BLOCK_N)")
_REL_WARPS = ("return cfg.fwd_warps if self.rel is None else max(cfg.fwd_warps, 8)", "return cfg.fwd_warps")
VARIANTS = {
    "base": {},
    "ws": {"kernels.py": [(_LOOP, _WS_LOOP)]},
    "ws-bwd": {"kernels_backward.py": [(_LOOP, _WS_LOOP)]},
    "alibi-abs": {name: [(_SPLIT, _SPLIT_OFF)] for name in ("kernels.py", "kernels_backward.py")},
    "no-steps": {name: [(_LOOP, _NO_STEPS)] for name in ("kernels.py", "kernels_backward.py")},
    "no-exp2": {"kernels.py": [(_EXP2, "p = qk * qk_scale - m_sub[:, None]")]},
    "no-predicate": {"kernels.py": [("allowed = pattern_mask(q_pos[:, None], k_pos[None, :], off_h, N, RANDOM)",
                                     "allowed = (q_pos[:, None] >= 0) & (k_pos[None, :] >= 0)")]},
    "no-gather": {"kernels.py": [("tok = _token(pos, ORDER, ORD_L, ORD_S, ORD_C)", "tok = pos")]},
    "rel-warps": {"launch": [_REL_WARPS]},
    "rel-one-loop": {"kernels.py": [_REL_ONE_LOOP]},
    "rel-warps-one-loop": {"launch": [_REL_WARPS], "kernels.py": [_REL_ONE_LOOP]},
    "rel-no-gather": {"kernels.py": [("s = s + _rel_gather(REL_h, q_at, k_at, rel_m, NATURAL)", "s = s + rel_lo")]},
}


def _patched(variant: str) -> None:
    """Rewrite the kernel templates for ``variant`` (in this process only);
    "launch": a method of ``launch._KernelTerms`` rewritten the same way."""
    import inspect
    import textwrap

    from patterncc.backends.triton import codegen, launch

    for name, swaps in VARIANTS[variant].items():
        if name == "launch":
            for old, new in swaps:
                method = next(m for m in vars(launch._KernelTerms).values()
                              if callable(m) and old in inspect.getsource(m))
                source = textwrap.dedent(inspect.getsource(method)).replace(old, new)
                scope = dict(vars(launch))
                exec(source, scope)
                setattr(launch._KernelTerms, method.__name__, scope[method.__name__])
            continue
        text = codegen._KERNEL_TEMPLATES[name]
        for old, new in swaps:
            assert old in text, f"{variant}: {old!r} is not in {name}"
            text = text.replace(old, new)
        codegen._KERNEL_TEMPLATES[name] = text


def child(variant: str, n: int, head_dim: int, heads: int, rep: int) -> dict:
    """One variant at one shape: causal, bf16, B = 1; forward and
    forward+backward medians in ms, with SDPA's cuDNN and flash backends."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from patterncc import ir
    from patterncc.backends.triton import TritonAttention
    from patterncc.backends.triton.bench import _bench

    _patched(variant)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    attn = TritonAttention(ir.Causal())
    out = {"variant": variant, "n": n, "D": head_dim}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        want = sdpa(q, k, v, is_causal=True)
    got = attn(q, k, v)
    out["max_diff"] = (got.float() - want.float()).abs().max().item()
    contenders = {"pcc": lambda: attn(q, k, v)}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def fwd(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True)
        contenders[name] = fwd
    for name, fwd in contenders.items():
        out[f"{name} fwd"] = _bench(fwd, rep=rep)
        out[f"{name} f+b"] = _bench(lambda: fwd().backward(do), grad_to_none=[q, k, v], rep=rep)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[16384])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--script", nargs=argparse.REMAINDER, metavar="SCRIPT ARGS",
                    help="last: run this bench script with the arguments after it on the one variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.script:
        if len(args.variants) != 1:
            ap.error("--script runs on one variant")
        _patched(args.variants[0])
        os.environ["PATTERNCC_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"pcc-{args.variants[0]}-")
        sys.argv = list(args.script)
        runpy.run_path(args.script[0], run_name="__main__")
        return 0
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(**spec)), flush=True)
        return 0
    rows = []
    for variant in args.variants:
        cache = tempfile.mkdtemp(prefix=f"pcc-{variant}-")
        for head_dim in args.head_dims:
            for n in args.seq_lens:
                spec = dict(variant=variant, n=n, head_dim=head_dim, heads=args.heads, rep=args.rep)
                env = dict(os.environ, PATTERNCC_CACHE_DIR=cache)
                run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                     capture_output=True, text=True)
                if run.returncode:
                    print(f"{variant} n={n} D={head_dim}: failed\n{run.stderr[-3000:]}", flush=True)
                    continue
                rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | n | D | max diff | pcc fwd | cuDNN fwd | flash fwd | pcc f+b | cuDNN f+b | flash f+b "
          "| cuDNN/pcc fwd, f+b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['n']} | {r['D']} | {r['max_diff']:.3g} | {r['pcc fwd']:.3f} | "
              f"{r['cudnn fwd']:.3f} | {r['flash fwd']:.3f} | {r['pcc f+b']:.3f} | {r['cudnn f+b']:.3f} | "
              f"{r['flash f+b']:.3f} | {r['cudnn fwd'] / r['pcc fwd']:.2f}, {r['cudnn f+b'] / r['pcc f+b']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
