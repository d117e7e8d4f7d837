"""The score terms of one head, in float64, for the dense and the sparse path.

Both paths hold their raw scores ``raw = scale * q.k`` next to ``diff = q - k``
(absolute positions) in arrays of one shape: ``(n, n)`` for the dense path,
``(pairs,)`` for the sparse one. ``scores`` turns raw scores into the scores
the softmax sees; ``score_grads`` takes the gradient with respect to those
back to the raw scores and to the learnable terms (patterncc/scores.py has the
formulas).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class HeadTerms(NamedTuple):
    """One query head's terms; None: absent."""

    softcap: float | None = None
    slope: float | None = None  # alibi: s -= slope * abs(q - k)
    sink: float | None = None  # exp(sink) joins the row's softmax denominator
    bias: np.ndarray | None = None  # float64 (2 * M + 1,): s += bias[clamp(q - k, -M, M) + M]


NO_TERMS = HeadTerms()


def scores(raw: np.ndarray, diff: np.ndarray, t: HeadTerms) -> np.ndarray:
    """The scores the softmax sees: softcap, then alibi, then the relative bias."""
    s = raw if t.softcap is None else t.softcap * np.tanh(raw / t.softcap)
    if t.slope is not None:
        s = s - t.slope * np.abs(diff)
    if t.bias is not None:
        s = s + t.bias[bucket(diff, t.bias)]
    return s


def score_grads(ds: np.ndarray, raw: np.ndarray, diff: np.ndarray, t: HeadTerms):
    """``(ds_raw, d_slope, d_bias)`` from ``ds``, the gradient with respect to
    the scores; ``ds`` is 0 on masked pairs. ``d_bias`` sums each bucket with
    ``np.bincount``, in a fixed order."""
    d_slope = None if t.slope is None else -float(np.sum(ds * np.abs(diff)))
    d_bias = None
    if t.bias is not None:
        d_bias = np.bincount(bucket(diff, t.bias).ravel(), weights=ds.ravel(), minlength=t.bias.size)
    if t.softcap is not None:
        ds = ds * (1.0 - np.tanh(raw / t.softcap) ** 2)
    return ds, d_slope, d_bias


def bucket(diff: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``clamp(q - k, -M, M) + M`` with ``M = (len(bias) - 1) / 2``."""
    m = (bias.size - 1) // 2
    return np.clip(diff, -m, m) + m


def logsumexp_rows(s: np.ndarray, sink: float | None) -> np.ndarray:
    """Row-wise ``log(sum(exp(s)) + exp(sink))`` of ``s`` ``(n, n)`` (``-inf`` on
    masked pairs): ``sink`` for a row with no key, ``-inf`` without a sink;
    NaN on a row whose scores hold a NaN (it reaches that row's ``lse``)."""
    m = s.max(axis=1)  # -inf on a row with no key, NaN on a row with a NaN score
    if sink is not None:
        m = np.maximum(m, sink)
    safe = np.where(m == -np.inf, 0.0, m)  # no -inf - -inf below; a NaN stays NaN
    total = np.exp(s - safe[:, None]).sum(axis=1)
    if sink is not None:
        total = total + np.exp(sink - safe)
    # A row with a key (or a sink) sums to >= 1 (its max gives exp(0)); only a
    # row with neither sums to exactly 0. A NaN total is no row without keys.
    empty = total == 0
    return np.where(empty, -np.inf, safe + np.log(np.where(empty, 1.0, total)))
