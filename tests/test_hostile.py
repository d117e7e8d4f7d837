"""Hostile input: each defect a newcomer found, kept fixed; a CLI fuzz of
random argument vectors to every subcommand; every public entry point just
past each limit, under a memory cap.

The fuzz and the capped runs happen in child processes, so that a cap (or a
runaway) never hits pytest itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import patterncc as pcc
from patterncc import blocklayout, ir, masks
from patterncc.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.fixture
def pat_file(tmp_path) -> Path:
    f = tmp_path / "f.pat"
    f.write_text("pattern p(w = 4) = causal & local(w)\n")
    return f


# -- 1. the testing kit never passes having tested nothing


def test_cli_test_refuses_an_unknown_backend(capsys, pat_file):
    code, out, err = run(capsys, "test", str(pat_file), "--backend", "trition")
    assert code == 2 and "trition" in err and "passed" not in out


def test_cli_test_says_what_it_checked(capsys, pat_file):
    code, out, _ = run(capsys, "test", str(pat_file), "--backend", "reference", "--examples", "2")
    assert code == 0 and "checked: kernel [reference], layout, packed [reference]" in out.splitlines()[-1]


def test_run_files_fails_when_a_named_backend_cannot_run(capsys, pat_file, monkeypatch):
    from patterncc import testing

    monkeypatch.setattr(testing.suite, "available_backends", lambda: {"reference": None, "triton": "no device"})
    assert testing.run_files([str(pat_file)], examples=2, backends=["triton"]) == 1
    assert "0 of 1 patterns passed" in capsys.readouterr().out


# -- 2. limits bound the total work and refuse early


# (The sizes the newcomer tried, and each limit just past, run under a memory
# cap in a child process: see the end of this file.)


def test_heads_share_one_budget(monkeypatch):
    # Each head alone is under the limit; all of them together are not.
    one = blocklayout.estimate_blocks(pcc.parse("causal & (where (q + h) % 3 == 0)"), 4096, 64, 1)
    monkeypatch.setattr(blocklayout, "MAX_CANDIDATES", 3 * one)
    pcc.layout("causal & (where (q + h) % 3 == 0)", seq_len=4096, block=64, heads=3)
    with pytest.raises(pcc.LimitError, match="4 distinct heads"):
        pcc.layout("causal & (where (q + h) % 5 == 0)", seq_len=4096, block=64, heads=5)


def test_sparse_mask_counts_elements_over_all_heads(monkeypatch):
    monkeypatch.setattr(blocklayout, "MAX_SPARSE_ELEMENTS", 3000)
    pcc.sparse_mask("causal & local(8) & (where h == 0 or q > 0)", seq_len=128, heads=2)  # 2 x ~1000
    with pytest.raises(pcc.LimitError, match="allowed elements"):
        pcc.sparse_mask("causal & local(8) & (where h < 5 or q > 0)", seq_len=128, heads=4)


# -- 3. no silent integer overflow


def test_where_that_could_overflow_is_refused_where_it_is_written():
    src = "causal & (where q * 2147483647 * 2147483647 > k)"
    for call in (lambda: pcc.mask(src, seq_len=256), lambda: pcc.layout(src, seq_len=256, block=64),
                 lambda: pcc.compile(src, backend="reference")(*[np.zeros((1, 1, 256, 4))] * 3)):
        with pytest.raises(pcc.LimitError) as err:
            call()
        assert (err.value.line, err.value.column) == (1, 32) and "2**62" in str(err.value)
        assert str(err.value).splitlines()[-2].strip() == "^"


def test_where_bounds_follow_n():
    src = "causal & (where q * q * q % 1000003 < k * 7)"
    n = 1000
    m = pcc.mask(src, seq_len=n)[0]
    exact = np.array([[k <= q and q * q * q % 1000003 < k * 7 for k in range(n)] for q in range(n)])
    assert np.array_equal(m, exact)
    with pytest.raises(pcc.LimitError, match="q \\* q \\* q"):  # q**3 passes 2**62 from n = 1,664,511
        pcc.layout(src, seq_len=1_700_000, block=4096)


def test_values_near_the_bound_are_exact():
    src = "where (q * 1000000000 * 70000000 + k) // 7919 % 5 == k % 5"  # up to 4.41e18 of 2**62 = 4.61e18
    n = 64
    m = pcc.mask(src, seq_len=n)[0]
    exact = np.array([[(q * 7 * 10**16 + k) // 7919 % 5 == k % 5 for k in range(n)] for q in range(n)])
    assert np.array_equal(m, exact) and m.any()


# -- 5. tracebacks become messages


@pytest.mark.parametrize("argv", [
    ["compile", "causal", "--emit", "triton", "--block", "100"],
    ["compile", "causal", "--emit", "triton", "--block", "0"],
    ["compile", "causal", "--emit", "triton", "--head-dim", "0"],
    ["compile", "causal", "--emit", "triton", "--head-dim", "300"],
    ["show", "causal", "--heads", "0"],
    ["show", "causal", "--seq-len", "-1"],
])
def test_bad_sizes_are_usage_errors(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "expected" in err.splitlines()[-1]


def test_cli_test_on_a_binary_file(capsys, tmp_path):
    f = tmp_path / "binary.pat"
    f.write_bytes(bytes(range(256)))
    code, _, err = run(capsys, "test", str(f))
    assert code == 1 and "is not UTF-8 text" in err


def test_cli_test_with_zero_examples(capsys, pat_file):
    code, _, err = run(capsys, "test", str(pat_file), "--examples", "0")
    assert code == 2 and "--examples" in err


def test_show_png_with_a_suffix_matplotlib_cannot_write(capsys, tmp_path):
    code, out, err = run(capsys, "show", "causal", "--png", str(tmp_path / "out.txt"))
    assert code == 1 and ".png" in err and out == ""


def test_show_png_and_demo_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = run(capsys, "show", "causal", "--png", str(tmp_path / "out.png"))
    assert code == 1 and "needs matplotlib" in err and out == ""
    from patterncc import demo

    monkeypatch.setattr(demo, "TABLE_LEN", 1024)
    monkeypatch.setattr(demo, "_gpu_section", lambda: None)
    code, out, err = run(capsys, "demo", "--out", str(tmp_path / "pictures"))
    assert code == 0 and "Pictures: skipped, matplotlib is not installed" in out


def test_a_directory_where_a_cache_entry_should_be(tmp_path, monkeypatch):
    from patterncc.backends.triton import cache

    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_fallback_dir", None)
    monkeypatch.setattr(cache.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    key = cache.cache_key("hostile", time.time())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"k_{key}.py").mkdir()
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        module = cache.load_module(key, lambda: "VALUE = 42\n")
    assert module.VALUE == 42 and Path(module.__file__).parent == tmp_path / "tmp" / f"patterncc-cache-{os.getuid()}"


def test_a_kept_module_is_not_compiled_again_and_bad_bytecode_is_never_run(tmp_path, monkeypatch):
    """A generated module's compiled code is kept beside it and used by the
    next process (no compile); bytecode that is damaged, made from other
    text, or made at another path is ignored and replaced, never run."""
    import hashlib
    import importlib.util
    import marshal

    from patterncc.backends.triton import cache

    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "cache"))
    compiles = []
    monkeypatch.setattr(cache, "compile", lambda *args: compiles.append(1) or compile(*args), raising=False)
    key = cache.cache_key("kept bytecode", time.time())

    def load():
        cache.clear_memory()  # as a new process: nothing in memory, the files are read again
        return cache.load_module(key, lambda: "VALUE = 42\n")

    def kept_for(path, text, value):
        header = importlib.util.MAGIC_NUMBER + hashlib.sha256(f"{path}\0{text}".encode()).digest()
        return header + marshal.dumps(compile(f"VALUE = {value}\n", str(path), "exec"))

    assert load().VALUE == 42 and len(compiles) == 1
    source = tmp_path / "cache" / f"k_{key}.py"
    (kept,) = (tmp_path / "cache").glob(f"k_{key}.*.bin")
    good = kept.read_bytes()
    assert load().VALUE == 42 and len(compiles) == 1  # from the kept code
    text = source.read_text()
    header = len(importlib.util.MAGIC_NUMBER) + 32
    for bad in (good[:-5],                                        # truncated
                good[:header] + b"not marshalled code",           # damaged after its header
                kept_for(source, text + "# edited\n", 666),       # made from other text
                kept_for(tmp_path / "moved" / source.name, text, 666),  # made at another path
                b"not bytecode"):
        kept.write_bytes(bad)
        assert load().VALUE == 42
        assert kept.read_bytes() == good
    assert len(compiles) == 6


def test_an_unwritable_cache_uses_one_directory_for_every_process(tmp_path):
    # cache.py needs only the standard library: load it alone, not the Triton backend around it
    script = textwrap.dedent(f"""
        import importlib.util, warnings
        spec = importlib.util.spec_from_file_location("cache", {str(ROOT / "backends" / "triton" / "cache.py")!r})
        cache = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cache)
        warnings.simplefilter("ignore")
        print(cache._writable_dir())
    """)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory should be: mkdir fails, as for an unwritable one
    env = {**os.environ, "PATTERNCC_CACHE_DIR": str(blocked / "cache"), "TMPDIR": str(tmp_path)}
    dirs = {subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(2)}
    assert dirs == {str(tmp_path / f"patterncc-cache-{os.getuid()}")}
    assert len(list(tmp_path.glob("patterncc-cache-*"))) == 1


# -- 6. right and helpful errors


def test_random_with_a_block_larger_than_the_sequence():
    lay = pcc.layout("random(1, 1048576, 0)", seq_len=100, block=64)
    assert lay.nnz == 4  # the one drawn block covers all 2 x 2 tiles


def test_unwritable_output_path_says_so(capsys, tmp_path):
    code, _, err = run(capsys, "layout", "causal", "--out", str(tmp_path / "missing" / "x.json"))
    assert code == 1 and "cannot read" not in err and "No such file or directory" in err


def test_compile_of_a_length_dependent_pattern_names_the_flag(capsys):
    code, _, err = run(capsys, "compile", str(ROOT / "examples" / "sqrt_strided.pat"))
    assert code == 1 and "--seq-len" in err and "seq_len=" not in err


def test_numpy_integers_are_integers():
    n = np.int64(256)
    assert pcc.layout("causal", seq_len=n, block=np.int32(64)).seq_len == 256
    assert pcc.mask("causal", seq_len=n).shape == (1, 256, 256)
    assert pcc.plan("causal", seq_len=n, block=64, heads=np.int16(2)).describe()


def test_sparse_self_attention_names_the_shape_it_wants():
    import torch

    from patterncc.nn import SparseSelfAttention

    layer = SparseSelfAttention(16, 2, "causal", backend="reference")
    with pytest.raises(ValueError, match=r"x must be \(batch, seq_len, dim=16\), got shape \(5, 16\)"):
        layer(torch.zeros(5, 16))


def test_check_takes_an_expression(capsys):
    code, out, _ = run(capsys, "check", "causal & local(3)", "strided(8)")
    assert code == 0 and out.count(": ok:") == 2


# -- the CLI fuzz: random argument vectors, in a child process

FUZZ = textwrap.dedent(r"""
    import contextlib, io, json, os, random, resource, sys, time
    from patterncc.cli import main

    import torch

    tmp = sys.argv[1]
    rng = random.Random(int(sys.argv[2]))
    cuda = torch.cuda.is_available()
    files = {}
    for name, data in [("ok.pat", b"pattern p(w = 4) = causal & local(w)\n"), ("bin.pat", bytes(range(256))),
                       ("bad.pat", b"pattern p() = causal & summary(8, 9)\n"), ("empty.pat", b"")]:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        files[name] = path
    os.makedirs(os.path.join(tmp, "dir.pat"), exist_ok=True)
    patterns = ["causal", "strided(16)", "causal & (where q * 2147483647 * 2147483647 > k)", "heads { 0..2 => causal }",
                "causal & (where (q + h) % 3 == 0)", "sqrt_strided()", "random(1, 1048576, 0)", "(((", "",
                "\x00", "causal &", "local(-1)", "stride(0)", "x" * 300, "where h == 0", "all",
                files["ok.pat"], files["bin.pat"], files["bad.pat"], files["empty.pat"],
                os.path.join(tmp, "dir.pat"), os.path.join(tmp, "missing.pat")]
    ints = ["0", "-1", "1", "3", "16", "100", "128", "4096", "1000000", "2147483648", "99999999999999999999",
            "abc", "1e3", "", "0x10", "nan"]
    flags = {
        "check": [],
        "show": ["--seq-len", "--block", "--heads", "--png", "--plan", "-D"],
        "layout": ["--seq-len", "--block", "--heads", "--out", "-D"],
        "compile": ["--emit", "--head-dim", "--dtype", "--block", "--seq-len", "-D"],
        "explain": ["--seq-len", "--block", "--heads", "-D"],
        "bench": ["--seq-len", "--heads", "--head-dim", "--dtype", "--rounds"],
        "warmup": ["--head-dim", "--heads", "--kv-heads"],
        "test": ["--backend", "--seed"],
        "demo": ["--seq-len", "--bogus"],
    }
    values = {"--png": [os.path.join(tmp, "o.txt"), os.path.join(tmp, "missing", "o.png"), os.path.join(tmp, "o.png")],
              "--out": [os.path.join(tmp, "o.json"), os.path.join(tmp, "o.csv"), os.path.join(tmp, "nodir", "o.npz"),
                        os.path.join(tmp, "dir.pat")],
              "--emit": ["triton", "ir", "c"], "--dtype": ["float16", "int8"], "--backend": ["reference", "trition"],
              "-D": ["w=3", "w", "=1", "w=x", "n=5"], "--plan": [None], "--bogus": [None]}
    worst, bad = 0.0, []
    for case in range(int(sys.argv[3])):
        command = rng.choice(sorted(flags))
        argv = [command]
        if command != "demo":
            argv += [rng.choice(patterns) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
        for flag in rng.sample(flags[command], rng.randint(0, len(flags[command]))):
            value = rng.choice(values.get(flag, ints))
            argv += [flag] if value is None else [flag, value]
        if command == "test":
            argv += ["--examples", rng.choice(["0", "1", "x", "-3"])]
            argv += ["--backend", "reference"] if rng.random() < 0.8 else []
        if command == "demo" and "--bogus" not in argv:
            argv += ["--bogus"]  # the demo itself takes minutes: only its argument errors are fuzzed
        if command == "bench" and cuda:
            argv += ["--rounds", "0"]  # on a GPU only its argument errors: a benchmark takes minutes
        if command == "warmup" and cuda:
            argv += ["--kv-heads", "0"]  # likewise: a warmup compiles for seconds
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
            except BaseException as exc:
                code = "raised " + type(exc).__name__ + ": " + str(exc)[:200]
        took = time.perf_counter() - start
        worst = max(worst, took)
        text = err.getvalue()
        if not isinstance(code, int) or code not in (0, 1, 2) or "Traceback" in text \
                or (code and not text.strip()) or took > 30:
            bad.append({"argv": argv, "code": code, "stderr": text[-500:], "seconds": took})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"bad": bad, "worst_seconds": worst, "max_rss_kb": usage.ru_maxrss}))
