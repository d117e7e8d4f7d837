"""patterncc's Triton kernels against FlexAttention and SDPA flash, on one GPU.

    python bench/bench_triton.py                        # the record's patterns -> markdown table
    python bench/bench_triton.py --out results.md       # also write the table
    python bench/bench_triton.py --patterns causal --seq-len 4096 --head-dim 64
    python bench/bench_triton.py --expr "causal & local(256)"   # any pattern (needs the parser)
    python bench/bench_triton.py --cold-start           # first call of a new pattern: cold and warm process
    python bench/bench_triton.py --sweep                # tile candidates for config.py's table
    python bench/bench_triton.py --smoke                # fwd+bwd vs the float64 reference (memcheck runs this)
    python bench/bench_triton.py --resources            # registers/spills/shared per kernel (sm_90, no GPU needed)

The performance record's table (bf16, B=1, H=16, D=64 and 128, n=16384 and
65536): causal, sliding_window(1024), local_global(512,64) and
fixed(128,32), with FlexAttention on the same sparsity and dense SDPA
(flash) beside them; ``bench/gpu_check.sh bench`` runs it. Columns are
described in ``patterncc.backends.triton.bench``; the tile sweeps, resource
probes and first-call timings are in ``bench/probes.py``.
"""

from __future__ import annotations

import argparse
import sys
import time


def _patterns(args):
    from probes import PATTERNS

    chosen = {name: PATTERNS[name] for name in args.patterns}
    for text in args.expr:
        import patterncc

        chosen[text] = patterncc.parse(text)
    return chosen


def smoke(n: int = 1000, heads: int = 2, head_dim: int = 64, dtypes=("bfloat16", "float32")) -> int:
    """Forward and backward of a few patterns (random blocks, a head-dependent
    one, a `where`) at a length that is no multiple of the block, against the
    float64 reference. Returns the number of failures."""
    import torch

    import patterncc as pcc
    from patterncc import ir
    from patterncc.backends.reference import ReferenceAttention
    from patterncc.backends.triton import TritonAttention

    C = ir.Causal()
    cases = {
        "causal": C,
        "sliding_window(200)": C & ir.Local(200),
        "bigbird(64,16,2,128,0)": ir.Local(64) | ir.Global(16) | ir.Random(2, 128, 0),
        "cycle(fixed(128,32), strided(128))": ir.Cycle((C & (ir.Block(128) | ir.Summary(128, 32)),
                                                        C & (ir.Local(128) | ir.Stride(128)))),
        "where (q - k) % 7 == 0 or k < 5": ir.Where(ir.BoolOp("or", (
            ir.Compare("==", ir.BinOp("%", ir.BinOp("-", ir.Var("q"), ir.Var("k")), ir.Const(7)), ir.Const(0)),
            ir.Compare("<", ir.Var("k"), ir.Const(5))))),
    }
    # Planned runs: components in residue / gathered-column order, folded
    # into the kernels' addressing, merged by log-sum-exp.
    planned = {"strided(128) planned": C & (ir.Local(128) | ir.Stride(128)),
               "fixed(128,32) planned": C & (ir.Block(128) | ir.Summary(128, 32))}
    failures = 0
    for name, pattern in {**cases, **planned}.items():
        for dtype, tol in ((torch.bfloat16, 0.08), (torch.float32, 2e-3)):
            if str(dtype).removeprefix("torch.") not in dtypes:
                continue
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype, generator=g)
                           for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            if name in planned:
                attn = pcc.compile(pattern, backend="triton", plan="planned")
            else:
                attn = TritonAttention(pattern)
            o, lse = attn(q, k, v, return_lse=True)
            o.backward(do)
            q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
            o64, lse64 = ReferenceAttention(pattern)(q64, k64, v64, return_lse=True)
            o64.backward(do.double().cpu())
            errors = {}
            for label, got, want in (("o", o, o64), ("lse", lse, lse64), ("dq", q.grad, q64.grad),
                                     ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
                got, want = got.detach().double().cpu(), want.detach()
                finite = torch.isfinite(want)
                same_inf = torch.equal(torch.isfinite(got), finite)
                errors[label] = (got[finite] - want[finite]).abs().max().item() if same_inf else float("inf")
            ok = all(e <= tol * (1 if label in ("o", "lse") else 4) for label, e in errors.items())
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:40s} {str(dtype):15s} n={n} "
                  + " ".join(f"{k}={e:.2g}" for k, e in errors.items()), flush=True)
    return failures


