"""Several launches as one result: the forward's log-sum-exp merge and the
backward's gradient sums, combined inside the kernels in a running fp32
buffer (``_accumulated``), and the score terms' gradients summed over them.
A launch is ``(run, SlotOrder)``: anything with ``_Run``'s ``forward``,
``dq`` and ``dkdv``."""

from __future__ import annotations

import contextlib

import torch

from patterncc.scores import ScoreTerms


def _sink_launch(launches) -> int | None:
    """The launch that adds the sink to its rows' denominators: one that
    reaches every query (the log-sum-exp merge then counts it once), or None."""
    return next((i for i, (_, order) in enumerate(launches) if order.covers_queries), None)


def _term_grads(terms: ScoreTerms, kterms, grads: list, lse, delta) -> tuple:
    """The gradients of ``terms.tensors()`` (None where absent; ``kterms``
    the same terms as ``launch._KernelTerms``), each in its tensor's dtype,
    summed in a fixed order (deterministic): the dQ
    programs' shares ``grads`` [(part [B, H, tiles, 3], hist [B, H, tiles, 2M
    + 1])], one per launch, and, for the sinks, ``-sum_q exp(t - lse_q) *
    delta_q`` (a sink's dS: its probability times (0 - delta)). None where
    ``terms`` take no gradient of the tensor (``ScoreTerms.grads``)."""
    d_alibi = d_sinks = d_rel = None
    if kterms.slope_grad:
        d_alibi = -sum(part[..., 0].sum(dim=(0, 2)) for part, _ in grads)
        d_alibi = d_alibi.to(terms.alibi_slopes.dtype)
    if terms.wants(1):
        p_sink = torch.exp(kterms.sinks.view(1, -1, 1) - lse)
        d_sinks = -(p_sink * delta).sum(dim=(0, 2)).to(terms.sinks.dtype)
    if kterms.rel_grad:
        d_rel = sum(hist.sum(dim=(0, 2)) for _, hist in grads)
        d_rel[:, 0] += sum(part[..., 1].sum(dim=(0, 2)) for part, _ in grads)
        d_rel[:, -1] += sum(part[..., 2].sum(dim=(0, 2)) for part, _ in grads)
        d_rel = d_rel.to(terms.rel_bias.dtype)
    return d_alibi, d_sinks, d_rel


def _launch_order(covers) -> list[int]:
    """The order to run launches in when each adds to the ones before:
    ``covers[i]``, launch i writes every token. A covering launch goes last
    (it can then write a fresh output in the final dtype) and another first
    where there is one (it then needs no initialized buffer)."""
    seq = sorted(range(len(covers)), key=lambda i: not covers[i])  # covering ones first
    if covers[seq[0]]:
        seq = seq[1:] + seq[:1]  # one covering launch last; a second one, if any, is now first
    return seq


def _merged(launches, q, k, v, scale, terms=None):
    """o (q's dtype) and lse (fp32) of several launches merged by
    log-sum-exp inside the forward kernels (``MERGE_IN``), through
    ``_accumulated``: tokens no launch reaches keep o = 0, lse = -inf.
    The sink, if any among ``terms`` (``launch._KernelTerms``), joins in one
    launch (``_sink_launch``)."""
    B, H, n, D = q.shape
    outputs = (((B, H, n, D), q.dtype, 0.0), ((B, H, n), torch.float32, float("-inf")))
    sink = _sink_launch(launches)

    def launch(i, outs, ins):
        with_terms = {} if terms is None else dict(terms=terms, sink=i == sink)
        return launches[i][0].forward(q, k, v, scale, launches[i][1], *outs, *ins, **with_terms)

    return _accumulated([order.covers_queries for _, order in launches], outputs, q.device, launch)


def _summed(covers, like, launch):
    """Gradients (shaped and typed as ``like``) summed over launches inside
    the kernels, through ``_accumulated``: tokens no launch reaches get zero."""
    return _accumulated(covers, tuple((x.shape, x.dtype, 0.0) for x in like), like[0].device, launch)


def _accumulated(covers, outputs, device, launch):
    """Outputs combined over launches inside the kernels (the forward's
    log-sum-exp merge, the backward's gradient sums). ``outputs``: ``(shape,
    dtype, blank)`` per output, ``blank`` the value of a token no launch
    reaches; ``launch(i, outs, ins)`` writes launch i's result combined with
    ``ins`` (the fp32 running outputs, or ``()``) into ``outs``;
    ``covers[i]``: launch i writes every token (natural and residue orders
    do; gathered rows or columns do not).

    The running outputs are fp32 so that the result rounds once: the first
    launch writes them, each later one combines into them, and the last, if
    it covers every token, writes the outputs' dtypes directly. A covering
    launch goes last and another first where there is one
    (``_launch_order``), so the running outputs need no fill and the
    result no cast."""

    def new(final: bool, blank: bool):
        return tuple(torch.full(shape, fill, dtype=dtype if final else torch.float32, device=device) if blank
                     else torch.empty(shape, dtype=dtype if final else torch.float32, device=device)
                     for shape, dtype, fill in outputs)

    if len(covers) == 1:
        outs = new(final=True, blank=not covers[0])
        launch(0, outs, ())
        return outs
    seq = _launch_order(covers)
    acc = new(final=False, blank=not covers[seq[0]])
    launch(seq[0], acc, ())
    for i in seq[1:-1]:
        launch(i, acc, acc)
    if covers[seq[-1]]:
        outs = new(final=True, blank=False)  # acc's strides: the kernels read both
        launch(seq[-1], outs, acc)
        return outs
    launch(seq[-1], acc, acc)
    return tuple(a.to(dtype) for a, (_, dtype, _) in zip(acc, outputs))


def _on_device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
