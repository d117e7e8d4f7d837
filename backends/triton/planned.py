"""A Plan on the generated kernels, as one autograd Function (runtime._AttentionFunction).

Forward: each component runs the forward kernel with its token order folded
into the kernels' address arithmetic (``kernels._token``: residue order and
gathered columns are closed forms), so q, k, v are read and o, lse written
in token order with no copies; the partial results merge exactly by
log-sum-exp inside the forward kernels (each launch after the first merges
its result into the running one in its epilogue: ``runtime._merged``).
Only q, k, v, the merged o and the merged lse are saved.

Backward: ``delta = rowsum(dO * O)`` once, from the merged o; then every
component runs the dK/dV and dQ kernels with the *merged* lse and delta (the
Sparse Transformer's recomputation: P is rebuilt from lse, never stored),
and the gradients add up in token order inside the kernels: each launch adds
the fp32 sum of the launches before it, the last writes the inputs' dtype
(``runtime._summed``).
"""

from __future__ import annotations

import torch.nn.functional as F

from patterncc.planned import PlannedAttention

from .config import padded_head_dim
from .runtime import SlotOrder, _AttentionFunction, _check_scale, check_inputs


class TritonPlannedAttention(PlannedAttention):
    """``PlannedAttention`` whose components share one autograd Function
    (merged lse and delta in the backward pass) instead of composing each
    component's own Function with a differentiable merge."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, check=check_inputs, **kwargs)

    def combine(self, runs, q, k, v, scale):
        D = q.shape[3]
        scale = _check_scale(scale, D)
        Dp = padded_head_dim(D)
        if Dp != D:  # zeros add nothing to q.k, and o's extra columns are sliced away
            q, k, v = (F.pad(x, (0, Dp - D)) for x in (q, k, v))
        o, lse = _AttentionFunction.apply(q, k, v, scale, self.launches(runs, q, k))
        return (o[..., :D] if Dp != D else o), lse

    @staticmethod
    def launches(runs, q, k) -> list:
        """``(launcher, SlotOrder)`` per component for inputs shaped like ``q``
        and ``k`` (head dim already padded)."""
        H, n, Dp = q.shape[1], q.shape[2], q.shape[3]
        return [(run.attn.launcher(run.slots, H, k.shape[1], Dp, q.dtype, q.device),
                 SlotOrder.of(run.component.q_order, run.component.k_order, n)) for run in runs]
