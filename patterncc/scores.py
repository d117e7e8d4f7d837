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

from dataclasses import dataclass, replace


@dataclass(frozen=True, eq=False)
class ScoreTerms:
    """The runtime values of one call's score terms; None: the term is absent.
    ``grads``: which tensors' gradients a backward pass takes (``tensors()``
    order); one it skips is None there. A fixed tensor (ALiBi's standard
    slopes) then costs the backward its scores only, not its gradient's sum."""

    softcap: float | None = None
    alibi_slopes: object | None = None  # torch.Tensor [H]
    sinks: object | None = None  # torch.Tensor [H]
    rel_bias: object | None = None  # torch.Tensor [H, 2 * M + 1]
    grads: tuple[bool, bool, bool] = (True, True, True)

    def __bool__(self) -> bool:
        return any(x is not None for x in (self.softcap, *self.tensors()))

    def tensors(self) -> tuple:
        """The learnable ones, in the order their gradients are returned."""
        return self.alibi_slopes, self.sinks, self.rel_bias

    def wants(self, i: int) -> bool:
        """Whether a backward pass takes the gradient of ``tensors()[i]``
        (present, and asked for)."""
        return self.tensors()[i] is not None and self.grads[i]

    def taking(self, grads) -> "ScoreTerms":
        """These terms, with a backward pass taking the gradients ``grads``
        says (``tensors()`` order: a bool each, or a bit mask, bit i for tensor i)."""
        if isinstance(grads, int):
            grads = tuple(bool(grads >> i & 1) for i in range(3))
        return replace(self, grads=tuple(bool(g) for g in grads))

    def grad_mask(self) -> int:
        """``grads`` as the bit mask ``taking`` reads."""
        return sum(1 << i for i, g in enumerate(self.grads) if g)


NO_TERMS = ScoreTerms()


def check_terms(terms: ScoreTerms, heads: int, device) -> ScoreTerms:
    """``terms`` as the kernels take them, or a TypeError/ValueError naming
    the argument: softcap a finite float > 0; each tensor floating-point, on
    the inputs' ``device``, shaped ``[heads]`` (``rel_bias``: ``[heads, 2 * M
    + 1]``)."""
    import math

    import torch

    softcap = terms.softcap
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a number, got {type(softcap).__name__}")
        softcap = float(softcap)
        # comparisons, not math.isfinite: under torch.compile a float may be symbolic, and Dynamo
        # traces comparisons (a guard) where it cannot trace isfinite (NaN fails both)
        if not (0 < softcap < math.inf):
            raise ValueError(f"softcap must be a finite number > 0, got {softcap=}")
    for name, t in (("alibi_slopes", terms.alibi_slopes), ("sinks", terms.sinks), ("rel_bias", terms.rel_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating-point, got dtype {t.dtype}")
        if t.device != torch.device(device):
            raise ValueError(f"{name} is on {t.device} but q is on {device}: they must share one device")
        want = "[H, 2 * max_distance + 1]" if name == "rel_bias" else "[H]"
        ok = (t.dim() == 2 and t.shape[0] == heads and t.shape[1] % 2 == 1) if name == "rel_bias" else \
            (t.dim() == 1 and t.shape[0] == heads)
        if not ok:
            raise ValueError(f"{name} must be shaped {want} with H = {heads} (q's heads), got {tuple(t.shape)}")
    return replace(terms, softcap=softcap)


def alibi_slopes(heads: int) -> list[float]:
    """The standard ALiBi slopes of ``heads`` heads (Press et al. 2022, and
    BLOOM's code): ``2^(-8 (h + 1) / H)`` for ``H`` a power of two; otherwise
    those of the closest power of two below ``H``, then every other slope of
    twice that power, until there are ``H``."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    power = 1 << (heads.bit_length() - 1)  # the largest power of two <= heads
    slopes = [2.0 ** (-8.0 * (h + 1) / power) for h in range(power)]
    if power < heads:
        slopes += alibi_slopes(2 * power)[0::2][: heads - power]
    return slopes
