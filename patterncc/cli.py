"""The ``patterncc`` command (also ``python -m patterncc``).

    patterncc check FILE...                      parse and check; located errors, exit 1
    patterncc show FILE|EXPR --seq-len N         text picture of the block layout (+ --png)
    patterncc layout FILE|EXPR --out F.npz|.json the layout arrays
    patterncc compile FILE|EXPR --emit triton    the generated kernel source
    patterncc explain FILE|EXPR                  the execution plan and why
    patterncc bench FILE|EXPR                    GPU timings against FlexAttention and SDPA
    patterncc test FILE...                       property-test patterns on every backend
    patterncc warmup                             compile ahead the kernels new patterns start on (GPU)
    patterncc demo                               the main job on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import PatternError
from .planner import DEFAULT_BLOCK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except PatternError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `patterncc show ... | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as err:  # a file that is missing, unreadable or unwritable
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


# -- argument types: argparse turns their ValueError into a usage message, exit 2


def positive_int(text: str) -> int:
    """An integer >= 1 (the sizes, counts and lengths the commands take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def head_dim(text: str) -> int:
    from .backends.triton.config import MAX_HEAD_DIM

    value = positive_int(text)
    if value > MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(f"expected a head dim in 1..{MAX_HEAD_DIM}, got {value}")
    return value


def kernel_block(text: str) -> int:
    from .backends.triton.config import MIN_TILE

    value = positive_int(text)
    if value < MIN_TILE or value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two >= {MIN_TILE}, got {value}")
    return value


# -- argument parsing -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="patterncc", description="A compiler for sparse attention patterns.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="parse and check .pat files or pattern expressions")
    p.add_argument("files", nargs="+", metavar="FILE|EXPR")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("show", help="print the block layout of a pattern")
    _pattern_args(p)
    _shape_args(p)
    p.add_argument("--png", metavar="OUT", help="also draw the element mask and the block layout to a PNG")
    p.add_argument("--plan", action="store_true", help="print the execution plan too")
    p.set_defaults(run=cmd_show)

    p = sub.add_parser("layout", help="write the block layout arrays")
    _pattern_args(p)
    _shape_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npz or FILE.json")
    p.set_defaults(run=cmd_layout)

    p = sub.add_parser("compile", help="generate the kernels of a pattern")
    _pattern_args(p)
    p.add_argument("--emit", choices=["triton", "ir"], default="triton")
    p.add_argument("--head-dim", type=head_dim, default=64, help="head dim, 1..256 (default 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--block", type=kernel_block, default=None,
                   help="layout block, a power of two >= 16 (default: the tile table's, 64)")
    p.add_argument("--seq-len", "-n", type=positive_int, default=None,
                   help="length to specialize for (patterns whose arguments use n)")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("explain", help="explain the execution plan")
    _pattern_args(p)
    _shape_args(p)
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("bench", help="time patterncc against FlexAttention and SDPA on a GPU")
    _pattern_args(p)
    p.add_argument("--seq-len", type=positive_int, nargs="+", default=[4096, 16384],
                   help="sequence lengths (default 4096 16384)")
    p.add_argument("--heads", type=positive_int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=head_dim, nargs="+", default=[64], help="head dims (default 64)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="time every contender this many times, back to back, and keep the medians (default 3)")
    p.add_argument("--out", metavar="FILE.md", help="append the markdown table to FILE")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("warmup", help="compile the kernels every new pattern's first calls run, ahead, on this GPU")
    p.add_argument("--head-dim", type=head_dim, nargs="+", default=[64, 128], help="head dims (default 64 128)")
    p.add_argument("--dtype", nargs="+", choices=["bfloat16", "float16", "float32"], default=["bfloat16"],
                   help="dtypes (default bfloat16)")
    p.add_argument("--heads", type=positive_int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=positive_int, nargs="+", default=None,
                   help="key/value head counts, each dividing --heads (default: --heads, and a quarter of it)")
    p.add_argument("--terms", nargs="+", choices=["none", "softcap", "alibi", "sinks", "rel_bias"], default=["none"],
                   help="score terms, each warmed alone (default none)")
    p.set_defaults(run=cmd_warmup)

    p = sub.add_parser("test", help="property-test the patterns in .pat files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--examples", type=positive_int, default=30,
                   help="hypothesis examples per pattern and backend (default 30)")
    p.add_argument("--backend", action="append", choices=["reference", "triton"],
                   help="restrict to this backend (repeat for several); one that cannot run here fails the run")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (to reproduce a failure)")
    p.set_defaults(run=cmd_test)

    p = sub.add_parser("demo", help="the main job: compile the standard patterns, check, draw")
    p.add_argument("--out", default="out", help="folder for pictures (default: out/)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="length for the attention check (default 200)")
    p.set_defaults(run=cmd_demo)
    return ap


def _pattern_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", metavar="FILE|EXPR", help="a .pat file or a pattern expression")
    p.add_argument("-D", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter default of the file's pattern")


def _shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", "-n", type=positive_int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--block", "-b", type=positive_int, default=None,
                   help=f"block size (default {DEFAULT_BLOCK}, the block a compiled attention uses)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="head count (default: what a heads { .. } block covers, else 1)")


def load_pattern(text: str, params: list[str]):
    """FILE|EXPR by ``patterncc.as_pattern``'s rule (a one-line argument ending in
    ``.pat`` names a file, anything else is source), with ``-D`` overrides."""
    from . import pipeline

    overrides = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise PatternError(f"-D expects NAME=VALUE, got {item!r}")
        try:
            overrides[name.strip()] = int(value)
        except ValueError:
            raise PatternError(f"-D {name.strip()}: {value!r} is not an integer") from None
    return pipeline.as_pattern(text, filename="<command line>", **overrides)


def heads_for(args, pat) -> int:
    """--heads, or the count a ``heads { .. }`` block covers, or 1."""
    from . import ir

    return args.heads or ir.natural_heads(pat) or 1


# -- commands ---------------------------------------------------------------------


def cmd_check(args) -> int:
    failed = 0
    for name in args.files:
        try:
            pat = load_pattern(name, [])
        except PatternError as err:
            print(str(err), file=sys.stderr)
            failed += 1
        except OSError as err:
            print(f"{name}: cannot read: {err.strerror or err}", file=sys.stderr)
            failed += 1
        else:
            print(f"{name}: ok: {pat}")
    return 1 if failed else 0


def cmd_show(args) -> int:
    from . import pipeline

    if args.png:
        _check_picture_path(args.png)
    pat = load_pattern(args.pattern, args.param)
    args.heads = heads_for(args, pat)
    t0 = time.perf_counter()
    lay = pipeline.layout(pat, args.seq_len, args.block, args.heads)
    took = time.perf_counter() - t0
    print(f"pattern: {pat}")
    print(lay.describe())
    print(f"layout built in {took * 1e3:.1f} ms")
    if args.plan:
        print()
        print(pipeline.plan(pat, args.seq_len, args.block, args.heads).describe())
    if args.png:
        from .pictures import draw_pattern

        draw_pattern(pat, lay, args.png, heads=args.heads)
        print(f"wrote {args.png}")
    return 0


# The formats every matplotlib installation writes.
PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def _check_picture_path(path: str) -> None:
    """Refuse a picture path before any work: a suffix matplotlib cannot
    write, or no matplotlib at all."""
    if Path(path).suffix.lower() not in PICTURE_SUFFIXES:
        raise PatternError(f"--png {path!r}: the file name must end in {', '.join(PICTURE_SUFFIXES)}")
    from .demo import picture_support

    if not picture_support():
        raise PatternError("--png needs matplotlib, which is not installed (pip install matplotlib)")


def cmd_layout(args) -> int:
    import numpy as np

    from . import pipeline

    out = Path(args.out)
    if out.suffix not in (".npz", ".json"):
        raise PatternError(f"--out must end in .npz or .json, got {args.out!r}")
    pat = load_pattern(args.pattern, args.param)
    lay = pipeline.layout(pat, args.seq_len, args.block, heads_for(args, pat))
    arrays = {name: getattr(lay, name) for name in ("kv_ptr", "kv_idx", "kv_full", "q_ptr", "q_idx", "q_full")}
    meta = {"pattern": str(pat), "seq_len": lay.seq_len, "block": lay.block, "heads": lay.heads, "nnz": lay.nnz}
    if out.suffix == ".npz":
        np.savez_compressed(out, **arrays, dense=lay.to_dense(), meta=json.dumps(meta))
    elif out.suffix == ".json":
        out.write_text(json.dumps({**meta, **{k: v.tolist() for k, v in arrays.items()}}) + "\n")
    print(f"wrote {out} ({lay.nnz} non-empty blocks)")
    return 0


def cmd_compile(args) -> int:
    pat = load_pattern(args.pattern, args.param)
    if args.emit == "ir":
        print(repr(pat))
        return 0
    from . import ir
    from .backends.triton import codegen

    if args.seq_len is None and codegen.needs_length(pat):
        raise PatternError(f"`{pat}` has arguments that depend on n: its kernels are generated per "
                           "sequence length; pass --seq-len N")
    config = codegen.default_config(args.head_dim, args.dtype, args.block)
    bound = ir.bind(pat, args.seq_len) if codegen.needs_length(pat) else pat
    # The source is every pattern's that differs from this one only in integers: say which it is for.
    ints = codegen.pattern_args(bound, shared=codegen.shares_ints(pat))
    print(f"# pattern: {ir.source(bound)}" + (f"\n# its integers a0, a1, ...: {', '.join(map(str, ints))}" if ints else ""))
    print(codegen.generate_source(pat, config, seq_len=args.seq_len))
    return 0


def cmd_explain(args) -> int:
    from . import pipeline

    pat = load_pattern(args.pattern, args.param)
    print(pipeline.plan(pat, args.seq_len, args.block, heads_for(args, pat)).describe())
    return 0


def cmd_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("patterncc bench needs a CUDA GPU; none is available here.", file=sys.stderr)
        return 2
    from .backends.triton import bench

    pat = load_pattern(args.pattern, args.param)
    table = bench.run(pat, seq_lens=args.seq_len, heads=args.heads, kv_heads=args.kv_heads,
                      head_dims=args.head_dim, batch=args.batch, dtype=args.dtype, rounds=args.rounds)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")
    return 0


def cmd_warmup(args) -> int:
    from .backends.triton.warmup import kv_heads_for

    args.kv_heads = args.kv_heads or kv_heads_for(args.heads)
    for hkv in args.kv_heads:
        if args.heads % hkv:
            print(f"patterncc warmup: --kv-heads {hkv} does not divide --heads {args.heads}", file=sys.stderr)
            return 2
    import torch

    if not torch.cuda.is_available():
        print("patterncc warmup: no CUDA GPU here, so nothing to compile (the kernels run interpreted, "
              "or on the reference backend)")
        return 0
    from .backends.triton import warmup

    start = time.perf_counter()
    done = warmup.warm(head_dims=args.head_dim, dtypes=args.dtype, terms=args.terms, heads=args.heads,
                        kv_heads=args.kv_heads)
    print(f"patterncc warmup: the stand-in kernels of {len(done)} kinds of call compiled in "
          f"{time.perf_counter() - start:.1f} s; a new pattern's first calls find them in Triton's cache "
          f"({os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')})")
    return 0


def cmd_test(args) -> int:
    # Without a GPU the generated kernels still run, in Triton's interpreter;
    # it must be chosen before triton is first imported.
    if "triton" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    from .testing import run_files

    return run_files(args.files, examples=args.examples, backends=args.backend, seed=args.seed)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, seq_len=args.seq_len)


if __name__ == "__main__":
    raise SystemExit(main())
