"""A Plan on the generated kernels, as one autograd Function (runtime._AttentionFunction).

Forward: each component runs the forward kernel with its token order folded
into the kernels' address arithmetic (``kernels._token``: residue order and
gathered columns are closed forms), so q, k, v are read and o, lse written
in token order with no copies; the partial results merge exactly by
log-sum-exp inside the forward kernels (each launch after the first merges
its result into the running one in its epilogue: ``runtime._merged``).
Only q, k, v, the merged o and the merged lse are saved.

Score terms (``patterncc.scores``) ride along: every component applies
them at its tokens' own positions (the kernels map slots to tokens), and the
sink joins the denominators of one component that reaches every query, so
the merge counts it once.

Backward: ``delta = rowsum(dO * O)`` once, from the merged o; then every
component runs the dK/dV and dQ kernels with the *merged* lse and delta (the
Sparse Transformer's recomputation: P is rebuilt from lse, never stored),
and the gradients add up in token order inside the kernels: each launch adds
the fp32 sum of the launches before it, the last writes the inputs' dtype
(``runtime._summed``).
"""

from __future__ import annotations

from patterncc.lru import LRU
from patterncc.planned import PlannedAttention
from patterncc.scores import NO_TERMS

from .runtime import SlotOrder, attend, check_inputs, launch_key

_LAUNCH_ENTRIES = 32  # launch lists kept per TritonPlannedAttention


class TritonPlannedAttention(PlannedAttention):
    """``PlannedAttention`` whose components share one autograd Function
    (merged lse and delta in the backward pass) instead of composing each
    component's own Function with a differentiable merge."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, check=check_inputs, **kwargs)
        self._launches = LRU(_LAUNCH_ENTRIES)

    def combine(self, runs, q, k, v, scale, terms=NO_TERMS):
        return attend(q, k, v, scale, lambda q, k: self.launches(runs, q, k), terms)

    def launches_for(self, q, k) -> list:
        """The launches ``(launcher, SlotOrder)`` of a call on checked inputs
        whose head dim is padded: what ``__call__`` runs (never SDPA), for
        the ``patterncc::attention`` op, which owns the autograd."""
        runs = self._runs(self.plan(q.shape[2], q.shape[1]), q.device)
        if len(runs) == 1 and not runs[0].component.reordered:
            return [(runs[0].attn.launcher(*launch_key(q, k)), SlotOrder())]
        return self.launches(runs, q, k)

    def launches(self, runs, q, k) -> list:
        """``(launcher, SlotOrder)`` per component for inputs shaped like ``q``
        and ``k`` (head dim already padded); kept per shape, since a planned
        call is often bound by the host's time to issue it."""
        key = launch_key(q, k)
        hit = self._launches.get(key)
        if hit is not None and hit[0] is runs:  # the list it was made for (it holds runs: no id reuse)
            return hit[1]
        n = key[0]
        made = [(run.attn.launcher(run.slots, *key[1:]), SlotOrder.of(run.component.q_order, run.component.k_order, n))
                for run in runs]
        self._launches[key] = (runs, made)
        return made