""")


@pytest.mark.parametrize("seed", [0, 1])
def test_cli_fuzz_gives_messages_and_exit_codes_never_tracebacks(tmp_path, seed):
    env = {**os.environ, "PATTERNCC_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)  # `test --backend triton` is the kit's own tests' business
    result = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), str(seed), "100"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["bad"] == [], json.dumps(report["bad"], indent=1)
    assert report["max_rss_kb"] < 3 * 2**20, report  # under 3 GiB


# -- every public entry point just past each limit, under a memory cap

CAPPED = textwrap.dedent(r"""
    import resource, signal, sys, time
    import numpy as np
    import scipy.sparse
    import patterncc as pcc
    from patterncc import blocklayout, ir, masks, parser, resolve
    from patterncc.backends.reference import ReferenceAttention

    # Address space: what the interpreter holds now plus 1 GiB. Every call
    # below is refused before it allocates anything near its full size.
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (held + 2**30, held + 2**30))

    side = 2**14 + 1  # a causal mask just past 2**28 elements
    nb = next(b for b in range(2**13, 2**14) if b * (b + 1) // 2 > blocklayout.MAX_CANDIDATES)  # causal blocks
    cases = {
        "parse: source": lambda: pcc.parse("causal " + " " * parser.MAX_SOURCE_CHARS),
        "parse: nesting": lambda: pcc.parse("~(" * (parser.MAX_DEPTH + 1) + "causal" + ")" * (parser.MAX_DEPTH + 1)),
        "parse: nodes": lambda: pcc.parse(
            "".join(f"pattern p{i}() = p{i - 1}() | p{i - 1}()\n" for i in range(1, 17)).replace("p0()", "causal")),
        "parse: integer": lambda: pcc.parse(f"local({ir.MAX_VALUE + 1})"),
        "mask: elements": lambda: pcc.mask("causal", seq_len=side),
        "mask: heads": lambda: pcc.mask("causal", seq_len=4, heads=ir.MAX_HEADS + 1),
        "layout: candidates": lambda: pcc.layout("causal", seq_len=nb * 64, block=64),
        "layout: heads": lambda: pcc.layout("causal & (where h == 0)", seq_len=64, heads=ir.MAX_HEADS + 1),
        "layout: blocks": lambda: pcc.layout("causal", seq_len=blocklayout.MAX_BLOCKS + 1, block=1),
        "layout: evaluations": lambda: pcc.layout("causal & (where q * 7 % 13 > k % 11 and q * q % 17 < k)",
                                                  seq_len=2**17, block=128),
        "layout: where overflow": lambda: pcc.layout("where q * q * q > k", seq_len=2**21 + 2**20, block=2**12),
        "plan: candidates": lambda: pcc.plan("causal", seq_len=nb * 64, block=64),
        "sparse_mask: elements": lambda: pcc.sparse_mask("causal", seq_len=side),
        "compile: reference": lambda: pcc.compile("causal", backend="reference", dense_limit=0)(
            *[np.zeros((1, 1, side, 2), dtype=np.float32)] * 3),
        # what a newcomer tried: 18 GB, 8.5 GB, minutes and 6.3 GB before these limits
        "sparse_mask: 1M tokens": lambda: pcc.sparse_mask("causal", seq_len=1_000_000),
        "layout: 1024 heads of a where": lambda: pcc.layout("causal & (where (q + h) % 3 == 0)", seq_len=65536,
                                                            heads=1024),
        "layout: 2M heads": lambda: pcc.layout("causal & (where h == 0)", seq_len=128, heads=2_000_000),
        "layout: block 1": lambda: pcc.layout("causal", seq_len=16000, block=1),
        "plan: block 1": lambda: pcc.plan("causal", seq_len=16000, block=1),
        "mask: 20000 tokens": lambda: pcc.mask("causal", seq_len=20000),
    }
    def too_slow(*_):
        raise TimeoutError("over 30 s")

    signal.signal(signal.SIGALRM, too_slow)
    for name, call in cases.items():
        start = time.perf_counter()
        signal.alarm(30)
        try:
            call()
        except pcc.LimitError as err:
            print(f"{name}: refused in {time.perf_counter() - start:.2f} s: {str(err).splitlines()[0][:150]}")
        except Exception as err:  # MemoryError under the cap, TimeoutError, ...
            print(f"{name}: NOT REFUSED ({type(err).__name__})")
        else:
            print(f"{name}: NOT REFUSED")
        signal.alarm(0)
""")


def test_every_entry_point_just_past_each_limit_is_refused_under_a_memory_cap():
    result = subprocess.run([sys.executable, "-c", CAPPED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 20 and all(": refused in " in line for line in lines), result.stdout
    for line in lines:
        assert float(line.split(" refused in ")[1].split(" s")[0]) < 20, line
    # the message names the size and the limit
    block_1 = next(line for line in lines if line.startswith("layout: block 1:"))
    assert "128008000" in block_1 and str(blocklayout.MAX_CANDIDATES) in block_1


@pytest.mark.parametrize("command", ["show", "layout", "explain"])
def test_shape_flags_have_help_with_defaults(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "sequence length (default 4096)" in out and "block size (default 64" in out
