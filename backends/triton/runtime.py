"""TritonAttention: the generated kernels behind a torch callable, with autograd.

    attn = TritonAttention(pattern)                 # block=None: block 64, tiles from the H100 table (config.py)
    o = attn(q, k, v)                               # q [B, H, n, D]; k, v [B, Hkv, n, D]
    o, lse = attn(q, k, v, scale=0.1, return_lse=True)
    o.sum().backward()                              # dq, dk, dv by the generated kernels

Inputs: CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``), one
dtype among bfloat16, float16 and float32, ``Hkv`` dividing ``H`` (GQA, MQA),
any ``n >= 1`` and head dim 1..256. The kernels take every stride but need
the last one to be 1: inputs whose last dimension is not contiguous are
copied (``.contiguous()``). Head dims that are not a power of two, or below
16, are padded with zeros to the next power of two (at least 16) and the
output is sliced back; the scale defaults to ``1/sqrt(D)`` of the true ``D``.
float32 inputs use ``input_precision="ieee"`` in every ``tl.dot`` (exact
fp32 products, slower than tf32).

Outputs: ``o`` in the inputs' dtype, ``lse`` fp32 ``[B, H, n]`` in natural
log; a row with no allowed key gives ``o = 0``, ``lse = -inf`` and zero
gradients. ``lse`` is differentiable too (its gradient enters the backward
pass as ``delta - dlse``), which is what merging partial results needs.

Caches: layouts and the device tables derived from them per
``(n, H, Hkv, device, config)``; kernel modules per generated source (one
for every pattern that differs from this one only in integers: codegen.py),
config and device capability, on disk (``cache.py``); a pattern whose
arguments use ``n`` binds them per length, and shares the module too. A
first call compiles all its kernels at once, in parallel (``compile_ahead``). The default tiles depend on the layout's
mean walk (config.py), so lengths on either side of ``SHORT_WALK`` use two
modules (compiled once each), not one per length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import types
import warnings
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from patterncc import ir, randomblocks
from patterncc.blocklayout.builder import build as build_layout
from patterncc.blocklayout.format import BlockLayout
from patterncc.errors import LimitError
from patterncc.lru import LRU
from patterncc.scores import NO_TERMS, ScoreTerms, check_terms

from patterncc.backends.reference.attention import check_scale as _check_scale

from . import _interpret, cache, codegen, tables
from .config import DEFAULT_BLOCK, MAX_HEAD_DIM, KernelConfig, default_config, padded_head_dim

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP32 = torch.finfo(torch.float32)
_LOG2E = 1.4426950408889634  # the kernels multiply the scale by 1/ln(2) to use exp2
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (batch * heads here)
_CACHE_ENTRIES = 32  # layouts / device tables kept per TritonAttention


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonAttention:
    """``attn(q, k, v, scale=None, return_lse=False)`` running generated Triton kernels.

    ``block``: the layout block (default 64, config.py says why); ``config``: a ``KernelConfig``
    fixing the block and every tile (default: ``default_config`` per head dim
    and dtype). Give one or the other, or both with the same block.
    """

    def __init__(self, pattern: ir.Pattern, *, block: int | None = None, config: KernelConfig | None = None):
        if not isinstance(pattern, ir.Pattern):
            raise TypeError(f"pattern must be a patterncc pattern, got {type(pattern).__name__}")
        if config is not None and not isinstance(config, KernelConfig):
            raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
        if block is not None:
            if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
                raise ValueError(f"block must be a power of two >= 16, got {block=!r}")
            if config is not None and config.block != block:
                raise ValueError(f"{block=} disagrees with config.block={config.block}; give one of them")
        self.pattern = pattern
        self.block = block
        self.config = config
        self._needs_length = codegen.needs_length(pattern)
        self._layouts = LRU(_CACHE_ENTRIES)
        self._tables = LRU(_CACHE_ENTRIES)
        self._modules = LRU(_CACHE_ENTRIES)
        # The per-call fast path: one dict lookup from the call's shape to its launches.
        self._runs = LRU(_CACHE_ENTRIES)

    def __repr__(self) -> str:
        return f"TritonAttention({str(self.pattern)!r}, block={self.block}, config={self.config})"

    # -- the call

    def __call__(self, q, k, v, scale=None, return_lse: bool = False, *, softcap=None, alibi_slopes=None,
                 sinks=None, rel_bias=None):
        q, k, v = _check_inputs(q, k, v)
        terms = check_terms(ScoreTerms(softcap, alibi_slopes, sinks, rel_bias), q.shape[1], q.device)
        o, lse = attend(q, k, v, scale, lambda q, k: [(self.launcher(*launch_key(q, k)), SlotOrder())], terms)
        return (o, lse) if return_lse else o

    def config_for(self, head_dim: int, dtype, layout: BlockLayout | None = None) -> KernelConfig:
        """The kernel configuration for this head dim (padded), dtype and
        layout (its ``mean_walk`` picks the tiles: config.py)."""
        walk = None if layout is None else layout.mean_walk
        return self.config or default_config(padded_head_dim(head_dim), dtype, self.block, walk=walk)

    def launcher(self, n: int, H: int, Hkv: int, head_dim: int, dtype, device) -> "_Run":
        """The cached kernels, tables and config for one shape (``prepare`` on a miss)."""
        key = (n, H, Hkv, head_dim, dtype, device)
        return self._runs.get(key) or self.prepare(*key)

    def prepare(self, n: int, H: int, Hkv: int, head_dim: int, dtype, device) -> "_Run":
        """Everything one call needs, built once per shape and cached."""
        run_key = (n, H, Hkv, head_dim, dtype, device)
        device = torch.device(device)
        lay = self.layout(n, H, self.config.block if self.config else (self.block or DEFAULT_BLOCK))
        config = self.config_for(head_dim, dtype, lay)
        module = self.kernels(n, config, device)
        key = (n, H, Hkv, str(device), config)
        if key not in self._tables:
            self._tables[key] = _DeviceTables.build(lay, Hkv, config, module, device)
        run = _Run(module, self._tables[key], config, head_dim, H, Hkv, n, dtype)
        self._runs[run_key] = run
        return run

    def use_layout(self, lay: BlockLayout, H: int) -> None:
        """Adopt a layout of this pattern built elsewhere (the planner builds
        each component's layout to cost it; the kernels reuse it)."""
        self._layouts[(lay.seq_len, H, lay.block)] = lay

    def layout(self, n: int, H: int, block: int) -> BlockLayout:
        """The BlockLayout at length ``n`` for ``H`` heads (cached)."""
        key = (n, H, block)
        if key not in self._layouts:
            ir.check_heads(self.pattern, H)
            lay = build_layout(self.pattern, n, block, H)
            if lay.heads not in (1, H):
                raise AssertionError(f"layout.build gave {lay.heads} heads for {H=}")
            self._layouts[key] = lay
        return self._layouts[key]

    def kernels(self, n: int, config: KernelConfig, device=None):
        """The generated module for length ``n`` (the same for every length
        unless the pattern's arguments use ``n``), from the disk cache."""
        key = (n if self._needs_length else None, config, str(device))
        if key not in self._modules:
            bound = ir.bind(self.pattern, n) if self._needs_length else self.pattern
            self._modules[key] = load_kernels(bound, config, device)
        return self._modules[key]

    def mask_picture(self, n: int, heads: int = 1, device=None) -> torch.Tensor:
        """int8 ``[heads, n, n]``: the generated predicate itself, element by
        element (for tests and debugging; small ``n``)."""
        device = torch.device(device or ("cpu" if interpreting() else "cuda"))
        config = self.config_for(64, torch.float16)
        module = self.kernels(n, config, device)
        ir.check_heads(self.pattern, heads)
        out = torch.zeros((heads, n, n), dtype=torch.int8, device=device)
        rand = _random_buffer(module.RANDOM_TABLES, n, device, module.PATTERN_ARGS)
        grid = (triton_cdiv(n, 16), triton_cdiv(n, 16), heads)
        module.pattern_mask_picture[grid](out, rand, n, BLOCK_M=16, BLOCK_N=16)
        return out


def launch_key(q, k) -> tuple:
    """``(n, H, Hkv, head_dim, dtype, device)`` of inputs as the kernels take them."""
    return q.shape[2], q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device


def attend(q, k, v, scale, launches_for, terms: ScoreTerms = NO_TERMS):
    """o, lse of checked inputs through ``_AttentionFunction`` over the launches
    ``launches_for(q, k)`` gives for them once their head dim is padded
    (zeros add nothing to q.k, and o's extra columns are sliced away), with
    the score terms ``terms`` (checked: ``check_terms``)."""
    D = q.shape[-1]
    scale = _float32_scale(_check_scale(scale, D))
    if terms.softcap is not None and max(abs(scale) / terms.softcap, terms.softcap * _LOG2E) > _FP32.max:
        raise ValueError(f"softcap={terms.softcap!r} with scale={scale!r} is outside float32's range: the "
                         "Triton kernels compute scale / softcap and softcap / ln(2) in float32")
    Dp = padded_head_dim(D)
    if Dp != D:
        q, k, v = (F.pad(x, (0, Dp - D)) for x in (q, k, v))
    o, lse = _AttentionFunction.apply(q, k, v, scale, launches_for(q, k), terms.softcap, *terms.tensors())
    return (o[..., :D] if Dp != D else o), lse


def _float32_scale(scale: float) -> float:
    """The scale as the kernels can use it: they compute scores in float32,
    times 1/ln(2). One that overflows there is an error (the scores would be
    inf or NaN); one below float32's smallest normal number becomes 0.0, what
    it is at float32's resolution (every score it makes rounds away against
    the softmax's 1; left subnormal, its products are flushed or not
    depending on where the kernel runs)."""
    if abs(scale) * _LOG2E > _FP32.max:
        raise ValueError(f"scale={scale!r} is outside float32's range: the Triton kernels compute the scores "
                         f"in float32, so |scale| must be at most {_FP32.max / _LOG2E:.3g}")
    return 0.0 if abs(scale) * _LOG2E < _FP32.tiny else scale


def load_kernels(pattern: ir.Pattern, config: KernelConfig, device=None, appendix: str = ""):
    """The kernel module of a bound pattern and config, through the disk cache;
    ``appendix``: more kernels to append to it (``decode.py``'s).

    The cache key is the generated text itself (with what compiles it), not
    the pattern: patterns that differ only in their integers generate one
    text (codegen.py) and so share one module and its compiled kernels. What
    this returns is that module's namespace for this pattern: the same
    objects, plus ``PATTERN_ARGS``, the integers the kernels read from
    ``RANDOM`` (``_random_buffer``) and ``make_mask_mod`` takes."""
    import triton

    capability = "interpreter" if interpreting() else _capability(device)
    if interpreting():
        _interpret.patch_bf16_dot()  # else the interpreter's bf16 tl.dot multiplies bit patterns
    else:
        cache.remember_triton_key()  # before the first launch: Triton's cache lookup needs it
    source = codegen.generate_source(pattern, config) + appendix
    key = cache.cache_key("patterncc-triton", codegen.GENERATOR_VERSION, codegen.SOURCE_HASH,
                          hashlib.sha256(source.encode()).hexdigest(), triton.__version__, capability)
    return _with_args(cache.load_module(key, lambda: source), codegen.pattern_args(pattern))


def _with_args(module: types.ModuleType, args: tuple[int, ...]) -> types.ModuleType:
    """A namespace of ``module``'s own objects (its kernels are shared, not
    copied) that also holds one pattern's ``PATTERN_ARGS``."""
    bound = types.ModuleType(module.__name__, module.__doc__)
    bound.__dict__.update(module.__dict__)
    bound.PATTERN_ARGS = args
    return bound


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _capability(device) -> str:
    # A CPU device on a CUDA machine is legitimate (flex.mask_mod evaluates its
    # torch predicate on the CPU by default): no capability to ask for there.
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    return "sm_%d%d" % torch.cuda.get_device_capability(device)


# ----------------------------------------------------------------------------
# Input checks: messages name the argument
# ----------------------------------------------------------------------------


def check_inputs(q, k, v):
    """q, k, v as the kernels take them, or a TypeError/ValueError naming the argument."""
    return _check_inputs(q, k, v)


def check_tensors(q, k, v) -> None:
    """q, k and v are 4-D torch tensors of one dtype the kernels take, on one
    device they run on; else a TypeError/ValueError naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, n, D], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; the Triton backend takes bfloat16, float16 or float32")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}: q, k and v must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: q, k and v must share one device")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(f"q, k and v are on {q.device}: the Triton backend needs CUDA tensors "
                         "(CPU tensors only with TRITON_INTERPRET=1, which runs the kernels in numpy)")


def _check_inputs(q, k, v):
    check_tensors(q, k, v)
    B, H, n, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Bk, Hkv, nk, Dk = k.shape
    for what, mine, theirs in (("batch size", Bk, B), ("sequence length", nk, n), ("head dim", Dk, D)):
        if mine != theirs:
            raise ValueError(f"k and v have {what} {mine} but q has {theirs} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if min(B, H, n, D, Hkv) < 1:
        raise ValueError(f"every dimension of q and k must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of k's and v's heads Hkv={Hkv}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} (q.shape[3]) is over the Triton backend's limit of {MAX_HEAD_DIM}")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"B * H = {B * H} is over the CUDA grid limit of {_MAX_GRID_Y} programs per tile")
    if n >= 2**31 - 1:
        raise ValueError(f"sequence length n={n} does not fit the kernels' int32 positions")
    # The kernels take any strides except in the last dimension.
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))


# ----------------------------------------------------------------------------
# Device tables: each kernel's step lists and tile order, and the random tables, on the device
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _DeviceTables:
    """The step lists of each kernel (tables.py) and the random tables, on the device."""

    layout_heads: int
    fwd: tuple  # (full_ptr, full_steps, part_ptr, part_steps, tile_order): query tiles of block_m
    dq: tuple  # the same for query tiles of block_m2
    dkdv: tuple  # the same for key tiles of block_n1 (tile order per key/value head)
    random: torch.Tensor  # int32: table offsets, then the random(...) tables
    # how each kernel walks its tiles: "steps" (full_steps is the FULL step
    # list), "runs" (full_steps is tables.run_table, two runs per tile,
    # flattened) or "band" (tables.band_table, flattened; backward only)
    fwd_walk: str = "steps"
    dq_walk: str = "steps"
    dkdv_walk: str = "steps"

    @staticmethod
    def build(lay, Hkv: int, config: KernelConfig, module, device, packing=None) -> "_DeviceTables":
        """``module``: the kernels' (``load_kernels``), whose random tables and
        integers ``RANDOM`` holds. ``packing``: ``(first_slot, align)`` for a packed batch's layout
        (``tables.local_steps``): each tile's steps counted from its sequence's first slot."""

        def steps_of(orientation: str, tile: int, step: int) -> tables.StepLists:
            ptr, idx, full = ((lay.kv_ptr, lay.kv_idx, lay.kv_full) if orientation == "kv"
                              else (lay.q_ptr, lay.q_idx, lay.q_full))
            rows = tables.kernel_steps(ptr, idx, full, lay.seq_len, lay.block, tile, step)
            return rows if packing is None else tables.local_steps(rows, tile, step, *packing)

        return _DeviceTables.from_steps(steps_of, lay.heads, lay.seq_len, Hkv, config, module, device)

    @staticmethod
    def from_steps(steps_of, heads: int, n: int, Hkv: int, config: KernelConfig, module,
                   device) -> "_DeviceTables":
        """The tables of the kernels' step lists ``steps_of(orientation, tile,
        step)`` (``"kv"``: query tiles walking key steps, ``"q"``: key tiles
        walking query steps) of a layout with ``heads`` heads over ``n`` slots."""

        def dev(a):  # never empty: a null data pointer is not worth the doubt
            a = np.ascontiguousarray(a, dtype=np.int32)
            return torch.from_numpy(a if a.size else np.zeros(1, dtype=np.int32)).to(device)

        def lists(steps: tables.StepLists, cost, band: bool = False):
            """The kernel's device tables, and how it walks them."""
            table = tables.band_table(steps) if band else None
            walk = "band"
            if table is None:
                table, walk = tables.run_table(steps), "runs"
            if table is None:
                table, walk = steps.full_steps, "steps"
            arrays = (steps.full_ptr, table.ravel(), steps.part_ptr, steps.part_steps, tables.tile_order(cost))
            return tuple(dev(a) for a in arrays), walk

        rows = steps_of("kv", config.block_m, config.block_n)
        fwd, fwd_walk = lists(rows, rows.cost)
        if (config.block_m2, config.block_n2) != (config.block_m, config.block_n):
            rows = steps_of("kv", config.block_m2, config.block_n2)
            dq, dq_walk = lists(rows, rows.cost, config.bwd_band)
        else:  # the forward's tiles: its tables too, unless dQ walks bands
            dq, dq_walk = lists(rows, rows.cost, True) if config.bwd_band else (fwd, fwd_walk)
        cols = steps_of("q", config.block_n1, config.block_m1)
        kv_cost = tables.group_cost(cols.cost, Hkv) if heads > 1 else cols.cost
        dkdv, dkdv_walk = lists(cols, kv_cost, config.bwd_band)
        return _DeviceTables(layout_heads=heads, fwd=fwd, dq=dq, dkdv=dkdv,
                             random=_random_buffer(module.RANDOM_TABLES, n, device, module.PATTERN_ARGS),
                             fwd_walk=fwd_walk, dq_walk=dq_walk, dkdv_walk=dkdv_walk)


