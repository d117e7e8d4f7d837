"""How far a NaN travels: exactly as far as exact arithmetic says in the
reference backend; in the Triton kernels never past the tiles that hold it
and never into a row with no allowed key (README, "NaN and inf")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patterncc as pcc

# Rows q % 7 == 3 have no allowed key.
PATTERN = "causal & local(16) & (where q % 7 != 3)"


def _inputs(n, D, nan_at, where="v", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 0, nan_at, 0] = float("nan")
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _nan_rows(x) -> set[int]:
    return set(torch.isnan(x[0, 0].float()).any(-1).nonzero().ravel().tolist())


def _run(attn, q, k, v):
    o, lse = attn(q, k, v, return_lse=True)
    (o.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    return o, lse


@pytest.mark.parametrize("where", ["v", "k"])
@pytest.mark.parametrize("n", [64, 520])  # dense and sparse reference paths
def test_reference_nan_reaches_exactly_the_rows_that_attend_it(where, n):
    t = 40 if n == 64 else 300
    attn = pcc.compile(PATTERN, backend="reference", dense_limit=128)
    q, k, v = _inputs(n, 8, t, where)
    o, lse = _run(attn, q, k, v)
    mask = pcc.mask(PATTERN, seq_len=n)[0]
    readers = set(np.flatnonzero(mask[:, t]).tolist())  # rows that attend key t
    # keys whose gradient involves a reader's (NaN) softmax row
    touched = set(np.flatnonzero(mask[sorted(readers)].any(axis=0)).tolist())
    assert _nan_rows(o) == readers and _nan_rows(q.grad) == readers
    if where == "v":
        assert torch.isnan(o[0, 0, :, 1:]).sum() == 0  # only the NaN's own dimension
        assert not torch.isnan(lse).any() and _nan_rows(v.grad) == set()
    else:
        assert set(torch.isnan(lse[0, 0]).nonzero().ravel().tolist()) == readers
        assert _nan_rows(v.grad) == touched
    assert _nan_rows(k.grad) == touched
    # everything else is the NaN-free answer: replace the NaN and compare
    clean = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with torch.no_grad():
        clean["qkv".index(where)][0, 0, t, 0] = 0.0
    o2, lse2 = _run(attn, *clean)
    keep = sorted(set(range(n)) - readers)
    torch.testing.assert_close(o[0, 0, keep], o2[0, 0, keep], rtol=0, atol=0)
    torch.testing.assert_close(q.grad[0, 0, keep], clean[0].grad[0, 0, keep], rtol=0, atol=0)
    empty = ~mask.any(axis=1)
    assert (o[0, 0, empty] == 0).all() and (lse[0, 0, empty] == -np.inf).all() and (q.grad[0, 0, empty] == 0).all()


@pytest.mark.parametrize("where", ["v", "k"])
def test_triton_nan_stays_in_the_tiles_that_hold_it(where):
    pytest.importorskip("triton")
    from patterncc.backends.triton import KernelConfig
    from patterncc.testing import available_backends

    if available_backends()["triton"] is not None:
        pytest.skip(available_backends()["triton"])
    n, t = 200, 70
    # Query tiles of 32 over layout blocks of 16: the bound is per kernel tile, not per block.
    config = KernelConfig(block=16, block_m=32, block_n=16, block_m1=16, block_n1=32, block_m2=32, block_n2=16,
                          fwd_stages=1, bwd_stages=1)
    G = max(config.block, config.block_m, config.block_n, config.block_m1, config.block_n1,
            config.block_m2, config.block_n2)  # every kernel tile lies inside one G x G cell
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = pcc.compile(PATTERN, backend="triton", config=config, plan="natural")
    q, k, v = (x.detach().to(device).requires_grad_() for x in _inputs(n, 16, t, where, torch.float32))
    o, lse = _run(attn, q, k, v)
    lay = pcc.layout(PATTERN, seq_len=n, block=G).to_dense()[0]  # [query cell, key cell]
    mask = pcc.mask(PATTERN, seq_len=n)[0]
    empty = set(np.flatnonzero(~mask.any(axis=1)).tolist())
    near = lay[:, t // G] > 0  # query cells whose tiles may walk the NaN's key step
    rows = {i for i in range(n) if near[i // G]} - empty
    key_cells = lay[near].any(axis=0)  # key cells such query cells walk
    keys = {j for j in range(n) if key_cells[j // G]}
    assert _nan_rows(o) <= rows and _nan_rows(q.grad) <= rows
    assert _nan_rows(k.grad) <= keys and _nan_rows(v.grad) <= keys
    readers = set(np.flatnonzero(mask[:, t]).tolist())
    assert readers <= _nan_rows(o) and len(rows) < n // 2  # the rows that attend it see it; most rows do not
    e = sorted(empty)
    assert (o[0, 0, e] == 0).all() and (lse[0, 0, e] == -np.inf).all() and (q.grad[0, 0, e] == 0).all()
