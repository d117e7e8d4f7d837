"""One shape's launches: a generated module's four kernels over their device
tables (``_Run``), with the call's score terms as the kernels take them
(``_KernelTerms``). A launch that needs more shared memory than the card has
is compiled again with fewer pipeline stages (``_Run._launch``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from triton.runtime.errors import OutOfResources

from patterncc.orders import SlotOrder
from patterncc.scores import ScoreTerms

from .config import KernelConfig
from .device_tables import _DeviceTables
from .merge import _merged

REL_PAD = 256  # kernels.py's _REL_PAD: copies of each end of the reversed relative bias table


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class _Run:
    """One shape's module, tables and config: launches the four kernels."""

    module: object
    tables: _DeviceTables
    config: KernelConfig
    head_dim: int
    H: int
    Hkv: int
    n: int
    dtype: torch.dtype
    # kernel -> pipeline stages where the config's do not fit in shared memory (_launch)
    stages_that_fit: dict = field(default_factory=dict, compare=False, repr=False)
    # a packed batch: (SEQS, ALIGN) of the kernels' PACKED mode (patterncc.packing.PackedSlots.table)
    packing: tuple | None = None

    def _constexprs(self):
        packed = {} if self.packing is None else dict(PACKED=True, SEQS=self.packing[0], ALIGN=self.packing[1])
        return dict(HEAD_DIM=self.head_dim, HEAD_DEPENDENT=self.tables.layout_heads > 1,
                    DOT_PRECISION="ieee" if self.dtype == torch.float32 else "tf32", **packed)

    def forward(self, q, k, v, scale, order: "SlotOrder | None" = None, o=None, lse=None, o_in=None, lse_in=None,
                terms: "_KernelTerms | None" = None, sink: bool = False):
        """o, lse of q, k, v ``[B, H, tokens, D]``; with a planned ``order`` the
        kernels walk ``self.n`` slots and read and write tokens by it. Given
        ``o`` and ``lse``, the kernel writes into them (only the tokens it
        covers); given ``o_in`` and ``lse_in`` (fp32, o's and lse's strides),
        it writes its result merged with theirs by log-sum-exp. ``terms``:
        the score terms (``_KernelTerms``), the sink only where ``sink``."""
        order = order or SlotOrder()
        if o is None:  # a launch of its own: outputs made (blank where no slot reaches) as for a plan
            return _merged([(self, order)], q, k, v, scale, terms or _NO_KERNEL_TERMS)
        B, H, tokens, D = q.shape
        n = self.n
        cfg, t = self.config, self.tables
        if o_in is not None and (o_in.stride() != o.stride() or lse_in.stride() != lse.stride()):
            raise AssertionError("o_in and lse_in must have o's and lse's strides")
        grid = (triton_cdiv(n, cfg.block_m), B * H)
        self._launch(self.module.attn_fwd, grid)(
            q, k, v, o, lse, o if o_in is None else o_in, lse if lse_in is None else lse_in, t.random, *t.fwd,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            scale, n, H, H // self.Hkv, *order.args(tokens),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.fwd_stages, **self._constexprs(),
            Q_ORDER=order.q, K_ORDER=order.k, FULL_RUNS=t.fwd_walk == "runs", SCALE_NONNEG=scale >= 0,
            MERGE_IN=o_in is not None, num_warps=(terms or _NO_KERNEL_TERMS).fwd_warps(cfg), num_stages=cfg.fwd_stages,
            **(terms or _NO_KERNEL_TERMS).forward_args(t.random, sink, cfg))
        return o, lse

    def delta(self, o, do, dlse=None):
        """fp32 ``[B, H, n]`` in rows padded to a multiple of 16 (``aligned_rows``):
        rowsum(dO * O); an lse gradient enters as delta - dlse."""
        B, H, n, D = o.shape
        delta = aligned_rows(B, H, n, o.device)
        self.module.attn_bwd_preprocess[(triton_cdiv(n, self.config.block_m2), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], n, H, delta.stride(1),
            HEAD_DIM=D, BLOCK_M=self.config.block_m2)
        if dlse is not None:
            delta.sub_(dlse.to(torch.float32))
        return delta

    def dkdv(self, q, k, v, lse, do, delta, scale, order: "SlotOrder", dk, dv, dk_in=None, dv_in=None,
             terms: "_KernelTerms | None" = None):
        """Write this launch's dk, dv (plus ``dk_in``, ``dv_in`` if given: fp32,
        dk's strides) into ``dk``, ``dv``; P recomputed from ``lse`` with the
        given ``delta`` (a planned run passes the merged ones to every component)."""
        B, H = q.shape[:2]
        cfg, t = self.config, self.tables
        self._launch(self.module.attn_bwd_dkdv, (triton_cdiv(self.n, cfg.block_n1), B * self.Hkv))(
            q, k, v, do, lse, delta, dk, dv, dk if dk_in is None else dk_in, dv if dv_in is None else dv_in,
            t.random, *t.dkdv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
            scale, self.n, H, H // self.Hkv, *order.args(q.shape[2]), _row_length(lse, delta),
            BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, Q_ORDER=order.q, K_ORDER=order.k,
            ADD_IN=dk_in is not None, FULL_RUNS=t.dkdv_walk == "runs", BAND=t.dkdv_walk == "band",
            ADDR32=self._rows_fit_int32(q, do),
            **self._backward_constexprs(), **(terms or _NO_KERNEL_TERMS).backward_args(t.random, cfg))

    def dq(self, q, k, v, lse, do, delta, scale, order: "SlotOrder", dq, dq_in=None, o=None,
           terms: "_KernelTerms | None" = None, grads: list | None = None):
        """Write this launch's dq (plus ``dq_in`` if given) into ``dq``; given
        ``o``, also write ``delta`` (rowsum(dO * O), every query this launch
        reaches) rather than read it. With ALiBi or a relative bias among
        ``terms``, append this launch's (part, hist) buffers of their
        gradients to ``grads`` (``_term_grads`` sums them)."""
        B, H = q.shape[:2]
        cfg, t = self.config, self.tables
        terms = terms or _NO_KERNEL_TERMS
        buffers = {}
        if terms.wants_grad_buffers:
            progs = B * H * triton_cdiv(self.n, cfg.block_m2)
            part = torch.empty((progs, 3), dtype=torch.float32, device=q.device)
            buckets = terms.buckets if terms.rel_grad else 1  # (the histogram is the bias's gradient alone)
            hist = torch.zeros((progs, buckets), dtype=torch.float32, device=q.device)
            scratch = torch.empty((progs if terms.rel_grad else 1, cfg.block_m2 * cfg.block_n2),
                                  dtype=torch.float32, device=q.device)
            buffers = dict(PART=part, SCR=scratch, HIST=hist)
            grads.append((part.view(B, H, -1, 3), hist.view(B, H, -1, buckets)))
        o_arg = do if o is None else o  # any [B, H, n, D] pointer when WRITE_DELTA is off
        self._launch(self.module.attn_bwd_dq, (triton_cdiv(self.n, cfg.block_m2), B * H))(
            q, k, v, do, o_arg, lse, delta, dq, dq if dq_in is None else dq_in, t.random, *t.dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o_arg.stride()[:3], *dq.stride()[:3],
            scale, self.n, H, H // self.Hkv, *order.args(q.shape[2]), _row_length(lse, delta),
            BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2, Q_ORDER=order.q, K_ORDER=order.k,
            ADD_IN=dq_in is not None, FULL_RUNS=t.dq_walk == "runs", BAND=t.dq_walk == "band",
            WRITE_DELTA=o is not None,
            ADDR32=self._rows_fit_int32(k, v), **self._backward_constexprs(),
            **terms.backward_args(t.random, cfg), **terms.dq_args(t.random, buffers, cfg))

    def _launch(self, kernel, grid):
        """``kernel[grid]`` with pipelining that fits the card's shared memory.
        The table's stages are chosen for an H100/H200's 227 KiB, and some
        variants of a kernel need more than others (a predicate, the score
        terms, a merge input; Triton versions differ too: the D = 128 forward
        at 128 x 128 with 3 stages takes 224 KiB under Triton 3.9 and 228 KiB
        under 3.6). Where a launch does not fit, it is compiled again with one
        stage fewer (the same result, a little less overlap of loads and math),
        down to one; this kernel of this run then keeps the stages that fit."""
        fitted = self.stages_that_fit

        def launch(*args, **kwargs):
            while True:
                stages = fitted.get(kernel)
                if stages is not None:
                    kwargs.update(num_stages=stages, NUM_STAGES=stages)
                try:
                    return kernel[grid](*args, **kwargs)
                except OutOfResources as err:
                    if "shared memory" not in str(err) or kwargs["num_stages"] <= 1:
                        raise
                    fitted[kernel] = kwargs["num_stages"] - 1

        return launch

    def _rows_fit_int32(self, *walked) -> bool:
        """Whether the kernel may address the rows of the tensors it walks
        (``[B, H, tokens, D]``) by int32 offsets from each head's base: every
        slot a step reaches, padded to a whole tile, times the row stride,
        plus D, stays under 2**31 (the kernels' ADDR32)."""
        slots = self.n + max(self.config.block_m1, self.config.block_n2)  # the walked step sizes
        return all(slots * x.stride(2) + x.shape[3] < 2**31 for x in walked)

    def _backward_constexprs(self):
        cfg = self.config
        return dict(**self._constexprs(), NUM_STAGES=cfg.bwd_stages, num_warps=cfg.bwd_warps,
                    num_stages=cfg.bwd_stages)


