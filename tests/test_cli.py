"""The patterncc command: every subcommand that runs without a GPU, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import patterncc as pcc
from patterncc.cli import main

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.pat"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_every_example(capsys, path):
    code, out, err = run(capsys, "check", str(path))
    assert code == 0, err
    assert f"{path}: ok" in out


def test_check_reports_located_error_with_caret(capsys, tmp_path):
    bad = tmp_path / "bad.pat"
    bad.write_text("# two lines\npattern p(l = 8) = causal & summary(l, 9)\n")
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    first, quoted, caret = err.splitlines()[:3]
    assert first.startswith(f"{bad}:2:")
    assert "summary" in first and "c <= l" in first
    assert quoted.strip() == "pattern p(l = 8) = causal & summary(l, 9)"
    column = int(first.split(":")[2])
    assert caret.index("^") - 4 == column - 1  # the caret sits under the reported column


def test_check_syntax_error_says_what_was_expected(capsys, tmp_path):
    bad = tmp_path / "syntax.pat"
    bad.write_text("pattern p() = causal & (local(4) | \n")
    code, _, err = run(capsys, "check", str(bad))
    assert code == 1
    assert "expected" in err.lower()


def test_check_missing_file_is_an_error_not_a_crash(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.pat"))
    assert code == 1
    assert "nope.pat" in err


def test_show_prints_layout_and_densities(capsys):
    code, out, _ = run(capsys, "show", "strided(16)", "--seq-len", "200", "--block", "16")
    assert code == 0
    lay = pcc.layout("strided(16)", 200, 16)
    assert str(lay.nnz) in out
    assert "causal & (local(16) | stride(16))" in out


def test_show_writes_png(capsys, tmp_path):
    png = tmp_path / "strided.png"
    code, _, _ = run(capsys, "show", str(EXAMPLES[0]), "--seq-len", "1024", "--block", "64", "--png", str(png))
    assert code == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_show_param_override(capsys):
    path = Path(__file__).parent.parent / "examples" / "strided.pat"
    code, out, _ = run(capsys, "show", str(path), "-D", "l=32", "--seq-len", "256", "--block", "32")
    assert code == 0
    assert "local(32)" in out and "stride(32)" in out


def test_show_rejects_bad_override(capsys):
    path = Path(__file__).parent.parent / "examples" / "strided.pat"
    code, _, err = run(capsys, "show", str(path), "-D", "l=abc")
    assert code == 1 and "not an integer" in err


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_layout_out_round_trips(capsys, tmp_path, suffix):
    out_file = tmp_path / f"lay{suffix}"
    code, _, _ = run(capsys, "layout", "fixed(32, 8)", "--seq-len", "300", "--block", "32", "--out", str(out_file))
    assert code == 0
    lay = pcc.layout("fixed(32, 8)", 300, 32)
    if suffix == ".npz":
        data = np.load(out_file)
        np.testing.assert_array_equal(data["kv_idx"], lay.kv_idx)
        np.testing.assert_array_equal(data["dense"], lay.to_dense())
    else:
        data = json.loads(out_file.read_text())
        assert data["kv_idx"] == lay.kv_idx.tolist() and data["nnz"] == lay.nnz


def test_layout_out_needs_known_suffix(capsys, tmp_path):
    code, _, err = run(capsys, "layout", "causal", "--out", str(tmp_path / "x.txt"))
    assert code == 1 and ".npz or .json" in err


def test_expression_errors_are_located(capsys):
    code, _, err = run(capsys, "show", "causal & stride(0)")
    assert code == 1
    assert "<command line>:1:" in err and "^" in err


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "patterncc", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("check", "show", "layout", "compile", "bench", "test", "explain", "warmup", "demo"):
        assert command in proc.stdout


def test_warmup_says_what_it_did_and_refuses_a_grouping_that_does_not_divide(capsys, monkeypatch):
    """On a GPU ``patterncc warmup`` compiles the stand-in kernels (``warmup.warm``, tested in
    test_standin.py, and timed by bench/cold_start.py); here it says there is nothing to compile.
    Head counts that do not divide are a usage error everywhere."""
    import torch

    from patterncc.backends.triton import warmup

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(warmup, "warm", lambda **kw: asked.append(kw) or ["one", "two"])
    code, out, _ = run(capsys, "warmup", "--head-dim", "64", "--kv-heads", "16", "2", "--terms", "none", "sinks")
    assert code == 0 and "of 2 kinds of call compiled" in out
    assert asked == [dict(head_dims=[64], dtypes=["bfloat16"], terms=["none", "sinks"], heads=16, kv_heads=[16, 2])]
    assert run(capsys, "warmup", "--heads", "12")[0] == 0  # by default as many KV heads, and a quarter
    assert asked[1] == dict(head_dims=[64, 128], dtypes=["bfloat16"], terms=["none"], heads=12, kv_heads=[12, 3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, _ = run(capsys, "warmup")
    assert code == 0 and "no CUDA GPU" in out and len(asked) == 2
    code, _, err = run(capsys, "warmup", "--heads", "16", "--kv-heads", "3")
    assert code == 2 and "--kv-heads 3 does not divide --heads 16" in err


def test_test_command_runs_the_kernels_in_the_interpreter_without_a_gpu(tmp_path):
    import os

    import torch

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATTERNCC_CACHE_DIR"] = str(tmp_path / "cache")
    path = Path(__file__).parent.parent / "examples" / "sliding_window.pat"
    proc = subprocess.run([sys.executable, "-m", "patterncc", "test", str(path), "--examples", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "kernel" in line]
    assert any("reference" in r and "passed" in r for r in rows)
    if not torch.cuda.is_available():
        assert any("triton" in r and "passed" in r for r in rows), proc.stdout


def test_compile_emits_the_generated_triton_source(capsys):
    code, out, _ = run(capsys, "compile", "strided(64)", "--emit", "triton")
    assert code == 0
    assert "@triton.jit" in out and "def pattern_mask" in out and "def attn_fwd" in out
    assert "pattern: causal & (local(64) | stride(64))" in out


def test_compile_specializes_patterns_that_use_n(capsys):
    path = str(Path(__file__).parent.parent / "examples" / "sqrt_strided.pat")
    code, _, err = run(capsys, "compile", path)
    assert code == 1 and "depend on n" in err
    code, out, _ = run(capsys, "compile", path, "--seq-len", "4096")
    assert code == 0 and "local(64)" in out


def test_missing_pattern_file_is_an_error_not_a_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "show", str(tmp_path / "missing.pat"))
    assert code == 1 and "No such file" in err and "missing.pat" in err and "Traceback" not in err
