"""Context parallelism against the single-process float64 reference.

Each world size is one ``torch.multiprocessing.spawn`` of ``gloo`` ranks
(spawning is the slow part): every rank loops over all the cases, compares
its shard of o, lse, dq, dk, dv with the reference's and writes what it
found to a file; the tests below read those files, one test per case. The
key sets and the shardings are checked in this process, without ranks.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, Phase, given, settings

import patterncc as pcc
from patterncc import ir
from patterncc.distributed import ContextParallelAttention, exchange, needed_keys, sharding
from patterncc.nn import SparseSelfAttention, SparseTransformer
from patterncc.testing import strategies

HEADS_PAT = "heads { 0..1 => sliding_window(5), 1..2 => fixed(16, 3) }"
WHERE_PAT = "where k <= q and (q - k) % 3 != 1"
# (pattern, n, sharding, H, Hkv, dtype): the spawned ranks run every case of their world size.
CASES_2 = [(pat, n, s, 2, 1, "float64")
           for pat in ("causal", "sliding_window(7)", "fixed(16, 3)", "strided(8)", "local_global(6, 3)",
                       HEADS_PAT, WHERE_PAT, "longformer(4, 2)", "bigbird(4, 2, 1, 16, 5)")
           for n, s in ((61, "contiguous"), (64, "zigzag"), (100, "zigzag"))]
CASES_2 += [("causal", 1, "contiguous", 2, 2, "float64"),
            ("none | (causal & global(3))", 40, "zigzag", 2, 2, "float64"),
            ("sliding_window(9)", 77, "contiguous", 4, 2, "float32"), ("fixed(16, 3)", 70, "zigzag", 2, 1, "bfloat16"),
            ("strided(8)", 50, "contiguous", 2, 2, "float16")]
# Score terms: the pattern's (softcap, alibi) and the call's (sinks, rel_bias, alibi_slopes), 2 ranks.
TERM_CASES = [("sliding_window(7) with softcap(2.5)", 61, "contiguous", 2, 1, "float64", ("sinks",)),
              ("causal with alibi", 64, "zigzag", 2, 2, "float64", ("rel_bias",)),
              ("fixed(16, 3)", 100, "zigzag", 2, 1, "float64", ("sinks", "rel_bias", "alibi_slopes")),
              ("none | (causal & global(3))", 40, "contiguous", 2, 1, "float32", ("sinks",)),
              ("causal with alibi", 61, "contiguous", 2, 2, "float64", ("rel_bias",)),
              ("strided(8)", 50, "contiguous", 2, 1, "float32", ("alibi_slopes", "sinks"))]
CASES_4 = [(pat, n, s, 2, 1, "float64")
           for pat in ("causal", "sliding_window(7)", "fixed(16, 3)", "strided(8)", HEADS_PAT, WHERE_PAT)
           for n, s in ((3, "contiguous"), (7, "zigzag"), (61, "contiguous"), (100, "zigzag"))]
CASES_4 += [("local_global(6, 3)", 96, "zigzag", 4, 2, "float32")]
SUBGROUP_CASES = [("sliding_window(7)", 61, "zigzag", 2, 1, "float64"),
                  ("fixed(16, 3)", 50, "contiguous", 2, 2, "float64")]
BYTES_LENGTHS = (256, 1024)  # sliding_window(16) over 4 ranks at both: the same bytes per rank
DRAWN = 5  # hypothesis-drawn patterns run by the 2-rank spawn
TOLERANCE = {"float64": 1e-12, "float32": 5e-6, "bfloat16": 2e-2, "float16": 3e-3}


def _draw_patterns(count: int) -> list[ir.Pattern]:
    drawn = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategies.patterns(max_depth=2, max_leaves=4, heads=2))
    def collect(p):
        drawn.append(p)

    collect()
    return drawn[:count]


def _reference(pattern, q, k, v, do, dlse, terms):
    """o, lse and the gradients of sum(o * do) + sum(finite lse * dlse), float64."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    terms = {name: t.clone().requires_grad_() for name, t in terms.items()}
    o, lse = pcc.compile(pattern, backend="reference")(q, k, v, return_lse=True, **terms)
    _loss(o, lse, do, dlse).backward()
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad, {name: t.grad for name, t in terms.items()}