def aligned_rows(B: int, H: int, n: int, device) -> torch.Tensor:
    """An fp32 ``[B, H, n]`` buffer whose rows are a multiple of 16 apart
    (a view of ``[B, H, ceil(n / 16) * 16]``): the backward kernels read lse
    and delta by rows of that length, which Triton then knows 64-byte
    aligned at every n, with one compile (kernels_backward.py)."""
    return torch.empty((B, H, -(-n // 16) * 16), dtype=torch.float32, device=device)[:, :, :n]


def with_aligned_rows(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` itself where its rows are already so (a forward at n a
    multiple of 16), else a copy in an ``aligned_rows`` buffer."""
    length = _row_stride(lse)
    if length is not None and length % 16 == 0:
        return lse
    out = aligned_rows(*lse.shape, lse.device)
    out.copy_(lse)
    return out


def _row_length(lse: torch.Tensor, delta: torch.Tensor) -> int:
    """The kernels' LSE_LEN: the one row length of lse and delta."""
    length = _row_stride(lse)
    if length is None or _row_stride(delta) != length:
        raise AssertionError(f"lse and delta must share rows of one length, got strides {lse.stride()}, "
                             f"{delta.stride()}")
    return length


def _row_stride(x: torch.Tensor) -> int | None:
    """The distance between the rows of ``x`` ``[B, H, n]`` where they lie
    one after another (strides ``(H * L, L, 1)``), else None."""
    length = x.stride(1)
    return length if x.stride() == (x.shape[1] * length, length, 1) else None


@dataclass(frozen=True, eq=False)
class _KernelTerms:
    """A call's ScoreTerms as the kernels take them: fp32 contiguous tensors
    and the constexpr flags. An absent term's pointer argument is ``dummy``
    (any tensor of the launch, never read: the run's random table, so that
    the kernels without terms keep one signature)."""

    softcap: float | None = None
    slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    rel: torch.Tensor | None = None
    rel_rev: torch.Tensor | None = None  # rel reversed, each end repeated REL_PAD times (kernels' _rel_gather)
    slope_grad: bool = False  # the dQ kernel sums the slopes' gradient
    rel_grad: bool = False  # the dQ kernel sums the relative bias's gradient

    @staticmethod
    def of(terms: ScoreTerms) -> "_KernelTerms":
        def f32(t):
            return None if t is None else t.detach().to(torch.float32).contiguous()
        rel = f32(terms.rel_bias)
        rel_rev = None
        if rel is not None:
            rel_rev = torch.cat([rel[:, -1:].expand(-1, REL_PAD), rel.flip(1), rel[:, :1].expand(-1, REL_PAD)], 1)
        return _KernelTerms(terms.softcap, f32(terms.alibi_slopes), f32(terms.sinks), rel, rel_rev,
                            terms.wants(0), terms.wants(2))

    @property
    def rel_m(self) -> int:
        return 0 if self.rel is None else (self.rel.shape[1] - 1) // 2

    @property
    def buckets(self) -> int:
        return 1 if self.rel is None else self.rel.shape[1]

    def fwd_warps(self, cfg: KernelConfig) -> int:
        """The forward's warps: a relative bias takes at least 8, since its
        gathered tile needs registers that 4 warps lack (sm_90, D = 64,
        128 x 64 tiles: 240 spilled bytes with 4 warps, none with 8;
        ``bench/probes.py``'s resources with ``variant=dict(REL_BIAS=True)``)."""
        return cfg.fwd_warps if self.rel is None else max(cfg.fwd_warps, 8)

    @property
    def wants_grad_buffers(self) -> bool:
        return self.slope_grad or self.rel_grad

    def backward_args(self, d: torch.Tensor, cfg: KernelConfig) -> dict:
        """The kernels' score-term arguments (forward's too, less the sink)."""
        if self.rel is not None:
            span = max(cfg.block_m + cfg.block_n, cfg.block_m1 + cfg.block_n1, cfg.block_m2 + cfg.block_n2) - 2
            if span >= REL_PAD:  # a tile would read past the padded table (kernels' _rel_gather)
                raise ValueError(f"rel_bias needs tiles whose q - k spans fewer than {REL_PAD} positions "
                                 f"(BLOCK_M + BLOCK_N - 2 < {REL_PAD} for every kernel); {cfg.describe()} "
                                 f"spans {span}: use tiles of at most 128")
        return dict(SOFTCAP=self.softcap is not None, ALIBI=self.slopes is not None, REL_BIAS=self.rel is not None,
                    softcap=self.softcap or 1.0, SLOPES=d if self.slopes is None else self.slopes,
                    REL=d if self.rel is None else self.rel, REL_REV=d if self.rel is None else self.rel_rev,
                    rel_m=self.rel_m)

    def forward_args(self, d: torch.Tensor, sink: bool, cfg: KernelConfig) -> dict:
        sink = sink and self.sinks is not None
        return dict(self.backward_args(d, cfg), SINKS=sink, SINK=self.sinks if sink else d)

    def dq_args(self, d: torch.Tensor, buffers: dict, cfg: KernelConfig) -> dict:
        skew = 1 << (cfg.block_m2 + cfg.block_n2 - 2).bit_length()  # next power of two >= M2 + N2 - 1
        return dict(PART=buffers.get("PART", d), SCR=buffers.get("SCR", d), HIST=buffers.get("HIST", d), SKEW=skew,
                    TERM_GRADS=self.slope_grad | self.rel_grad << 1)


_NO_KERNEL_TERMS = _KernelTerms()
