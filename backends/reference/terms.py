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
    masked pairs): ``sink`` for a row with no key, ``-inf`` without a sink."""
    m = s.max(axis=1)  # -inf on a row with no key
    if sink is not None:
        m = np.maximum(m, sink)
    safe = np.where(np.isfinite(m), m, 0.0)  # no inf - inf below
    total = np.exp(s - safe[:, None]).sum(axis=1)
    if sink is not None:
        total = total + np.exp(sink - safe)
    return np.where(total > 0, safe + np.log(np.where(total > 0, total, 1.0)), -np.inf)