def _loss(o, lse, do, dlse):
    return (o.double() * do).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * dlse).sum()


def _relative(got, want) -> float:
    """The largest difference, relative to the reference's largest magnitude (or 1)."""
    if got.numel() == 0:
        return 0.0
    return float((got.detach().cpu().double() - want).abs().max()) / max(1.0, float(want.abs().max()))


def _run_case(cp_group, pattern, n, sharding_name, H, Hkv, dtype, call_terms=(), *, block=64,
              device="cpu") -> dict:
    """This rank's largest errors against the reference (scaled by the
    reference's largest magnitude), and the bytes it sent."""
    g = torch.Generator().manual_seed(n * 1000 + H)
    B, D = 2, 8
    q, k, v, do = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    dlse = torch.randn(B, H, n, generator=g, dtype=torch.float64)
    shapes = {"sinks": (H,), "rel_bias": (H, 2 * 5 + 1), "alibi_slopes": (H,)}
    terms = {name: torch.rand(shapes[name], generator=g, dtype=torch.float64) for name in call_terms}
    low = getattr(torch, dtype)
    q, k, v = (x.to(low).double() for x in (q, k, v))  # the reference sees the inputs the ranks see
    o_ref, lse_ref, dq, dk, dv, term_grads = _reference(pattern, q, k, v, do, dlse, terms)
    # own_part="attention": patterncc's attention (the reference here) wherever it can run, "auto" only on the GPU
    cp = ContextParallelAttention(pattern, cp_group, sharding_name, block=block, own_part="attention")
    ql, kl, vl = (cp.shard(x).to(device, low).requires_grad_() for x in (q, k, v))
    local_terms = {name: t.to(device).requires_grad_() for name, t in terms.items()}
    o, lse = cp(ql, kl, vl, return_lse=True, **local_terms)
    _loss(o, lse, cp.shard(do).to(device), cp.shard(dlse[..., None])[..., 0].to(device)).backward()
    errors = {}
    for name, t in local_terms.items():  # each rank holds its queries' share of a term's gradient
        dist.all_reduce(t.grad, group=cp_group)
        errors[f"d{name}"] = _relative(t.grad, term_grads[name])
    for name, got, want in (("o", o, o_ref), ("dq", ql.grad, dq), ("dk", kl.grad, dk), ("dv", vl.grad, dv)):
        want = cp.shard(want)
        errors[name] = _relative(got, want)
    want_lse, lse = cp.shard(lse_ref[..., None])[..., 0], lse.detach().cpu()
    same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(want_lse)))
    finite = torch.isfinite(want_lse)
    errors["lse"] = float((lse.double() - want_lse)[finite].abs().max()) if finite.any() else 0.0
    if not same_inf:
        errors["lse"] = float("inf")
    with torch.no_grad():  # a second call at this length reuses the plan and the masks kept with it
        errors["again"] = _relative(cp(ql, kl, vl, **local_terms), cp.shard(o_ref))
    full = cp.unshard(o.detach())  # unshard puts every shard back where it came from
    errors["unshard"] = _relative(full, o_ref)
    return {"errors": errors, "bytes": cp.last_bytes_sent, "bytes_backward": cp.last_bytes_sent_backward,
            "own_part": cp.last_own_part,
            "nonfinite_grads": not all(bool(torch.isfinite(t.grad).all()) for t in (ql, kl, vl))}


class _Marked(torch.autograd.Function):
    """The identity, noting in ``log`` when the backward pass reaches it."""

    @staticmethod
    def forward(ctx, o, lse, log):
        ctx.log = log
        return o.view_as(o), lse.view_as(lse)

    @staticmethod
    def backward(ctx, do, dlse):
        ctx.log.append("own")
        return do, dlse, None


def _backward_order(pattern: str) -> list[str]:
    """The order in which one backward pass posts the returning gradients,
    runs the own part's backward and takes the gradients in (both ranks
    have keys the other reads at n = 40, contiguous)."""
    cp = ContextParallelAttention(pattern, block=8, own_part="attention")
    x = torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, k, v = (cp.shard(x).clone().requires_grad_() for _ in range(3))
    own_part = cp._own_part

    def marked(*args):
        o, lse = own_part(*args)
        return _Marked.apply(o, lse, cp._last.log)

    cp._own_part = marked
    cp(q, k, v).sum().backward()
    return {"log": list(cp._last.log), "own_part": cp.last_own_part, "bytes_backward": cp.last_bytes_sent_backward}


