"""Patterns are sets of (h, q, k): the set-algebra laws hold on their masks and,
because layouts are exact, on their block layouts too."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

import patterncc as pcc
from patterncc.testing import patterns

SMALL = patterns(max_depth=2, max_leaves=3, heads=2)
LENGTH = st.integers(1, 40)


def same(a, b, n, heads=2, block=8):
    np.testing.assert_array_equal(pcc.mask(a, n, heads), pcc.mask(b, n, heads), err_msg=f"{a}  vs  {b}")
    np.testing.assert_array_equal(classes(a, n, block, heads), classes(b, n, block, heads), err_msg=f"{a}  vs  {b}")


def classes(p, n, block, heads):
    """The layout's classes for every head (a head-free layout stores one)."""
    dense = pcc.layout(p, n, block, heads).to_dense()
    return np.broadcast_to(dense, (heads,) + dense.shape[1:])


@settings(max_examples=60, deadline=None)
@given(a=SMALL, b=SMALL, n=LENGTH)
def test_de_morgan(a, b, n):
    same(~(a | b), ~a & ~b, n)
    same(~(a & b), ~a | ~b, n)


@settings(max_examples=60, deadline=None)
@given(a=SMALL, b=SMALL, c=SMALL, n=LENGTH)
def test_distributivity(a, b, c, n):
    same(a & (b | c), (a & b) | (a & c), n)
    same(a | (b & c), (a | b) & (a | c), n)


@settings(max_examples=60, deadline=None)
@given(a=SMALL, b=SMALL, n=LENGTH)
def test_difference_commutativity_absorption(a, b, n):
    same(a - b, a & ~b, n)
    same(a | b, b | a, n)
    same(a & b, b & a, n)
    same(a | (a & b), a, n)
    same(~~a, a, n)
    same(a | a, a, n)


def test_python_operators_follow_python_precedence():
    a, b, c = pcc.parse("causal"), pcc.parse("local(3)"), pcc.parse("stride(4)")
    # ~ tightest, then -, then &, then |, left-associative, as for Python sets
    assert pcc.parse("causal | local(3) & stride(4)") == a | (b & c)
    assert pcc.parse("causal - local(3) - stride(4)") == (a - b) - c
    assert pcc.parse("~causal & local(3)") == (~a) & b
    assert pcc.parse("causal & local(3) - stride(4)") == a & (b - c)