def _random_buffer(specs, n: int, device, args: tuple[int, ...]) -> torch.Tensor:
    """int32: ``len(specs)`` offsets (one dummy entry if none), the pattern's
    integers ``args`` (``codegen.pattern_args``: the generated predicate's
    ``a0, a1, ...``), then each ``random(r, b, seed)`` table ``[nb, min(r,
    nb)]`` from ``randomblocks.draw``."""
    parts = [np.array(args, dtype=np.int64)]
    offset = max(len(specs), 1) + len(args)
    offsets = []
    for r, b, seed in specs:
        nb = -(-n // b)
        table = randomblocks.draw(r, nb, seed, np.arange(nb)).ravel()
        offsets.append(offset)
        offset += table.size
        parts.append(table)
    if offset >= 2**31:
        raise LimitError(f"the random(...) tables at n={n} hold {offset} entries, over the int32 limit")
    buf = np.concatenate([np.array(offsets or [0], dtype=np.int64), *parts]).astype(np.int32)  # args fit: codegen
    return torch.from_numpy(buf).to(device)


# ----------------------------------------------------------------------------
# Launches and autograd
# ----------------------------------------------------------------------------


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
            MERGE_IN=o_in is not None, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
            **(terms or _NO_KERNEL_TERMS).forward_args(t.random, sink))
        return o, lse

    def delta(self, o, do, dlse=None):
        """fp32 ``[B, H, n]``: rowsum(dO * O); an lse gradient enters as delta - dlse."""
        B, H, n, D = o.shape
        delta = torch.empty((B, H, n), dtype=torch.float32, device=o.device)
        self.module.attn_bwd_preprocess[(triton_cdiv(n, self.config.block_m2), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], n, H,
            HEAD_DIM=D, BLOCK_M=self.config.block_m2)
        if dlse is not None:
            delta = delta - dlse.to(torch.float32)
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
            scale, self.n, H, H // self.Hkv, *order.args(q.shape[2]),
            BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, Q_ORDER=order.q, K_ORDER=order.k,
            ADD_IN=dk_in is not None, FULL_RUNS=t.dkdv_walk == "runs", BAND=t.dkdv_walk == "band",
            ADDR32=self._rows_fit_int32(q, do),
            **self._backward_constexprs(), **(terms or _NO_KERNEL_TERMS).backward_args(t.random))

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
            hist = torch.zeros((progs, terms.buckets), dtype=torch.float32, device=q.device)
            scratch = torch.empty((progs if terms.rel is not None else 1, cfg.block_m2 * cfg.block_n2),
                                  dtype=torch.float32, device=q.device)
            buffers = dict(PART=part, SCR=scratch, HIST=hist)
            grads.append((part.view(B, H, -1, 3), hist.view(B, H, -1, terms.buckets)))
        o_arg = do if o is None else o  # any [B, H, n, D] pointer when WRITE_DELTA is off
        self._launch(self.module.attn_bwd_dq, (triton_cdiv(self.n, cfg.block_m2), B * H))(
            q, k, v, do, o_arg, lse, delta, dq, dq if dq_in is None else dq_in, t.random, *t.dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *o_arg.stride()[:3], *dq.stride()[:3],
            scale, self.n, H, H // self.Hkv, *order.args(q.shape[2]),
            BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2, Q_ORDER=order.q, K_ORDER=order.k,
            ADD_IN=dq_in is not None, FULL_RUNS=t.dq_walk == "runs", BAND=t.dq_walk == "band",
            WRITE_DELTA=o is not None,
            ADDR32=self._rows_fit_int32(k, v), **self._backward_constexprs(),
            **terms.backward_args(t.random), **terms.dq_args(t.random, buffers, cfg))

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