def _run_model(sharding_name: str, recompute: bool) -> dict:
    """A SparseTransformer with ``context_parallel_group`` against the same
    model in one process: logits, and the parameters' gradients once each
    rank's share is summed over the group."""
    n, vocab = 45, 11
    kwargs = dict(vocab_size=vocab, dim=16, depth=2, heads=2, kv_heads=1, max_len=64, recompute=recompute,
                  patterns=["sliding_window(6)", "fixed(8, 2)"])
    if recompute:  # and score terms, learnt
        kwargs.update(sinks=True, rel_bias_distance=3, softcap=3.0)
    torch.manual_seed(0)
    whole = SparseTransformer(**kwargs, backend="reference").double()
    sharded = SparseTransformer(**kwargs, context_parallel_group=dist.group.WORLD,
                                context_parallel_sharding=sharding_name).double()
    sharded.load_state_dict(whole.state_dict())
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(vocab, (2, n), generator=g), torch.randint(vocab, (2, n), generator=g)
    logits = whole(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    cp = sharded.blocks[0].attn.context_parallel
    pos = torch.as_tensor(cp.positions(n))
    local = sharded(idx[:, pos])
    torch.nn.functional.cross_entropy(local.flatten(0, 1), targets[:, pos].flatten(), reduction="sum").backward()
    errors = {"logits": float((local - logits[:, pos]).abs().max())}
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
        dist.all_reduce(q.grad)  # each rank's share of the gradient, summed
        errors[name] = _relative(q.grad, p.grad)
    return {"errors": errors, "nonfinite_grads": False}


def _run_mistakes(rank: int) -> dict:
    """What each rank raises when one or all ranks pass wrong inputs; the
    group stays usable after each (the cases after them run)."""
    found = {}
    cp = ContextParallelAttention(HEADS_PAT)
    x = torch.randn(1, 2, 20, 4)
    mistakes = {
        "length": lambda: cp(*[x[:, :, : 10 + rank]] * 3),  # rank 1 holds 11 of 21: rank 0 should hold 11
        "dims": lambda: cp(x[0] if rank == 1 else cp.shard(x), cp.shard(x), cp.shard(x)),
        "heads": lambda: cp(*[cp.shard(torch.randn(1, 3, 20, 4))] * 3),
        "own_part": lambda: ContextParallelAttention("causal", own_part="kernels"),
    }
    for name, call in mistakes.items():
        try:
            call()
            found[name] = "nothing raised"
        except Exception as err:
            found[name] = f"{type(err).__name__}: {err}"
    return {"mistakes": found}


def _rank(rank, world_size, init_file, out_dir, cases, drawn):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=180))
    torch.set_num_threads(1)
    results = {}
    runs = [(f"{p}|{n}|{s}|{H}|{Hkv}|{dt}", p, n, s, H, Hkv, dt) for p, n, s, H, Hkv, dt in cases]
    if world_size == 2:
        runs += [(_key(case), *case) for case in TERM_CASES]
    runs += [(f"drawn{i}", p, 48 + 5 * i, ("contiguous", "zigzag")[i % 2], 2, 1, "float64")
             for i, p in enumerate(drawn)]
    if world_size == 2:  # small blocks in small chunks: each chunk of rows reads only the keys its blocks reach
        exchange.CHUNK_PAIRS = 256
    for key, *case in runs:
        try:
            results[key] = _run_case(None, *case, block=16 if world_size == 2 else 64)
        except Exception:  # every rank fails alike before its exchange (a bad pattern), or the group times out
            results[key] = {"raised": traceback.format_exc()}
    if world_size == 2:
        results["mistakes"] = _run_mistakes(rank)
        for pattern in ("sliding_window(7)", "fixed(16, 3)"):  # the own part by patterncc's attention, by chunks
            results[f"order|{pattern}"] = _backward_order(pattern)
        cp = ContextParallelAttention("sliding_window(7)")  # own_part="auto", on the CPU
        cp(*[cp.shard(torch.randn(1, 2, 40, 8))] * 3)
        results["auto"] = cp.last_own_part
    for sharding_name, recompute in (("contiguous", False), ("zigzag", True)):
        try:
            results[f"model|{sharding_name}"] = _run_model(sharding_name, recompute)
        except Exception:
            results[f"model|{sharding_name}"] = {"raised": traceback.format_exc()}
    if world_size == 4:  # two context-parallel groups of two, ranks {0, 2} and {1, 3}, as beside data parallelism
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        for case in SUBGROUP_CASES:
            try:
                results[f"subgroup|{_key(case)}"] = _run_case(groups[rank % 2], *case)
            except Exception:
                results[f"subgroup|{_key(case)}"] = {"raised": traceback.format_exc()}
        for n in BYTES_LENGTHS:
            cp = ContextParallelAttention("sliding_window(16)")
            x = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n))
            cp(cp.shard(x), cp.shard(x), cp.shard(x))
            results[f"bytes{n}"] = {"bytes": cp.last_bytes_sent, "all_gather": x[:, :, :1].nbytes * 2
                                    * (world_size - 1) * cp.shard(x).shape[2]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


GPU_CASES = [("causal", 1000, "zigzag", 4, 2, "float32"), ("sliding_window(100)", 1000, "contiguous", 4, 2, "bfloat16"),
             ("fixed(64, 8)", 777, "contiguous", 2, 1, "float64"), ("strided(32)", 500, "zigzag", 2, 2, "float16"),
             ("sliding_window(9) with softcap(2.5)", 300, "zigzag", 2, 1, "float32", ("sinks", "rel_bias"))]


def _gpu_rank(rank, world_size, init_file, out_dir):
    """NCCL ranks, one GPU each: the same comparisons on the device."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=180))
    results = {}
    for case in GPU_CASES:
        try:
            results[_key(case)] = _run_case(None, *case, device=f"cuda:{rank}")
        except Exception:
            results[_key(case)] = {"raised": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_nccl_ranks_match_the_reference(tmp_path):
    mp.spawn(_gpu_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for case in GPU_CASES:
        _check(results, _key(case), case[5])


ONE_GPU_CASES = [("sliding_window(100)", 1000, "contiguous", 4, 2, "bfloat16"),
                 ("strided(32)", 500, "contiguous", 2, 2, "float16"),
                 ("causal with alibi", 300, "zigzag", 2, 1, "float32", ("rel_bias", "sinks"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ONE_GPU_CASES, ids=lambda case: "|".join(map(str, case)))
def test_one_gpu_rank_attends_with_the_generated_kernels(tmp_path, case):
    """A group of one rank on the card: its own part is the whole attention,
    run by the generated kernels (forward, lse and every gradient, score
    terms included) and checked against the reference."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        result = _run_case(None, *case, device="cuda")
    finally:
        dist.destroy_process_group()
    assert result["own_part"] == "attention"
    _check([{"case": result}], "case", case[5])


def _spawn(tmp_path_factory, world_size: int, cases, drawn) -> list[dict]:
    """Every rank's results, from one spawn per test session: pytest-xdist
    workers share the directory above their own (its documented recipe), and
    the first to take the lock spawns the ranks for all of them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    tmp = root / f"context_parallel_{world_size}"
    with open(root / f"context_parallel_{world_size}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tmp / "done").exists():
            tmp.mkdir(exist_ok=True)
            mp.spawn(_rank, args=(world_size, str(tmp / "init"), str(tmp), cases, drawn), nprocs=world_size)
            (tmp / "done").touch()
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, CASES_2, _draw_patterns(DRAWN))


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _spawn(tmp_path_factory, 4, CASES_4, [])


def _check(results: list[dict], key: str, dtype: str):
    for rank, res in enumerate(results):
        found = res[key]
        assert "raised" not in found, f"rank {rank}: {found.get('raised')}"
        assert not found["nonfinite_grads"], f"rank {rank}: a gradient is not finite"
        for name, err in found["errors"].items():
            assert err <= TOLERANCE[dtype], f"rank {rank}: {name} is off by {err:.3g} (tolerance {TOLERANCE[dtype]})"


def _key(case):
    return "|".join(map(str, case))


@pytest.mark.parametrize("case", CASES_2, ids=_key)
def test_two_ranks_match_the_reference(ranks2, case):
    _check(ranks2, _key(case), case[-1])


DIFFERENCE_ONLY = ("causal", "sliding_window(7)", "strided(8)", "causal with alibi",
                   "sliding_window(7) with softcap(2.5)", "sliding_window(9)")


@pytest.mark.parametrize("pattern", ["sliding_window(7)", "fixed(16, 3)"])
def test_returning_gradients_travel_while_the_own_part_runs_its_backward(ranks2, pattern):
    """The remote part's backward posts the gradients going back to their
    owners; the own part's backward runs; then the received ones are added."""
    for res in ranks2:
        found = res[f"order|{pattern}"]
        assert found["log"] == ["posted", "own", "arrived"], found
        assert found["bytes_backward"] > 0
    assert {res[f"order|{pattern}"]["own_part"] for res in ranks2} == {
        "attention" if pattern.startswith("sliding") else "chunks"}


def test_off_the_gpu_the_own_part_is_chunks_by_default(ranks2):
    """``own_part="auto"``: the float32 chunks on the CPU, where they are
    about ten times faster than the float64 reference."""
    assert [res["auto"] for res in ranks2] == ["chunks", "chunks"]


def test_the_own_part_is_patterncc_attention_where_it_can_be(ranks2):
    """With ``own_part="attention"``, a rank holding one run of positions under
    a pattern of ``q - k`` alone attends to its own keys with patterncc's
    attention on the shard; the
    others (zigzag's outer ranks, positional patterns, a rank without queries) use the
    masked chunks. Both ways are checked against the reference above."""
    ways = set()
    for case in CASES_2 + TERM_CASES:
        pattern, n, sharding_name = case[:3]
        for rank, res in enumerate(ranks2):
            pos = sharding.positions(n, 2, rank, sharding_name)
            one_run = pos.size > 0 and pos[-1] - pos[0] + 1 == pos.size  # zigzag's middle rank holds one too
            fits = pattern in DIFFERENCE_ONLY and one_run
            assert res[_key(case)]["own_part"] == ("attention" if fits else "chunks"), (case, rank)
            ways.add(res[_key(case)]["own_part"])
    assert ways == {"attention", "chunks"}


@pytest.mark.parametrize("case", TERM_CASES, ids=_key)
def test_two_ranks_match_the_reference_with_score_terms(ranks2, case):
    _check(ranks2, _key(case), case[5])


@pytest.mark.parametrize("index", range(DRAWN))
def test_two_ranks_match_the_reference_on_drawn_patterns(ranks2, index):
    _check(ranks2, f"drawn{index}", "float64")


@pytest.mark.parametrize("sharding_name", sharding.SHARDINGS)
def test_a_transformer_trains_across_ranks(ranks2, ranks4, sharding_name):
    _check(ranks2, f"model|{sharding_name}", "float64")
    _check(ranks4, f"model|{sharding_name}", "float64")


@pytest.mark.parametrize("case", CASES_4, ids=_key)
def test_four_ranks_match_the_reference(ranks4, case):
    _check(ranks4, _key(case), case[-1])


@pytest.mark.parametrize("case", SUBGROUP_CASES, ids=_key)
def test_subgroups_of_ranks_match_the_reference(ranks4, case):
    _check(ranks4, f"subgroup|{_key(case)}", case[-1])


def test_a_sliding_window_sends_the_same_bytes_at_any_length(ranks4):
    for rank, res in enumerate(ranks4):
        short, long = (res[f"bytes{n}"] for n in BYTES_LENGTHS)
        assert short["bytes"] == long["bytes"], f"rank {rank} sent {short['bytes']} then {long['bytes']} bytes"
        assert long["bytes"] < long["all_gather"] / 4
        if rank < 3:  # every rank but the last sends its halo to the next
            assert short["bytes"] > 0
            assert short["bytes"] < short["all_gather"]


def test_wrong_inputs_on_any_rank_stop_every_rank(ranks2):
    first, second = (res["mistakes"]["mistakes"] for res in ranks2)
    for found in (first, second):
        assert found["length"].startswith("ValueError: rank 0 holds 10 tokens, but contiguous sharding of n=21")
        assert found["heads"].startswith("HeadsError") and "heads=3" in found["heads"]
        assert found["own_part"] == "ValueError: own_part='kernels' is not one of 'auto', 'attention', 'chunks'"
    assert first["dims"] == ("ValueError: the inputs of rank 1 are wrong (that rank's own error says how), "
                             "so every rank stops")
    assert second["dims"].startswith("ValueError: q_local must be [B, H, n_local, D] (4 dims), got shape (2, 20, 4)")


def test_the_exchange_moves_gradients_back(ranks2):
    """Backward traffic mirrors the forward's: a rank sends back as many
    gradient bytes as it received key/value bytes."""
    for key in ("causal|61|contiguous|2|1|float64", "fixed(16, 3)|100|zigzag|2|1|float64"):
        sent = [res[key]["bytes"] for res in ranks2]
        back = [res[key]["bytes_backward"] for res in ranks2]
        assert back == sent[::-1]


# -- without ranks: shardings and key sets


@pytest.mark.parametrize("name", sharding.SHARDINGS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 61, 64, 100])
def test_a_sharding_partitions_the_positions(name, world_size, n):
    held = [sharding.positions(n, world_size, r, name) for r in range(world_size)]
    assert np.array_equal(np.sort(np.concatenate(held)), np.arange(n))
    assert all(np.all(np.diff(pos) > 0) for pos in held)
    lengths = [len(pos) for pos in held]
    assert lengths == [sharding.local_length(n, world_size, r, name) for r in range(world_size)]
    assert max(lengths) - min(lengths) <= 2
    assert sharding.seq_len_from(lengths, world_size, name) == n


