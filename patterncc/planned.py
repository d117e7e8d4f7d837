"""Running a Plan: every component through the same kernels, merged by log-sum-exp.

A component in natural order runs on q, k, v as they are. A reordered one
runs on q, k, v gathered into its slot order (``index_select`` along the
sequence: O(n * D) bytes, no n * n anywhere), with its ``slot_pattern`` as
the kernels' predicate, and its output rows are gathered back to token
order. The partial results merge exactly:

    lse = logsumexp_c(lse_c)        o = sum_c exp(lse_c - lse) * o_c

Autograd does the rest: each component's backward pass recomputes its own
probabilities from its own ``lse_c`` (which equals using the merged ``lse``
and ``delta = rowsum(dO * O)`` for every component, the way the Sparse
Transformer's kernels do it) and the gradients of the gathers sum the
components' dq, dk, dv back in token order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from . import ir
from .lru import LRU
from .planner import Component, Plan, build_plan
from .scores import NO_TERMS, ScoreTerms

_CACHE_ENTRIES = 16


@dataclass(frozen=True, eq=False)
class _Run:
    """One component at one length: its attention, and (built on first use,
    by backends that gather instead of folding the order into their kernels)
    index tensors between token order and its slot order."""

    attn: object
    slots: int       # the component's slot count a side (its layout's seq_len)
    component: Component
    n: int           # tokens
    device: object

    @cached_property
    def gathers(self):
        """(q_index [slots], k_index [slots], q_back [n]) LongTensors, None where natural:
        the token of each query slot and key slot (clamped), the slot of each query token."""
        import torch

        return _gathers(self.component, self.n, torch, self.device)


class PlannedAttention:
    """``attn(q, k, v, scale=None, return_lse=False, *, softcap=None,
    alibi_slopes=None, sinks=None, rel_bias=None)`` running a pattern's plan
    (score terms: ``patterncc.scores``; they never change the plan).

    ``make_inner(component, heads)`` builds the attention that runs one
    component's ``slot_pattern`` (the Triton kernels, or any backend that
    returns ``lse`` and lets autograd through it). ``mode`` is the planner's: ``"auto"``,
    ``"natural"`` or ``"planned"``. ``dense`` runs a plan whose strategy is
    ``"dense"`` (the pattern is causal or all) — SDPA flash on a GPU.
    ``check(q, k, v)`` validates the inputs before anything is planned and
    returns them as the backend takes them.
    """

    def __init__(self, pattern: ir.Pattern, make_inner: Callable, *, block: int = 128, mode: str = "auto",
                 dense: Callable | None = None, check: Callable | None = None):
        self.pattern = pattern
        self.check = check
        self.make_inner = make_inner
        self.block = block
        self.mode = mode
        self.dense = dense
        self._plans = LRU(_CACHE_ENTRIES)
        self._inner: dict = {}

    def plan(self, n: int, heads: int) -> Plan:
        key = (n, heads)
        if key not in self._plans:
            self._plans[key] = (build_plan(self.pattern, n, self.block, heads, mode=self.mode), {})
        return self._plans[key][0]

    def __call__(self, q, k, v, scale=None, return_lse: bool = False, *, softcap=None, alibi_slopes=None,
                 sinks=None, rel_bias=None):
        if self.check is not None:  # the inner backend's input checks, before any planning
            q, k, v = self.check(q, k, v)
        n, H = q.shape[-2], q.shape[1]
        terms = ScoreTerms(softcap, alibi_slopes, sinks, rel_bias)
        if terms:
            from .scores import check_terms

            terms = check_terms(terms, H, q.device)
        plan = self.plan(n, H)
        # The cost model was fitted to the 16-bit kernels; the float32 ones
        # (exact products on the FMA units) are untimed, so a dense pattern in
        # float32 keeps the dense path whatever the model predicts.
        wants_dense = plan.strategy == "dense" or (
            "dense" in plan.costs and str(getattr(q, "dtype", "")) == "torch.float32")
        if wants_dense and self.dense is not None and not return_lse and not terms:
            out = self.dense(plan.pattern, q, k, v, scale)
            if out is not None:
                return out
        runs = self._runs(plan, q.device)
        if len(runs) == 1 and not runs[0].component.reordered:
            return runs[0].attn(q, k, v, scale=scale, return_lse=return_lse, **_term_kwargs(terms))
        o, lse = self.combine(runs, q, k, v, scale, terms)
        return (o, lse) if return_lse else o

    def combine(self, runs: list[_Run], q, k, v, scale, terms: ScoreTerms = NO_TERMS):
        """Run every component and merge: here each component's own autograd
        and a differentiable merge (a backend may fuse this, see
        backends/triton/planned.py). The sink joins once, after the merge."""
        if (terms.alibi_slopes is not None or terms.rel_bias is not None) and any(r.component.reordered for r in runs):
            raise NotImplementedError(
                "alibi_slopes and rel_bias read token positions, which a component run on gathered inputs "
                "does not see: use the Triton backend (it folds the order into its kernels) or plan='natural'")
        inner = ScoreTerms(terms.softcap, terms.alibi_slopes, None, terms.rel_bias)
        o, lse = merge([self._run_one(run, q, k, v, scale, inner) for run in runs])
        if terms.sinks is not None:
            o, lse = add_sink(o, lse, terms.sinks)
        return o.to(q.dtype), lse

    def _runs(self, plan: Plan, device) -> list[_Run]:
        cached = self._plans[(plan.seq_len, plan.heads)][1]
        key = str(device)
        if key not in cached:
            runs = []
            for comp in plan.components:
                attn = self._inner.get(comp.slot_pattern)
                if attn is None:
                    attn = self._inner[comp.slot_pattern] = self.make_inner(comp, plan.heads)
                runs.append(_Run(attn, comp.layout.seq_len, comp, plan.seq_len, device))
            cached[key] = runs
        return cached[key]

    @staticmethod
    def _run_one(run: _Run, q, k, v, scale, terms: ScoreTerms = NO_TERMS):
        q_index, k_index, q_back = run.gathers
        if q_index is not None:
            q = q.index_select(2, q_index)
        if k_index is not None:
            k = k.index_select(2, k_index)
            v = v.index_select(2, k_index)
        if q_index is None and k_index is not None and k.shape[2] != q.shape[2]:
            raise AssertionError("gathered keys must be padded to the query count")
        o, lse = run.attn(q, k, v, scale=scale, return_lse=True, **_term_kwargs(terms))
        if q_back is not None:
            o = o.index_select(2, q_back)
            lse = lse.index_select(2, q_back)
        return o, lse


def _term_kwargs(terms: ScoreTerms) -> dict:
    """The given terms as keyword arguments (none at all without terms, so
    that an inner backend without score terms still runs plain calls)."""
    names = ("softcap", "alibi_slopes", "sinks", "rel_bias")
    values = (terms.softcap, *terms.tensors())
    return {name: value for name, value in zip(names, values) if value is not None}


def add_sink(o, lse, sinks):
    """(o, lse) with ``exp(sinks[h])`` joining each row's denominator
    (differentiable): lse' = logaddexp(lse, t_h), o' = o * exp(lse - lse')."""
    import torch

    t = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    new = torch.logaddexp(lse, t)
    # a row with lse = -inf: weight exp(-inf - t) = 0, and o was 0 already
    o = o * torch.exp(lse - new).unsqueeze(-1).to(o.dtype)
    return o, new


def _gathers(comp: Component, n: int, torch, device):
    """Index tensors between token order and the component's slot order."""

    def slots_to_positions(order, count):
        pos = order.positions(np.arange(count), n)
        # Padding slots read row 0: the slot pattern never allows them.
        return torch.as_tensor(np.where(pos >= 0, pos, 0), dtype=torch.long, device=device)

    slots = comp.layout.seq_len
    q_index = k_index = q_back = None
    if comp.q_order.reordered:
        q_index = slots_to_positions(comp.q_order, slots)
        q_back = torch.as_tensor(comp.q_order.slots(np.arange(n), n), device=device)
    if comp.k_order.reordered:
        k_index = slots_to_positions(comp.k_order, slots)
    return q_index, k_index, q_back


def merge(parts):
    """Exact log-sum-exp merge of partial attention results (fp32, or fp64 for fp64).

    ``parts``: ``[(o_c [B, H, n, D], lse_c [B, H, n])]`` over disjoint key
    sets. Rows that no component reaches keep ``o = 0`` and ``lse = -inf``
    with zero gradients (no ``-inf - -inf``).
    """
    import torch

    dtype = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    lses = torch.stack([lse.to(dtype) for _, lse in parts])    # (C, B, H, n)
    # logsumexp by hand: torch's gives NaN gradients on rows that are all -inf.
    top = lses.max(dim=0).values.detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(lses - top).sum(dim=0)
    reached = total > 0
    lse = torch.where(reached, top + torch.log(torch.where(reached, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    safe = torch.where(reached, lse, torch.zeros_like(lse))
    o = None
    for (o_c, _), lse_c in zip(parts, lses):
        w = torch.exp(lse_c - safe).unsqueeze(-1)               # 0 where lse_c = -inf
        term = w * o_c.to(dtype)
        o = term if o is None else o + term
    return o, lse
