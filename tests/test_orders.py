"""Token orders (patterncc.orders): their numpy positions, inverse and slot
counts agree with each other, with the planner's IR expression, and with the
kernels' ``_token``, which runs here under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernel_env import interpreter_and_cache  # noqa: F401  (fixture: the interpreter for this file)
from patterncc import ir, masks
from patterncc.orders import NATURAL, ORDERS, Columns, Natural, Residue, SlotOrder, TokenOrder

# every kind, with parameters that leave padding slots and short last runs
ORDERS_UNDER_TEST = [NATURAL, Residue(2), Residue(5), Residue(16), Columns(4, 1), Columns(7, 3), Columns(8, 8)]
LENGTHS = [1, 2, 7, 16, 37, 100]


def test_every_kind_is_tested():
    assert {type(o) for o in ORDERS_UNDER_TEST} == set(ORDERS.values())
    assert len({cls.CODE for cls in ORDERS.values()}) == len(ORDERS)


def _pair(order: TokenOrder) -> tuple[TokenOrder, TokenOrder]:
    """The (query, key) pair a plan gives an order: columns gather keys alone."""
    return (NATURAL, order) if isinstance(order, Columns) else (order, order)


@pytest.mark.parametrize("order", ORDERS_UNDER_TEST, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_positions_inverse_and_counts_agree(order, n):
    t = np.arange(order.length(n))
    p = order.positions(t, n)
    real = p >= 0
    assert np.all(p < n) and len(np.unique(p[real])) == real.sum(), "a token in two slots"
    assert real.sum() == order.filled(n)
    tokens = np.arange(n)
    slots = order.slots(tokens, n)
    assert np.array_equal(np.sort(slots[slots >= 0]), t[real]), "slots is not the inverse of positions"
    assert np.array_equal(slots[p[real]], t[real])
    assert np.all(slots >= 0) or not order.COVERS, "an order that covers every token left one out"
    if isinstance(order, Columns):  # the gathered tokens come first, in order
        assert np.array_equal(p[: order.filled(n)], tokens[tokens % order.l >= order.l - order.c])
        assert np.array_equal(order.count_before(tokens), np.searchsorted(p[real], tokens))
    assert TokenOrder.of((order.kind, *(getattr(order, f.name) for f in dataclasses.fields(order)))) == order


@pytest.mark.parametrize("order", ORDERS_UNDER_TEST, ids=str)
@pytest.mark.parametrize("n", [7, 37])
def test_the_position_expression_agrees_with_positions(order, n):
    """The planner's expression over slots, at a constant class size and at
    the kernels' runtime one (``max(n // l, 1)`` over the slot count)."""
    t = np.arange(order.length(n))
    real = order.positions(t, n) >= 0
    S = order.classes(n)
    runtime_S = ir.Call("max", (ir.BinOp("//", ir.Var("n"), ir.Const(order.l)), ir.Const(1)))
    for S_expr, at in ((S, n), (runtime_S, order.length(n))):
        same = ir.Where(ir.Compare("==", order.position_expr("q", S_expr), ir.Var("k")))
        got = masks.evaluate(same, t[:, None], order.positions(t, n)[:, None], at)[:, 0]
        assert got[real].all(), f"{order} at n={n}, S={S_expr}"


@pytest.mark.parametrize("order", ORDERS_UNDER_TEST, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_the_kernels_token_agrees_with_positions(order, n):
    """kernels._token with the codes and parameters SlotOrder gives it: each
    slot's token is the numpy position, and padding slots land past the
    tokens, where the kernels mask them (``tok < N_TOK``)."""
    triton = pytest.importorskip("triton")
    tl = triton.language
    from patterncc.backends.triton.runtime import TritonAttention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = TritonAttention(ir.Causal())
    module = attn.kernels(64, attn.config_for(16, torch.float32), device)  # _token as generated modules hold it
    globals()["_token_under_test"] = module._token  # a global of this module, as Triton resolves names

    @triton.jit
    def tokens_of(OUT, N, ORDER: tl.constexpr, L, S, C, BLOCK: tl.constexpr):
        slot = tl.arange(0, BLOCK)
        tl.store(OUT + slot, _token_under_test(slot, ORDER, L, S, C), mask=slot < N)  # noqa: F821

    q_order, k_order = _pair(order)
    so = SlotOrder.of(q_order, k_order, n)
    code = so.k if isinstance(order, Columns) else so.q
    assert code == order.code and (so.covers_queries, so.covers_keys) == (q_order.COVERS, k_order.COVERS)
    slots = order.length(n)
    out = torch.full((slots,), -7, dtype=torch.int32, device=device)
    tokens_of[(1,)](out, slots, code, so.l, so.S, so.c, BLOCK=triton.next_power_of_2(slots))
    got = out.cpu().numpy().astype(np.int64)
    assert np.array_equal(np.where(got < n, got, -1), order.positions(np.arange(slots), n)), f"{order} at n={n}"


def test_natural_is_the_default_order():
    assert Natural() == NATURAL and not NATURAL.reordered and SlotOrder() == SlotOrder.of(NATURAL, NATURAL, 1)
