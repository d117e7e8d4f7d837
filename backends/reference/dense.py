"""Dense float64 attention for one (batch, head): every score is computed, and
the mask decides which ones count. For short sequences only (``n * n`` work
and memory per head).

Shapes, all float64: ``q``, ``o``, ``do`` ``(n_q, D)``; ``k``, ``v``
``(n_k, D)``; ``lse``, ``dlse`` ``(n_q,)``; ``mask`` bool ``(n_q, n_k)``,
``mask[i, j]`` True when query ``i`` may attend to key ``j``; the queries are
the last ``n_q`` positions. ``terms`` are the head's score terms (``terms.py``).

Every product runs over the allowed pairs only (``masked_matmul``), so a NaN
or inf in ``q``, ``k``, ``v`` or ``do`` reaches exactly what exact
arithmetic says it reaches: the rows that attend it and their gradients,
never a row that does not, through a ``0 * NaN`` of a masked pair.
"""

from __future__ import annotations

import numpy as np

from .terms import NO_TERMS, HeadTerms, logsumexp_rows, score_grads, scores


def forward_head(mask, q, k, v, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(o, lse)``; a row with no allowed key gets ``o = 0`` and
    ``lse = -inf`` (``lse = sink`` with a sink)."""
    s = np.where(mask, scores(scale * (q @ k.T), _diff(*mask.shape), terms), -np.inf)  # (n_q, n_k)
    lse = logsumexp_rows(s, terms.sink)  # (n_q,)
    return masked_matmul(_probabilities(s, lse), mask, v), lse


def backward_head(mask, q, k, v, o, lse, do, dlse, scale, terms: HeadTerms = NO_TERMS):
    """Return ``(dq, dk, dv, d_slope, d_bias)`` with the probabilities
    recomputed from ``lse``; ``d_slope`` and ``d_bias`` are None when the term
    is absent. (The sink's gradient needs only ``o``, ``lse`` and ``do``:
    ``attention.py`` computes it.)

    ``dlse`` (or None) is the gradient reaching ``lse`` directly: since
    ``d lse / d s = p``, it adds ``p * dlse`` to ``ds``.
    """
    raw, diff = scale * (q @ k.T), _diff(*mask.shape)  # (n_q, n_k) each
    p = _probabilities(np.where(mask, scores(raw, diff, terms), -np.inf), lse)  # (n_q, n_k)
    delta = np.sum(do * o, axis=1)  # (n_q,)
    if dlse is not None:
        delta = delta - dlse
    ds = np.where(mask, p * (do @ v.T - delta[:, None]), 0.0)  # (n_q, n_k): d loss / d score
    ds, d_slope, d_bias = score_grads(ds, raw, diff, terms)
    dq = scale * masked_matmul(ds, mask, k)
    dk = scale * masked_matmul(ds.T, mask.T, q)
    dv = masked_matmul(p.T, mask.T, do)
    return dq, dk, dv, d_slope, d_bias


def _probabilities(s, lse):
    """``exp(s - lse)``, 0 on masked pairs (``s = -inf``) whatever the row's
    ``lse``: a row that reads a NaN has a NaN ``lse``, which must not reach the
    keys it does not attend (through their ``dk``, ``dv``)."""
    finite_lse = np.where(lse == -np.inf, 0.0, lse)  # rows with no key (s all -inf)
    return np.where(s == -np.inf, 0.0, np.exp(s - finite_lse[:, None]))


def _diff(n_q: int, n_k: int) -> np.ndarray:
    """``q - k`` for every pair, the queries the last ``n_q`` positions: int64 ``(n_q, n_k)``."""
    return np.arange(n_k - n_q, n_k)[:, None] - np.arange(n_k)[None, :]


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
