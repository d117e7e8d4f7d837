"""Dense float64 attention for one (batch, head): every score is computed, and
the mask decides which ones count. For short sequences only (``n * n`` work
and memory per head).

Shapes, all float64: ``q``, ``o``, ``do`` ``(n_q, D)``; ``k``, ``v``
``(n_k, D)``; ``lse``, ``dlse`` ``(n_q,)``; ``mask`` bool ``(n_q, n_k)``,
``mask[i, j]`` True when query ``i`` may attend to key ``j``.
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
    return p @ v, lse


def backward_head(mask, q, k, v, o, lse, do, dlse, scale):
    """Return ``(dq, dk, dv)`` with the probabilities recomputed from ``lse``.

    ``dlse`` (or None) is the gradient reaching ``lse`` directly: since
    ``d lse / d s = p``, it adds ``p * dlse`` to ``ds``.
    """
    p = probabilities(mask, q, k, lse, scale)  # (n, n)
    delta = np.sum(do * o, axis=1)  # (n,)
    if dlse is not None:
        delta = delta - dlse
    ds = p * (do @ v.T - delta[:, None])  # (n, n)
    dq = scale * (ds @ k)
    dk = scale * (ds.T @ q)
    dv = p.T @ do
    return dq, dk, dv


def probabilities(mask, q, k, lse, scale):
    """``p = exp(s - lse)`` on allowed pairs, 0 elsewhere (and on rows with no key)."""
    finite_lse = np.where(np.isfinite(lse), lse, 0.0)
    s = np.where(mask, scale * (q @ k.T) - finite_lse[:, None], -np.inf)
    return np.exp(s)