def main(argv=None) -> int:
    from probes import PATTERNS, tile_spec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="*", default=["causal", "sliding_window(1024)", "local_global(512,64)",
                                                      "fixed(128,32)"], choices=sorted(PATTERNS))
    ap.add_argument("--expr", action="append", default=[], help="a pattern expression (parsed by patterncc)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rep", type=int, default=100, help="do_bench's rep (ms) per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="time every contender this many times, back to back, and keep the medians (default 3)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--lean", action="store_true", help="leave out the diagnostic pcc@128 and flex(layout) timings")
    ap.add_argument("--out", help="write the markdown table to this file too")
    ap.add_argument("--cold-start", action="store_true", help="time first calls in fresh processes instead")
    ap.add_argument("--sweep", action="store_true", help="time tile candidates instead")
    ap.add_argument("--fwd-candidates", nargs="*", type=tile_spec, default=None, metavar="MxN:W:S",
                    help="the sweep's forward candidates (default probes.FWD_CANDIDATES; the option with no values: no forward)")
    ap.add_argument("--bwd-candidates", nargs="*", type=tile_spec, default=None, metavar="M1xN1/M2xN2:W:S",
                    help="the sweep's backward candidates (default probes.BWD_CANDIDATES; the option with no values: no backward)")
    ap.add_argument("--smoke", action="store_true", help="check fwd+bwd against the reference instead")
    ap.add_argument("--resources", action="store_true",
                    help="compile for sm_90 without a GPU: registers, spills, shared memory of the default table")
    ap.add_argument("--smoke-n", type=int, default=1000)
    ap.add_argument("--smoke-dtypes", nargs="+", default=["bfloat16", "float32"])
    args = ap.parse_args(argv)

    import torch

    if args.resources:
        import probes

        print(probes.resources(head_dims=tuple(args.head_dim) if args.head_dim != [64, 128] else (64, 128, 256),
                              dtypes=("bfloat16", "float32") if args.dtype == "bfloat16" else (args.dtype,)))
        return 0
    if not torch.cuda.is_available():
        print("bench_triton needs a CUDA GPU; none is available here.", file=sys.stderr)
        return 2
    import probes
    from patterncc.backends.triton import bench

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    if args.smoke:
        return 1 if smoke(n=args.smoke_n, dtypes=args.smoke_dtypes) else 0
    out = []
    if args.cold_start:
        for who in ("pcc", "flex"):
            result = probes.cold_start(who=who)
            out.append(f"- first forward+backward of a new pattern, {who}: cold process {result['cold']}, "
                       f"warm process (disk caches) {result['warm']} (seconds)")
            print(out[-1], flush=True)
    elif args.sweep:
        for D in args.head_dim:
            for name, pattern in _patterns(args).items():
                lists = {}
                if args.fwd_candidates is not None:
                    lists["fwd"] = args.fwd_candidates
                if args.bwd_candidates is not None:
                    lists["bwd"] = args.bwd_candidates
                out.append(probes.sweep(pattern, n=args.seq_len[0], heads=args.heads, head_dim=D, dtype=args.dtype,
                                        **lists))
                print(out[-1], flush=True)
    else:
        rows = []
        for D in args.head_dim:
            for n in args.seq_len:
                for name, pattern in _patterns(args).items():
                    t0 = time.perf_counter()
                    rows.append(bench.bench_case(pattern, name, n, heads=args.heads, kv_heads=args.kv_heads,
                                                 head_dim=D, batch=args.batch, dtype=args.dtype,
                                                 flex=not args.no_flex, sdpa=not args.no_sdpa, rep=args.rep,
                                                 extras=not args.lean, rounds=args.rounds))
                    print(f"{name} n={n} D={D}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                    print(bench.markdown(rows[-1:]).splitlines()[-1], flush=True)
        out.append(bench.markdown(rows))
        print(out[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
