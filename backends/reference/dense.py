"""Dense float64 attention for one (batch, head): every score is computed, and
the mask decides which ones count. For short sequences only (``n * n`` work
and memory per head).

Shapes, all float64: ``q``, ``o``, ``do`` ``(n_q, D)``; ``k``, ``v``
``(n_k, D)``; ``lse``, ``dlse`` ``(n_q,)``; ``mask`` bool ``(n_q, n_k)``,
``mask[i, j]`` True when query ``i`` may attend to key ``j``.
Every product runs over the allowed pairs only (``masked_matmul``), so a NaN
or inf in ``q``, ``k``, ``v`` or ``do`` reaches exactly what exact
arithmetic says it reaches: the rows that attend it and their gradients,
never a row that does not, through a ``0 * NaN`` of a masked pair.
"""

from __future__ import annotations

import numpy as np


def forward_head(mask, q, k, v, scale):
    """Return ``(o, lse)``; a row with no allowed key gets ``o = 0``, ``lse = -inf``."""
    has_key = mask.any(axis=1)  # (n,)
    s = np.where(mask, scale * (q @ k.T), -np.inf)  # (n, n)
    # Rows without a key keep a max of 0, so exp(-inf - 0) = 0 and no inf - inf.
    m = np.where(has_key, s.max(axis=1), 0.0)  # (n,)
    p = np.exp(s - m[:, None])  # (n, n), 0 where masked
    row_sum = np.where(has_key, p.sum(axis=1), 1.0)  # >= 1 where there is a key
    p /= row_sum[:, None]
    lse = np.where(has_key, m + np.log(row_sum), -np.inf)
    return masked_matmul(p, mask, v), lse


def backward_head(mask, q, k, v, o, lse, do, dlse, scale):
    """Return ``(dq, dk, dv)`` with the probabilities recomputed from ``lse``.

    ``dlse`` (or None) is the gradient reaching ``lse`` directly: since
    ``d lse / d s = p``, it adds ``p * dlse`` to ``ds``.
    """
    p = probabilities(mask, q, k, lse, scale)  # (n, n)
    delta = np.sum(do * o, axis=1)  # (n,)
    if dlse is not None:
        delta = delta - dlse
    ds = np.where(mask, p * (do @ v.T - delta[:, None]), 0.0)  # (n, n)
    dq = scale * masked_matmul(ds, mask, k)
    dk = scale * masked_matmul(ds.T, mask.T, q)
    dv = masked_matmul(p.T, mask.T, do)
    return dq, dk, dv


def probabilities(mask, q, k, lse, scale):
    """``p = exp(s - lse)`` on allowed pairs, 0 elsewhere (and on rows with no key)."""
    finite_lse = np.where(lse == -np.inf, 0.0, lse)  # a NaN lse stays: its row attends a NaN
    s = np.where(mask, scale * (q @ k.T) - finite_lse[:, None], -np.inf)
    return np.exp(s)


def masked_matmul(a, mask, b):
    """``sum_j a[i, j] * b[j]`` over the allowed ``j`` of each row ``i`` (``a``
    is 0 off the mask): ``a @ b``, except that a non-finite ``b[j, d]`` reaches
    only the rows allowed to read it, where ``a @ b`` would spread it to every
    row as ``0 * inf = NaN``."""
    bad = ~np.isfinite(b)
    if not bad.any():
        return a @ b
    out = a @ np.where(bad, 0.0, b)
    for j in np.flatnonzero(bad.any(axis=1)):
        rows = mask[:, j]
        out[rows] += a[rows, j, None] * np.where(bad[j], b[j], 0.0)
    return out
