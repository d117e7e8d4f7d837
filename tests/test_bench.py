"""The benchmark harness's bookkeeping (what it measures is for the GPU: bench/gpu_check.sh).

``_time_rounds`` turns per-round do_bench medians into the row's figures;
here do_bench is replaced by a script of times, so the medians, the order of
the contenders in each round and the per-round ratios can be checked exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from patterncc import ir  # noqa: E402
from patterncc.backends.triton import bench  # noqa: E402

# per call of a contender's timer: forward, then forward+backward; rounds 0, 1, 2
SCRIPT = {
    "pcc": [(1.0, 3.0), (1.2, 3.3), (0.9, 3.1)],
    "flex": [(1.1, 3.0), (1.3, 3.6), (1.0, 2.9)],
}


def _scripted(monkeypatch):
    calls, rounds_seen = [], {}

    def fake_bench(fn, grad_to_none=None, rep=100, device="cuda"):
        who, mode = fn()
        calls.append((who, mode))
        r = rounds_seen.get((who, mode), 0)
        rounds_seen[(who, mode)] = r + 1
        assert (grad_to_none is not None) == (mode == 1), "forward+backward resets the grads, the forward does not"
        return SCRIPT[who][r][mode]

    monkeypatch.setattr(bench, "_bench", fake_bench)
    contenders = [(who, (lambda w=who: (w, 0)), (lambda w=who: (w, 1)), 2.0e9) for who in SCRIPT]
    return calls, contenders


def test_rounds_take_the_median_and_alternate_the_order(monkeypatch):
    calls, contenders = _scripted(monkeypatch)
    row = bench.Row("p", 64, 16, 2, 2, "bfloat16")
    bench._time_rounds(row, contenders, grads=[], rounds=3, rep=1, device="cuda")
    assert [who for who, mode in calls if mode == 0] == ["pcc", "flex", "flex", "pcc", "pcc", "flex"]
    assert row.ms == {"pcc fwd": 1.0, "pcc fwd+bwd": 3.1, "flex fwd": 1.1, "flex fwd+bwd": 3.0}
    assert row.tflops["pcc fwd"] == pytest.approx(2.0e9 / 1.0 * 1e-9)
    assert row.tflops["flex fwd+bwd"] == pytest.approx(3.5 * 2.0e9 / 3.0 * 1e-9)
    assert row.notes == ["flex/pcc fwd per round: 1.100, 1.083, 1.111",
                         "flex/pcc fwd+bwd per round: 1.000, 1.091, 0.935"]


def test_one_round_is_one_measurement_and_no_note(monkeypatch):
    calls, contenders = _scripted(monkeypatch)
    row = bench.Row("p", 64, 16, 2, 2, "bfloat16")
    bench._time_rounds(row, contenders, grads=[], rounds=1, rep=1, device="cuda")
    assert len(calls) == 4 and row.notes == []
    assert row.ms == {"pcc fwd": 1.0, "pcc fwd+bwd": 3.0, "flex fwd": 1.1, "flex fwd+bwd": 3.0}


def test_bench_case_runs_on_the_cpu_in_rounds():
    """The whole harness as a dry run (one timed call each, kernels interpreted):
    patterncc's and SDPA's figures are there, and each contender was timed."""
    row = bench.bench_case(ir.Causal() & ir.Local(1024), "sliding", 40, heads=2, head_dim=16,
                           dtype="float32", device="cpu", rounds=2, extras=False)
    for key in ("pcc fwd", "pcc fwd+bwd", "sdpa fwd", "sdpa fwd+bwd"):
        assert row.ms[key] > 0, key
    assert row.density == 1.0  # n = 40 fits in one block of 128
    assert "| sliding | 40 | 16 |" in bench.markdown([row])


def test_a_contender_whose_timing_fails_leaves_a_note(monkeypatch):
    calls, contenders = _scripted(monkeypatch)
    scripted = bench._bench

    def flex_runs_out_of_memory(fn, grad_to_none=None, rep=100, device="cuda"):
        if fn()[0] == "flex" and grad_to_none is not None:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return scripted(fn, grad_to_none, rep, device)

    monkeypatch.setattr(bench, "_bench", flex_runs_out_of_memory)
    row = bench.Row("p", 64, 16, 2, 2, "bfloat16")
    bench._time_rounds(row, contenders, grads=[], rounds=3, rep=1, device="cuda")
    assert row.ms == {"pcc fwd": 1.0, "pcc fwd+bwd": 3.1}
    assert row.notes == ["flex timing failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]


# -- bench/probes.py: what the bench scripts use beyond `patterncc bench` -------------


def test_probes_read_tile_specs_and_keep_the_record_patterns():
    import argparse

    import bench_probes

    probes = bench_probes.load()
    assert probes.tile_spec("128x64:4:3") == (128, 64, 4, 3)
    assert probes.backward_tile_spec("32x64/64x64:4:2") == (32, 64, 64, 64, 4, 2)
    with pytest.raises(argparse.ArgumentTypeError):
        probes.backward_tile_spec("128x64:4:3")
    config = probes.with_backward_tiles(bench.KernelConfig(), (32, 64, 64, 32, 8, 3))
    assert (config.block_m1, config.block_n1, config.block_m2, config.block_n2) == (32, 64, 64, 32)
    assert (config.bwd_warps, config.bwd_stages) == (8, 3)
    assert probes.PATTERNS["sliding_window(1024)"] == ir.Causal() & ir.Local(1024)
    assert not hasattr(bench, "sweep") and not hasattr(bench, "resources") and not hasattr(bench, "cold_start")


def test_decode_host_probe_runs_and_gives_the_real_kernels_back(capsys):
    """bench/decode_host.py on the CPU: a row per pattern, and the kernels it mocked restored."""
    from patterncc.backends.triton import decode

    real = decode.RowsAttention._module
    probe = _bench_script("decode_host")
    assert probe.main(["--context", "4096", "--calls", "3", "--patterns", "causal", "strided(128)"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| causal") or
            line.startswith("| strided(128)")]
    assert len(rows) == 2 and all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[1:])
    assert decode.RowsAttention._module is real


def test_cold_start_runs_the_warmup_in_a_fresh_process_on_its_own_caches(tmp_path):
    """bench/cold_start.py --warmup's warmup step: ``patterncc warmup`` in a new process whose caches
    are under the given folder (on this machine without a GPU, its line saying so)."""
    import torch

    cold_start = _bench_script("cold_start")
    line = cold_start.warmup(str(tmp_path))
    assert not line.startswith("failed"), line
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in line
    else:
        assert "kinds of call compiled" in line and (tmp_path / "triton").is_dir()


def _bench_script(name: str):
    """A script of bench/ loaded from its file (it lives outside the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_block_rate_counts_blocks_as_the_targets_do():
    """The limits' block counts: what runs, on layouts at block 128 (the
    performance targets' figures: causal 8256 and the plans' 383 and 2240 at
    16384), and the area the kernels compute at their own block."""
    rate = _bench_script("block_rate")
    assert rate.computed_blocks("causal", 16384, 16)[1:] == (8256.0, 8224.0)
    assert rate.computed_blocks("strided(128)", 16384, 16) == ("planned", 383.0, 287.25)
    assert rate.computed_blocks("fixed(128,32)", 16384, 16) == ("planned", 2240.0, 2160.0)
    assert rate.computed_blocks("sliding_window(1024)", 16384, 16) == ("natural", 1116.0, 1054.0)


def test_block_rate_runs_on_the_cpu(capsys):
    """The harness end to end in the interpreter: one row per pattern, each
    limit the pattern's blocks at causal's time per block."""
    import json

    rate = _bench_script("block_rate")
    assert rate.main(["--device", "cpu", "--seq-lens", "96", "--head-dims", "16", "--heads", "2", "--patterns",
                      "strided(16)", "--flex", "--rounds", "1", "--no-sdpa"]) == 0
    out = capsys.readouterr().out
    rows = {r["pattern"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert set(rows) == {"causal", "strided(16)"}
    causal = rows["causal"]
    for mode in ("fwd", "f+b"):
        assert causal[f"{mode} limit ms"] == causal[f"{mode} ms"]
        per_block = causal[f"{mode} ms"] / causal["blocks"]
        assert rows["strided(16)"][f"{mode} limit ms"] == pytest.approx(rows["strided(16)"]["blocks"] * per_block)
    assert "| strided(16) | 96 | 16 |" in out


def test_probe_variants_apply_and_no_steps_computes_no_block(monkeypatch):
    """Every kernel variant of bench/hopper_probe.py still finds the text it
    rewrites, and the floor variant means what it says: with no steps, every
    row is one that reached no key (o = 0, lse = -inf)."""
    import torch

    from patterncc.backends.triton import TritonAttention, codegen, launch
    from patterncc.backends.triton.config import KernelConfig

    probe = _bench_script("hopper_probe")
    original = dict(codegen._KERNEL_TEMPLATES)
    cfg = KernelConfig(block=16, block_m=16, block_n=16, fwd_warps=4)
    with_rel = launch._KernelTerms(rel=torch.zeros(1, 3))
    fwd_warps = launch._KernelTerms.fwd_warps
    for variant, swaps in probe.VARIANTS.items():
        monkeypatch.setattr(codegen, "_KERNEL_TEMPLATES", dict(original))
        monkeypatch.setattr(launch._KernelTerms, "fwd_warps", fwd_warps)
        probe._patched(variant)  # asserts that each rewritten text is there
        changed = {name for name in original if codegen._KERNEL_TEMPLATES[name] != original[name]}
        assert changed == set(swaps) - {"launch"}, variant
        assert (with_rel.fwd_warps(cfg) == 4) == ("launch" in swaps), variant  # the one launch rewrite
    monkeypatch.setattr(codegen, "_KERNEL_TEMPLATES", dict(original))
    probe._patched("no-steps")
    config = KernelConfig(block=16, block_m=16, block_n=16, block_m1=16, block_n1=16, block_m2=16, block_n2=16)
    attn = TritonAttention(ir.Causal(), config=config)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    o, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())


def test_resource_probes_take_the_warps_a_launch_takes(tmp_path):
    """bench/probes.py compiles each kernel as a launch runs it: the forward
    with a relative bias takes at least 8 warps at run time
    (``launch._KernelTerms.fwd_warps``), so its resource row must be for 8.
    In a process of its own: the probes build Triton's compile inputs, which
    the interpreter this file runs under has not."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (
        "import json, sys; sys.path.insert(0, 'bench')\n"
        "from probes import kernel_sources, PATTERNS\n"
        "from patterncc.backends.triton.config import KernelConfig\n"
        "cfg = KernelConfig(block=64, block_m=64, block_n=64, fwd_warps=4)\n"
        "print(json.dumps([[name, warps] for variant in ({}, {'REL_BIAS': True})\n"
        "                  for name, _, _, warps, _ in kernel_sources(PATTERNS['causal'], 64, 'bfloat16', cfg, variant)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATTERNCC_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert rows[0] == ["forward", 4] and rows[3] == ["forward", 8]
