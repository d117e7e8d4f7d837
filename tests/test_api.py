"""The public API's rules, each stated once: keyword arguments, what a string
means, the default block, the choice of backend, and imports without circles."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import patterncc as pcc
from patterncc import ir
from patterncc.attention import choose_backend
from patterncc.cli import main
from patterncc.nn import SparseSelfAttention, resolve_pattern
from patterncc.planner import DEFAULT_BLOCK

ROOT = Path(__file__).resolve().parents[1]
STRIDED = ROOT / "examples" / "strided.pat"


# -- unknown keyword arguments ------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_compile_rejects_unknown_keywords_and_lists_the_allowed_ones(backend):
    with pytest.raises(TypeError) as err:
        pcc.compile("causal", backend=backend, blok=64)
    message = str(err.value)
    assert "'blok'" in message
    for allowed in ("backend", "plan", "dense_sdpa", "block", "config", "dense_limit"):
        assert allowed in message


def test_compile_names_every_unknown_keyword():
    with pytest.raises(TypeError, match="'blok', 'dense_limt'"):
        pcc.compile("causal", blok=64, dense_limt=3)


def test_compile_still_takes_the_known_keywords():
    attn = pcc.compile("causal & local(3)", backend="reference", dense_limit=0)
    q = np.random.default_rng(0).standard_normal((1, 1, 5, 4))
    o_sparse = attn(q, q, q)
    o_dense = pcc.compile("causal & local(3)", backend="reference")(q, q, q)
    np.testing.assert_allclose(o_sparse, o_dense, rtol=1e-12, atol=1e-12)


# -- one rule for strings -----------------------------------------------------------


def test_a_one_line_string_ending_in_pat_names_a_file_everywhere():
    want = pcc.load(STRIDED)
    assert pcc.as_pattern(str(STRIDED)) == want
    assert pcc.compile(str(STRIDED), backend="reference").pattern == want
    assert pcc.layout(str(STRIDED), 256, block=16).pattern == pcc.layout(want, 256, block=16).pattern
    assert pcc.plan(str(STRIDED), 256, block=16).pattern == want
    assert np.array_equal(pcc.mask(str(STRIDED), 64), pcc.mask(want, 64))
    assert resolve_pattern(str(STRIDED)) == want


def test_a_path_object_is_a_file_everywhere():
    want = pcc.load(STRIDED)
    assert pcc.as_pattern(STRIDED) == want
    assert pcc.compile(STRIDED, backend="reference").pattern == want
    assert np.array_equal(pcc.mask(STRIDED, 64), pcc.mask(want, 64))
    assert resolve_pattern(STRIDED) == want


def test_any_other_string_is_source_text():
    assert pcc.as_pattern("causal & local(4)") == pcc.parse("causal & local(4)")
    text = "pattern p(w = 3) = causal & local(w)\n"
    assert pcc.as_pattern(text) == pcc.parse("causal & local(3)")
    assert pcc.as_pattern(text, w=5) == pcc.parse("causal & local(5)")


def test_a_missing_pat_file_is_a_missing_file_not_a_syntax_error(tmp_path):
    missing = str(tmp_path / "missing.pat")
    for call in (pcc.as_pattern, lambda p: pcc.compile(p), lambda p: pcc.layout(p, 64)):
        with pytest.raises(FileNotFoundError, match="missing.pat"):
            call(missing)


def test_the_cli_reads_files_by_the_same_rule(tmp_path, capsys):
    odd = tmp_path / "pattern.txt"  # a file without the .pat suffix is not a file to the rule
    odd.write_text("causal\n")
    assert main(["explain", str(odd), "-n", "64"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["explain", str(STRIDED), "-n", "256", "-D", "l=16"]) == 0
    assert pcc.plan(pcc.load(STRIDED, l=16), 256).describe() in capsys.readouterr().out


# -- the default block is the compiled attention's -----------------------------------


def test_layout_and_plan_default_to_the_compiled_attentions_block():
    assert DEFAULT_BLOCK == 64
    assert pcc.layout("causal", 512).block == DEFAULT_BLOCK
    assert pcc.plan("strided(16)", 512).block == DEFAULT_BLOCK
    assert pcc.layout("causal", 512, block=16).block == 16


def test_cli_explain_show_and_layout_default_to_the_compiled_attentions_block(tmp_path, capsys):
    assert main(["explain", "strided(128)", "-n", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == pcc.plan("strided(128)", 4096).describe().strip()
    assert f"block = {DEFAULT_BLOCK}," in out
    assert main(["show", "causal", "-n", "256"]) == 0
    assert f"block={DEFAULT_BLOCK} " in capsys.readouterr().out
    assert main(["layout", "causal", "-n", "256", "--out", str(tmp_path / "lay.json")]) == 0
    assert f'"block": {DEFAULT_BLOCK}' in (tmp_path / "lay.json").read_text()


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton backend runs on CUDA, or on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("src, n, heads", [("strided(16)", 300, 2), ("causal", 200, 1), ("fixed(32, 4)", 100, 1)])
def test_explain_shows_the_plan_compile_runs(src, n, heads):
    attn = pcc.compile(src, backend="triton")
    assert attn.plan(n, heads).describe() == pcc.plan(src, n, heads=heads).describe()


# -- one rule for backend="auto" ----------------------------------------------------


class _CudaLike:
    device = torch.device("cuda")


def test_auto_is_triton_on_cuda_and_the_reference_elsewhere_even_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(1)
    assert choose_backend("auto", _CudaLike()) == "triton"
    assert choose_backend("auto", cpu) == "reference"
    assert choose_backend("auto", np.zeros(1)) == "reference"
    assert choose_backend("triton", cpu) == "triton"
    attn = pcc.compile("causal")
    layer = SparseSelfAttention(16, 2, "causal & local(4)")
    for x in (cpu, _CudaLike()):
        assert attn.backend_for(x) == layer.backend_for(x) == choose_backend("auto", x)


def test_auto_on_cpu_tensors_gives_the_reference_result(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = torch.randn(3, 1, 2, 20, 8, dtype=torch.float64)
    got = pcc.compile("strided(4)")(q, k, v)
    want = pcc.compile("strided(4)", backend="reference")(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- no import circles ----------------------------------------------------------------


def _module_name(path: Path) -> str:
    for top, package in ((ROOT / "backends", "patterncc.backends"), (ROOT / "patterncc", "patterncc")):
        if path.is_relative_to(top):
            parts = list(path.relative_to(top).with_suffix("").parts)
            return ".".join([package] + (parts[:-1] if parts[-1] == "__init__" else parts))
    raise AssertionError(path)


def _import_graph() -> dict[str, set[str]]:
    """Every import of a patterncc module by another, at module level or inside a function."""
    files = [p for top in ("patterncc", "backends") for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    graph = _import_graph()
    assert {"patterncc.cli", "patterncc.demo", "patterncc.backends.reference._torch"} <= set(graph)
    assert "patterncc.backends.reference.checks" in graph["patterncc.backends.reference._torch"]
    assert _cycles(graph) == []


def test_pattern_objects_take_no_overrides():
    with pytest.raises(TypeError, match="overrides"):
        pcc.as_pattern(ir.Causal(), w=3)


# -- one cache helper -----------------------------------------------------------------


def test_lru_keeps_the_most_recently_used_entries():
    from patterncc.lru import LRU

    cache = LRU(2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1            # a read makes "a" the most recent
    cache["c"] = 3                    # so "b" goes
    assert "b" not in cache and cache.keys() == ["a", "c"]
    assert cache.get("a") == 1 and cache.keys() == ["c", "a"]
    assert cache.get("b", "missing") == "missing"
    cache["c"] = 4                    # a write refreshes too
    cache["d"] = 5
    assert cache.keys() == ["c", "d"] and cache["c"] == 4 and len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="maxsize"):
            LRU(bad)


def test_the_attention_caches_are_bounded_lrus():
    from patterncc.backends.reference.attention import CACHE_SIZE, ReferenceAttention
    from patterncc.lru import LRU
    from patterncc.planned import PlannedAttention

    attn = ReferenceAttention(pcc.parse("causal & local(3)"))
    first = attn.masks(4, 1)
    for n in range(5, 5 + CACHE_SIZE - 1):
        attn.masks(n, 1)
        assert attn.masks(4, 1) is first      # read every time: never the one to go
    attn.masks(100, 1)
    assert isinstance(attn._masks, LRU) and len(attn._masks) == CACHE_SIZE
    assert attn.masks(4, 1) is first
    planned = PlannedAttention(pcc.parse("strided(4)"), make_inner=None, block=16)
    assert isinstance(planned._plans, LRU)
    plan = planned.plan(64, 1)
    assert planned.plan(64, 1) is plan


# -- packaging ----------------------------------------------------------------------


def test_every_package_directory_ships():
    """pyproject.toml lists packages by hand (grammar/ and backends/ map into
    patterncc): a directory left out installs from a checkout in editable
    mode but is missing from a wheel."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {"patterncc": "patterncc", **setup["package-dir"]}
    listed = set(setup["packages"])
    for package, directory in dirs.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            name = ".".join([package, *rel.parts])
            assert name in listed, f"{name} ({init.parent.relative_to(ROOT)}) is not in pyproject's packages"