@dataclass(frozen=True)
class SlotOrder:
    """How a planned component's kernel slots map to tokens (the kernels'
    ``_token``): ``q``/``k`` codes 0 natural, 1 residue(l), 2 columns(l, c);
    ``S = ceil(n / l)`` slots per residue class."""

    q: int = 0
    k: int = 0
    l: int = 1
    S: int = 1
    c: int = 1

    @staticmethod
    def of(q_order, k_order, n: int) -> "SlotOrder":
        """From the planner's TokenOrders of one component."""
        shaped = q_order if q_order.kind != "natural" else k_order
        return SlotOrder(q_order.code, k_order.code, max(1, shaped.l), shaped.classes(n), max(1, shaped.c))

    def args(self, tokens: int) -> tuple[int, int, int, int]:
        """N_TOK, ORD_L, ORD_S, ORD_C for the kernels."""
        return tokens, self.l, self.S, self.c


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

    @staticmethod
    def of(terms: ScoreTerms) -> "_KernelTerms":
        def f32(t):
            return None if t is None else t.detach().to(torch.float32).contiguous()
        return _KernelTerms(terms.softcap, f32(terms.alibi_slopes), f32(terms.sinks), f32(terms.rel_bias))

    @property
    def rel_m(self) -> int:
        return 0 if self.rel is None else (self.rel.shape[1] - 1) // 2

    @property
    def buckets(self) -> int:
        return 1 if self.rel is None else self.rel.shape[1]

    @property
    def wants_grad_buffers(self) -> bool:
        return self.slopes is not None or self.rel is not None

    def backward_args(self, d: torch.Tensor) -> dict:
        """The kernels' score-term arguments (forward's too, less the sink)."""
        return dict(SOFTCAP=self.softcap is not None, ALIBI=self.slopes is not None, REL_BIAS=self.rel is not None,
                    softcap=self.softcap or 1.0, SLOPES=d if self.slopes is None else self.slopes,
                    REL=d if self.rel is None else self.rel, rel_m=self.rel_m)

    def forward_args(self, d: torch.Tensor, sink: bool) -> dict:
        sink = sink and self.sinks is not None
        return dict(self.backward_args(d), SINKS=sink, SINK=self.sinks if sink else d)

    def dq_args(self, d: torch.Tensor, buffers: dict, cfg: KernelConfig) -> dict:
        skew = 1 << (cfg.block_m2 + cfg.block_n2 - 2).bit_length()  # next power of two >= M2 + N2 - 1
        return dict(PART=buffers.get("PART", d), SCR=buffers.get("SCR", d), HIST=buffers.get("HIST", d), SKEW=skew)


