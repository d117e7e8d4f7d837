"""Score terms: what a call adds to the scaled score ``s = scale * q.k``
before the softmax, never changing which pairs may attend.

    softcap c      s = c * tanh(s / c)                         (first, on the scaled score)
    alibi_slopes   s = s - slope[h] * abs(q - k)                [H] float
    rel_bias       s = s + t[h, clamp(q - k, -M, M) + M]        [H, 2 * M + 1] float
    sinks          exp(t[h]) joins each row's softmax denominator, with no value   [H] float

Positions are the tokens' own (natural order), ``h`` the query head. Every
backend takes a call's terms as one ``ScoreTerms``; the tensors are learnable
(gradients flow to them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class ScoreTerms:
    """The runtime values of one call's score terms; None: the term is absent."""

    softcap: float | None = None
    alibi_slopes: object | None = None  # torch.Tensor [H]
    sinks: object | None = None  # torch.Tensor [H]
    rel_bias: object | None = None  # torch.Tensor [H, 2 * M + 1]

    def __bool__(self) -> bool:
        return any(x is not None for x in (self.softcap, *self.tensors()))

    def tensors(self) -> tuple:
        """The learnable ones, in the order their gradients are returned."""
        return self.alibi_slopes, self.sinks, self.rel_bias


NO_TERMS = ScoreTerms()
