"""Dense float64 attention for one (batch, head): every score is computed, and
the mask decides which ones count. For short sequences only (``n * n`` work
and memory per head).

Shapes, all float64: ``q``, ``k``, ``v``, ``o``, ``do`` ``(n, D)``; ``lse``,
``dlse`` ``(n,)``; ``mask`` bool ``(n, n)``, ``mask[i, j]`` True when query
``i`` may attend to key ``j``. ``terms`` are the head's score terms
(``terms.py``).
"""

from __future__ import annotations

import numpy as np

from .terms import NO_TERMS, HeadTerms, logsumexp_rows, score_grads, scores


def forward_head(mask, q, k, v, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(o, lse)``; a row with no allowed key gets ``o = 0`` and
    ``lse = -inf`` (``lse = sink`` with a sink)."""
    s = np.where(mask, scores(scale * (q @ k.T), _diff(q.shape[0]), terms), -np.inf)  # (n, n)
    lse = logsumexp_rows(s, terms.sink)  # (n,)
    return _probabilities(s, lse) @ v, lse


def backward_head(mask, q, k, v, o, lse, do, dlse, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(dq, dk, dv, d_slope, d_bias)`` with the probabilities
    recomputed from ``lse``; ``d_slope`` and ``d_bias`` are None when the term
    is absent. (The sink's gradient needs only ``o``, ``lse`` and ``do``:
    ``attention.py`` computes it.)

    ``dlse`` (or None) is the gradient reaching ``lse`` directly: since
    ``d lse / d s = p``, it adds ``p * dlse`` to ``ds``.
    """
    raw, diff = scale * (q @ k.T), _diff(q.shape[0])  # (n, n) each
    p = _probabilities(np.where(mask, scores(raw, diff, terms), -np.inf), lse)  # (n, n)
    delta = np.sum(do * o, axis=1)  # (n,)
    if dlse is not None:
        delta = delta - dlse
    ds = p * (do @ v.T - delta[:, None])  # (n, n): d loss / d score
    ds, d_slope, d_bias = score_grads(ds, raw, diff, terms)
    dq = scale * (ds @ k)
    dk = scale * (ds.T @ q)
    dv = p.T @ do
    return dq, dk, dv, d_slope, d_bias


def _probabilities(s, lse):
    finite_lse = np.where(np.isfinite(lse), lse, 0.0)  # rows with no key: s is all -inf
    return np.exp(s - finite_lse[:, None])


def _diff(n: int) -> np.ndarray:
    """``q - k`` for every pair: int64 ``(n, n)``."""
    pos = np.arange(n)
    return pos[:, None] - pos[None, :]