_NO_KERNEL_TERMS = _KernelTerms()


def _sink_launch(launches) -> int | None:
    """The launch that adds the sink to its rows' denominators: one that
    reaches every query (the log-sum-exp merge then counts it once), or None."""
    return next((i for i, (_, order) in enumerate(launches) if order.q != 2), None)


# Launches recorded into a CUDA graph: their device tables must outlive the
# per-shape caches' evictions, since a replay reads them with no reference.
_CAPTURED: dict[int, list] = {}


def _keep_if_captured(launches, q) -> None:
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        _CAPTURED.setdefault(id(launches), launches)


def launches_forward(launches, q, k, v, scale, terms: ScoreTerms = NO_TERMS):
    """o, lse of one or more launches ``(run, SlotOrder)``: one launch is
    plain attention; several are a plan's components, merged by log-sum-exp
    inside the forward kernels (``_merged``). ``terms``: the score terms,
    fused into every launch at the tokens' own positions; the sink joins
    the denominators in one launch that reaches every query."""
    _keep_if_captured(launches, q)
    compile_ahead(launches, q, k, v, scale, terms)
    with _on_device_of(q), torch.no_grad():
        kterms = _KernelTerms.of(terms)
        o, lse = _merged(launches, q, k, v, scale, kterms)
        if kterms.sinks is not None and _sink_launch(launches) is None:
            # no launch reaches every query: the sink joins after the merge
            sink = kterms.sinks.view(1, -1, 1)
            new = torch.logaddexp(lse, sink.expand_as(lse))
            o = (o.to(torch.float32) * torch.exp(lse - new).unsqueeze(-1)).to(o.dtype)
            lse = new
        return o, lse


