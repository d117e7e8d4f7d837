"""A Plan on the generated kernels, as one autograd Function.

Forward: each component runs the forward kernel with its token order folded
into the kernels' address arithmetic (``kernels._token``: residue order and
gathered columns are closed forms), so q, k, v are read and o, lse written
in token order with no copies; the partial results merge exactly by
log-sum-exp (``merge.py``, one pass). Only q, k, v, the merged o and the
merged lse are saved.

Backward: ``delta = rowsum(dO * O)`` once, from the merged o; then every
component runs the dK/dV and dQ kernels with the *merged* lse and delta (the
Sparse Transformer's recomputation: P is rebuilt from lse, never stored),
and the gradients add up in token order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patterncc.planned import PlannedAttention

from .config import padded_head_dim
from .runtime import SlotOrder, _check_scale, _on_device_of, check_inputs


class TritonPlannedAttention(PlannedAttention):
    """``PlannedAttention`` whose components share one autograd Function
    (merged lse and delta in the backward pass) instead of composing each
    component's own Function with a differentiable merge."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, check=check_inputs, **kwargs)

    def combine(self, runs, q, k, v, scale):
        H, D = q.shape[1], q.shape[3]
        scale = _check_scale(scale, D)
        Dp = padded_head_dim(D)
        if Dp != D:  # zeros add nothing to q.k, and o's extra columns are sliced away
            q, k, v = (F.pad(x, (0, Dp - D)) for x in (q, k, v))
        launches = [(run, run.attn.launcher(run.slots, H, k.shape[1], Dp, q.dtype, q.device)) for run in runs]
        o, lse = _PlannedFunction.apply(q, k, v, scale, launches)
        return (o[..., :D] if Dp != D else o), lse


class _PlannedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, launches):
        n = q.shape[2]
        orders = [SlotOrder.of(run.component.q_order, run.component.k_order, n) for run, _ in launches]
        with _on_device_of(q), torch.no_grad():
            parts = [kernels.forward(q, k, v, scale, order) for (_, kernels), order in zip(launches, orders)]
            o, lse = _merge(parts, q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.launches, ctx.orders, ctx.scale = launches, orders, scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        do = do if do.stride(-1) == 1 else do.contiguous()
        with _on_device_of(q):
            delta = ctx.launches[0][1].delta(o, do, dlse)  # merged: the same for every component
            grads = [kernels.backward_from_delta(q, k, v, lse, do, delta, ctx.scale, order)
                     for (_, kernels), order in zip(ctx.launches, ctx.orders)]
            if len(grads) == 1:
                dq, dk, dv = grads[0]
            else:  # sum in fp32, round once
                dq, dk, dv = (sum(g[i].float() for g in grads) for i in range(3))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _merge(parts, dtype):
    """Log-sum-exp merge: o in ``dtype``, lse fp32 (-inf where no component
    reaches). One kernel pass per extra component, reading each part once:
    the running pair (o, lse) stays fp32 until the last pass writes ``dtype``."""
    o, lse = parts[0]
    for idx, (o_c, lse_c) in enumerate(parts[1:]):
        last = idx == len(parts) - 2
        o, lse = _merge_pair(o, lse, o_c, lse_c, dtype if last else torch.float32)
    return o.to(dtype), lse


def _merge_pair(o0, l0, o1, l1, out_dtype):
    """(o0, l0) (+) (o1, l1) by ``merge.merge_kernel``; every tensor contiguous
    ``[B, H, n, D]`` / ``[B, H, n]``."""
    from .merge import merge_kernel  # imports triton: only once a kernel runs

    o0, o1, l0, l1 = (x.contiguous() for x in (o0, o1, l0, l1))
    rows, D = l0.numel(), o0.shape[-1]
    o = torch.empty(o0.shape, dtype=out_dtype, device=o0.device)
    lse = torch.empty(l0.shape, dtype=torch.float32, device=o0.device)
    block_r = 64 if D <= 64 else 32
    merge_kernel[(-(-rows // block_r),)](o0, l0, o1, l1, o, lse, rows, HEAD_DIM=D, BLOCK_R=block_r)
    return o, lse