def test_zigzag_balances_causal_work():
    n, P = 4096, 4
    work = lambda pos: int((pos + 1).sum())  # causal: query q reads q + 1 keys
    zig = [work(sharding.positions(n, P, r, "zigzag")) for r in range(P)]
    flat = [work(sharding.positions(n, P, r, "contiguous")) for r in range(P)]
    assert max(zig) / min(zig) < 1.01
    assert max(flat) / min(flat) > 5


def test_a_wrong_local_length_is_named():
    with pytest.raises(ValueError, match="rank 0 holds 4 tokens"):
        sharding.seq_len_from([4, 5], 2, "contiguous")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(strategies.patterns(max_depth=2, max_leaves=4, heads=2))
def test_needed_keys_cover_every_allowed_pair(p):
    """A rank gathers every key its queries may read, and each chunk of its
    rows reads every key those rows may read (chunks forced small)."""
    n, P = 45, 3
    mask = pcc.mask(p, seq_len=n, heads=2).any(axis=0)  # (n, n): any head
    for name in sharding.SHARDINGS:
        for r in range(P):
            qpos = sharding.positions(n, P, r, name)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(exchange, "CHUNK_PAIRS", 40)
                plan = exchange.exchange_plan(p, n, 2, P, r, name, block=8)
            keys = plan.positions
            exact = np.flatnonzero(mask[qpos].any(axis=0))
            assert np.all(np.isin(exact, keys)), f"rank {r} misses keys {np.setdiff1d(exact, keys)}"
            assert np.array_equal(keys, needed_keys(p, n, 2, qpos, block=8))
            rows = plan.chunks[:, :2]
            assert rows[0, 0] == 0 and rows[-1, 1] == len(qpos) and np.array_equal(rows[1:, 0], rows[:-1, 1])
            for r0, r1, a, b in plan.chunks:
                reads = np.flatnonzero(mask[qpos[r0:r1]].any(axis=0))
                assert np.all(np.isin(reads, keys[a:b])), f"rows {r0}:{r1} miss {np.setdiff1d(reads, keys[a:b])}"


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(strategies.patterns(max_depth=2, max_leaves=4, heads=2))
def test_own_and_remote_keys_split_the_gathered_ones(p):
    """The overlapped exchange attends to a rank's own keys, then to the
    others': the two lists partition the gathered keys, the own ones are
    the rank's rows ``send[rank]``, the received rows in ``order`` are the
    remote ones, and each chunk reads in the two lists exactly the keys
    its span held in the one."""
    n, P = 45, 3
    for name in sharding.SHARDINGS:
        held = [sharding.positions(n, P, r, name) for r in range(P)]
        plans = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(exchange, "CHUNK_PAIRS", 40)
            plans = [exchange.exchange_plan(p, n, 2, P, r, name, block=8) for r in range(P)]
        for r, plan in enumerate(plans):
            own, own_chunks = plan.own_keys()
            remote, remote_chunks, order = plan.remote_keys()
            assert np.array_equal(np.sort(np.concatenate([own, remote])), plan.positions)
            assert np.array_equal(own, held[r][plan.send[r]])
            sent = np.concatenate([held[s][plans[s].send[r]] for s in range(P) if s != r] + [np.zeros(0, np.int64)])
            assert np.array_equal(sent[order], remote)
            for whole, mine, theirs in zip(plan.chunks, own_chunks, remote_chunks):
                assert np.array_equal(whole[:2], mine[:2]) and np.array_equal(whole[:2], theirs[:2])
                joined = np.sort(np.concatenate([own[mine[2]:mine[3]], remote[theirs[2]:theirs[3]]]))
                assert np.array_equal(joined, plan.positions[whole[2]:whole[3]])