def launches_backward(launches, q, k, v, o, lse, do, dlse, scale, terms: ScoreTerms = NO_TERMS):
    """dq, dk, dv and the terms' gradients (``terms.tensors()`` order, None
    where absent) of the launches' forward, P recomputed from the merged lse
    (never stored); every launch gets the merged delta, and the launches sum
    the gradients in fp32 inside the kernels (``_summed``). ``do`` or ``dlse``
    may be None (no gradient reached that output)."""
    _keep_if_captured(launches, q)
    if do is None:
        do = torch.zeros_like(o)
    do = do if do.stride(-1) == 1 else do.contiguous()
    kterms = _KernelTerms.of(terms)
    grads = []
    with _on_device_of(q):
        # delta, merged: the same for every launch. One launch that reaches
        # every query writes it in its dQ programs (they load dO anyway);
        # otherwise, or with an lse gradient to take in, a pass of its own.
        in_dq = len(launches) == 1 and launches[0][1].q != 2 and dlse is None
        delta = torch.empty_like(lse) if in_dq else launches[0][0].delta(o, do, dlse)
        args = (q, k, v, lse, do, delta, scale)
        (dq,) = _summed([order.q != 2 for _, order in launches], (q,),
                        lambda i, outs, ins: launches[i][0].dq(*args, launches[i][1], *outs, *ins,
                                                               o=o if in_dq else None, terms=kterms, grads=grads))
        dk, dv = _summed([order.k != 2 for _, order in launches], (k, v),
                         lambda i, outs, ins: launches[i][0].dkdv(*args, launches[i][1], *outs, *ins, terms=kterms))
        term_grads = _term_grads(terms, kterms, grads, lse, delta)
    return dq, dk, dv, term_grads


