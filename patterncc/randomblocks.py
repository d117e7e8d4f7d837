"""The seeded generator behind ``random(r, b, seed)``.

Query block ``qb`` (positions ``qb*b .. qb*b + b - 1``) attends ``min(r, nb)``
distinct key blocks out of ``nb = ceil(n / b)``, chosen by Robert Floyd's
sampling algorithm driven by a SplitMix64 hash:

    chosen = {}
    for t in range(nb - r, nb):
        x = splitmix64(seed, qb, t) % (t + 1)
        chosen.add(t if x in chosen else x)

``splitmix64(seed, qb, t)`` is the SplitMix64 finalizer applied to
``seed * 0x9E3779B97F4A7C15 + qb * 0xBF58476D1CE4E5B9 + t * 0x94D049BB133111EB + 1``
(all modulo 2**64). The draw depends only on ``(r, nb, seed, qb)``: it is the
same on every machine, numpy version and backend.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draw(r: int, nb: int, seed: int, query_blocks: np.ndarray) -> np.ndarray:
    """Key blocks for each query block: int64 ``[len(query_blocks), min(r, nb)]``,
    each row distinct and sorted ascending."""
    qb = np.asarray(query_blocks, dtype=np.uint64)
    count = min(r, nb)
    out = np.empty((qb.size, count), dtype=np.int64)
    with np.errstate(over="ignore"):
        base = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + qb * np.uint64(0xBF58476D1CE4E5B9)
        for col, t in enumerate(range(nb - count, nb)):
            z = base + np.uint64(t) * np.uint64(0x94D049BB133111EB) + np.uint64(1)
            x = (_splitmix64(z) % np.uint64(t + 1)).astype(np.int64)
            taken = (out[:, :col] == x[:, None]).any(axis=1)
            out[:, col] = np.where(taken, t, x)
    out.sort(axis=1)
    return out