def test_chunks_that_read_no_key_run_as_one():
    from patterncc.distributed.exchange import coalesced

    chunks = np.array([[0, 4, 0, 0], [4, 8, 0, 0], [8, 12, 3, 9], [12, 16, 5, 5], [16, 20, 0, 0], [20, 21, 1, 2]])
    assert coalesced(chunks).tolist() == [[0, 8, 0, 0], [8, 12, 3, 9], [12, 20, 0, 0], [20, 21, 1, 2]]
    assert coalesced(np.zeros((1, 4), dtype=np.int64)).tolist() == [[0, 0, 0, 0]]  # a rank without queries
    assert coalesced(chunks[2:3]).tolist() == [[8, 12, 3, 9]]


@pytest.mark.parametrize("n", [512, 4096])
def test_key_sets_follow_the_pattern(n):
    """Contiguous sharding over 4 ranks, block 16: a window's halo does not
    grow with n, fixed reads its summary columns only, strided every earlier key."""
    held = [sharding.positions(n, 4, r, "contiguous") for r in range(4)]
    count = lambda pat: [len(k) for k in exchange.needed_keys_all(pcc.parse(pat), n, 1, held, 16)]
    local = n // 4
    assert count("sliding_window(16)") == [local] + [local + 16] * 3
    assert count("strided(32)") == [local * (r + 1) for r in range(4)]
    assert count("fixed(32, 4)") == [local + r * local // 32 * 4 for r in range(4)]  # c = 4 of every l = 32


def test_without_a_process_group_it_says_so():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ContextParallelAttention("causal")
    with pytest.raises(RuntimeError, match="init_process_group"):
        SparseSelfAttention(16, 2, "causal", context_parallel_group=object())


def test_a_context_parallel_layer_needs_a_pattern():
    with pytest.raises(ValueError, match="needs a pattern"):
        SparseSelfAttention(16, 2, None, context_parallel_group=object())


@pytest.mark.parametrize("pat", ["causal", "sliding_window(5)", "longformer(3, 2)"])
def test_without_any_layout_the_keys_are_still_a_superset(monkeypatch, pat):
    """When no layout can be built (causal at a million tokens is over the
    layout's limit) the keys fall back to everything the queries may reach."""
    def refuse(*args, **kwargs):
        raise pcc.LimitError("too many blocks")

    monkeypatch.setattr(exchange, "build_layout", refuse)
    monkeypatch.setattr(exchange, "build_plan", refuse)
    n, P = 40, 4
    mask = pcc.mask(pat, seq_len=n)[0]
    for r in range(P):
        qpos = sharding.positions(n, P, r, "zigzag")
        keys = needed_keys(pcc.parse(pat), n, 1, qpos, block=8)
        assert np.all(np.isin(np.flatnonzero(mask[qpos].any(axis=0)), keys))
        if pat != "longformer(3, 2)":  # causal: nothing past the last query
            assert keys.max() == qpos.max()