def _term_grads(terms: ScoreTerms, kterms: _KernelTerms, grads: list, lse, delta) -> tuple:
    """The gradients of ``terms.tensors()`` (None where absent), each in its
    tensor's dtype, summed in a fixed order (deterministic): the dQ
    programs' shares ``grads`` [(part [B, H, tiles, 3], hist [B, H, tiles, 2M
    + 1])], one per launch, and, for the sinks, ``-sum_q exp(t - lse_q) *
    delta_q`` (a sink's dS: its probability times (0 - delta))."""
    d_alibi = d_sinks = d_rel = None
    if kterms.slopes is not None:
        d_alibi = -sum(part[..., 0].sum(dim=(0, 2)) for part, _ in grads)
        d_alibi = d_alibi.to(terms.alibi_slopes.dtype)
    if kterms.sinks is not None:
        p_sink = torch.exp(kterms.sinks.view(1, -1, 1) - lse)
        d_sinks = -(p_sink * delta).sum(dim=(0, 2)).to(terms.sinks.dtype)
    if kterms.rel is not None:
        d_rel = sum(hist.sum(dim=(0, 2)) for _, hist in grads)
        d_rel[:, 0] += sum(part[..., 1].sum(dim=(0, 2)) for part, _ in grads)
        d_rel[:, -1] += sum(part[..., 2].sum(dim=(0, 2)) for part, _ in grads)
        d_rel = d_rel.to(terms.rel_bias.dtype)
    return d_alibi, d_sinks, d_rel


class _AttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (o, lse) over the launches, differentiable in q, k, v
    (``launches_forward`` / ``launches_backward``). Only q, k, v, o and lse
    are saved."""

    @staticmethod
    def forward(ctx, q, k, v, scale, launches, softcap, alibi_slopes, sinks, rel_bias):
        terms = ScoreTerms(softcap, alibi_slopes, sinks, rel_bias)
        o, lse = launches_forward(launches, q, k, v, scale, terms)
        ctx.save_for_backward(q, k, v, o, lse, *(t for t in terms.tensors() if t is not None))
        ctx.launches, ctx.scale, ctx.softcap = launches, scale, softcap
        ctx.given = tuple(t is not None for t in terms.tensors())
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *given = ctx.saved_tensors
        tensors = [given.pop(0) if g else None for g in ctx.given]
        terms = ScoreTerms(ctx.softcap, *tensors)
        dq, dk, dv, term_grads = launches_backward(ctx.launches, q, k, v, o, lse, do, dlse, ctx.scale, terms)
        return dq, dk, dv, None, None, None, *term_grads


def _launch_order(covers) -> list[int]:
    """The order to run launches in when each adds to the ones before:
    ``covers[i]``, launch i writes every token. A covering launch goes last
    (it can then write a fresh output in the final dtype) and another first
    where there is one (it then needs no initialized buffer)."""
    seq = sorted(range(len(covers)), key=lambda i: not covers[i])  # covering ones first
    if covers[seq[0]]:
        seq = seq[1:] + seq[:1]  # one covering launch last; a second one, if any, is now first
    return seq


def _merged(launches, q, k, v, scale, terms: _KernelTerms | None = None):
    """o (q's dtype) and lse (fp32) of several launches merged by
    log-sum-exp inside the forward kernels (``MERGE_IN``), through
    ``_accumulated``: tokens no launch reaches keep o = 0, lse = -inf.
    The sink, if any among ``terms``, joins in one launch (``_sink_launch``)."""
    B, H, n, D = q.shape
    outputs = (((B, H, n, D), q.dtype, 0.0), ((B, H, n), torch.float32, float("-inf")))
    sink = _sink_launch(launches)

    def launch(i, outs, ins):
        with_terms = {} if terms is None else dict(terms=terms, sink=i == sink)
        return launches[i][0].forward(q, k, v, scale, launches[i][1], *outs, *ins, **with_terms)

    return _accumulated([order.q != 2 for _, order in launches], outputs, q.device, launch)


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


# ----------------------------------------------------------------------------
# Compiling a first call's kernels in parallel
# ----------------------------------------------------------------------------

# The runs whose kernels compile_ahead has compiled (or found compiled).
_AHEAD: "weakref.WeakSet[_Run]" = weakref.WeakSet()
_pool = None


def compile_ahead(launches, q, k, v, scale, terms: ScoreTerms = NO_TERMS) -> None:
    """Compile every kernel a forward and backward pass of these launches
    will run, in parallel, before the forward runs: Triton compiles a kernel
    when it is first launched, so a first call would otherwise compile its
    forward, and then the backward's kernels, one after the other (four per
    launch). The same launch code runs here on meta tensors shaped and
    strided like the call's, with each kernel's launch replaced by its
    ``warmup`` (which compiles, or finds the kernel in Triton's caches, and
    launches nothing) inside Triton's ``AsyncCompileMode``, which compiles
    them on a thread pool. Once per run: later calls pay one set lookup.

    The backward is warmed as it runs when only ``o`` gets a gradient; a
    kernel this misses (an ``lse`` gradient, an output gradient with other
    strides) compiles at its launch, as without this. A no-op under the
    interpreter, during CUDA graph capture, on a Triton without
    ``AsyncCompileMode`` (3.4+) and with ``PATTERNCC_COMPILE_AHEAD=0``."""
    global _ahead_failed
    if q.device.type == "meta" or all(run in _AHEAD for run, _ in launches) or not _compiles_ahead(q):
        return  # (meta: the warm-up's own launches)
    import triton

    def meta(x):
        return None if x is None else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")

    warming = [(replace(run, module=_Warming(run.module)), order) for run, order in launches]
    mq, mk, mv = (meta(x) for x in (q, k, v))
    mterms = ScoreTerms(terms.softcap, *(meta(t) for t in terms.tensors()))
    try:
        with _on_device_of(q), torch.no_grad(), triton.AsyncCompileMode(_compile_pool()):
            o, lse = launches_forward(warming, mq, mk, mv, scale, mterms)
            launches_backward(warming, mq, mk, mv, o, lse, torch.empty_like(o), None, scale, mterms)
    except Exception as err:  # the launches compile their kernels themselves, as without this
        _ahead_failed = True
        warnings.warn(f"patterncc: compiling a first call's kernels in parallel failed ({type(err).__name__}: "
                      f"{err}); they compile one by one at their launches", RuntimeWarning, stacklevel=3)
        return
    _AHEAD.update(run for run, _ in launches)


_ahead_failed = False


def _compiles_ahead(q) -> bool:
    import triton

    return (q.is_cuda and not interpreting() and not _ahead_failed and hasattr(triton, "AsyncCompileMode")
            and os.environ.get("PATTERNCC_COMPILE_AHEAD") != "0" and not torch.cuda.is_current_stream_capturing())


def _compile_pool():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        # Triton releases the GIL in its compiler passes and ptxas runs as a process: threads overlap.
        _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="patterncc-compile")
    return _pool


class _Warming:
    """A kernel module whose launches ``kernel[grid](*args, **kwargs)`` are
    ``kernel.warmup(*args, grid=grid, **kwargs)``: compile, do not run."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return _WarmKernel(getattr(self._module, name))


@dataclass(frozen=True)
class _WarmKernel:
    kernel: object

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)
