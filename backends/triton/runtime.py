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

This module is the call's path: ``TritonAttention`` and its per-shape
caches, the kernel modules, the autograd Function over a call's launches,
and their compiling ahead. Its parts: ``inputs.py`` (the input checks),
``device_tables.py`` (a layout's tables on the device), ``launch.py`` (one
shape's kernel launches), ``merge.py`` (several launches as one result);
the names other modules use stay importable from here.
"""

from __future__ import annotations

import hashlib
import os
import types
import warnings
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from patterncc import ir
from patterncc.blocklayout.builder import build as build_layout
from patterncc.blocklayout.format import BlockLayout
from patterncc.lru import LRU
from patterncc.orders import SlotOrder
from patterncc.scores import NO_TERMS, ScoreTerms, check_terms

from patterncc.backends.reference.checks import check_scale as _check_scale

from . import _interpret, cache, codegen, seeds, standin
from ._interpret import interpreting
from .config import DEFAULT_BLOCK, KernelConfig, default_config, padded_head_dim
from .device_tables import _DeviceTables, _random_buffer  # noqa: F401  (re-exported)
from .inputs import _check_inputs, check_inputs, check_tensors  # noqa: F401  (re-exported)
from .launch import _KernelTerms, _Run, aligned_rows, triton_cdiv, with_aligned_rows  # noqa: F401  (re-exported)
from .merge import _merged, _on_device_of, _sink_launch, _summed, _term_grads  # noqa: F401  (re-exported)

_FP32 = torch.finfo(torch.float32)
_LOG2E = 1.4426950408889634  # the kernels multiply the scale by 1/ln(2) to use exp2
_CACHE_ENTRIES = 32  # layouts / device tables kept per TritonAttention


class TritonAttention:
    """``attn(q, k, v, scale=None, return_lse=False)`` running generated Triton kernels.

    ``block``: the layout block (default 64, config.py says why); ``config``: a ``KernelConfig``
    fixing the block and every tile (default: ``default_config`` per head dim
    and dtype). Give one or the other, or both with the same block.
    """

    def __init__(self, pattern: ir.Pattern, *, block: int | None = None, config: KernelConfig | None = None,
                 shared_ints: bool | None = None):
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
        # integers as run-time arguments (codegen.shares_ints); a planned component's follow its pattern's
        self._shared_ints = codegen.shares_ints(pattern) if shared_ints is None else shared_ints
        self._layouts = LRU(_CACHE_ENTRIES)
        self._tables = LRU(_CACHE_ENTRIES)
        self._modules = LRU(_CACHE_ENTRIES)
        # The per-call fast path: one dict lookup from the call's shape to its launches.
        self._runs = LRU(_CACHE_ENTRIES)
        # a first call's kernels while this pattern's own compile (none with a config of the caller's)
        self._standins = None if config else standin.StandIns(pattern, block, load_bitmap_kernels, self.layout)

    def __repr__(self) -> str:
        return f"TritonAttention({str(self.pattern)!r}, block={self.block}, config={self.config})"

    # -- the call

    def __call__(self, q, k, v, scale=None, return_lse: bool = False, *, softcap=None, alibi_slopes=None,
                 sinks=None, rel_bias=None):
        q, k, v = _check_inputs(q, k, v)
        terms = check_terms(ScoreTerms(softcap, alibi_slopes, sinks, rel_bias), q.shape[1], q.device)
        o, lse = attend(q, k, v, scale, lambda q, k: [(self.launcher(*launch_key(q, k)), SlotOrder())], terms,
                        self._standins)
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
            self._modules[key] = load_kernels(bound, config, device, shared=self._shared_ints)
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


def attend(q, k, v, scale, launches_for, terms: ScoreTerms = NO_TERMS, standins: "standin.StandIns | None" = None):
    """o, lse of checked inputs through ``_AttentionFunction`` over the launches
    ``launches_for(q, k)`` gives for them once their head dim is padded
    (zeros add nothing to q.k, and o's extra columns are sliced away), with
    the score terms ``terms`` (checked: ``check_terms``). ``standins``: the
    pattern's stand-in kernels, run while the launches' own compile
    (``standin.py``)."""
    D = q.shape[-1]
    scale = _float32_scale(_check_scale(scale, D))
    if terms.softcap is not None and max(abs(scale) / terms.softcap, terms.softcap * _LOG2E) > _FP32.max:
        raise ValueError(f"softcap={terms.softcap!r} with scale={scale!r} is outside float32's range: the "
                         "Triton kernels compute scale / softcap and softcap / ln(2) in float32")
    Dp = padded_head_dim(D)
    if Dp != D:
        q, k, v = (F.pad(x, (0, Dp - D)) for x in (q, k, v))
    launches = launches_for(q, k)
    if standins is not None and q.shape[0]:  # (a batch of no rows launches nothing)
        launches = _standin_or(launches, standins, q, k, v, scale, terms)
    o, lse = _AttentionFunction.apply(q, k, v, scale, launches, terms.softcap, *terms.tensors())
    return (o[..., :D] if Dp != D else o), lse


def _standin_or(launches, standins, q, k, v, scale, terms):
    """The launches a call runs: the pattern's own, or the stand-in's
    (``standin.py``; ``PATTERNCC_STANDIN``). A warm call pays one check."""
    mode = standin.mode()
    if mode == "always":
        return standin.always(launches, standins, q, k)
    if mode == "0" or all(run in _AHEAD for run, _ in launches) or not _compiles_ahead(q):
        return launches
    return standin.while_compiling(launches, standins, q, k, v, scale, terms, compile=compile_ahead,
                                   ready=_AHEAD.__contains__)


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


def load_kernels(pattern: ir.Pattern, config: KernelConfig, device=None, appendix: str = "",
                 shared: bool | None = None):
    """The kernel module of a bound pattern and config, through the disk cache;
    ``appendix``: more kernels to append to it (``decode.py``'s); ``shared``:
    ``codegen.shares_ints`` of the pattern before it was bound.

    The cache key is the generated text itself (with what compiles it), not
    the pattern: patterns that differ only in their integers generate one
    text (codegen.py) and so share one module and its compiled kernels. What
    this returns is that module's namespace for this pattern: the same
    objects, plus ``PATTERN_ARGS``, the integers the kernels read from
    ``RANDOM`` (``_random_buffer``) and ``make_mask_mod`` takes."""
    source = codegen.generate_source(pattern, config, shared=shared) + appendix
    return _with_args(_load_source(source, device), codegen.pattern_args(pattern, shared=shared))


def load_bitmap_kernels(config: KernelConfig, device=None):
    """The module of ``codegen.bitmap_source``: any pattern's kernels, its
    cells read from ``RANDOM`` (``standin.py``), through the disk cache."""
    return _with_args(_load_source(codegen.bitmap_source(config), device), ())


def _load_source(source: str, device):
    """The module of a generated text, through the disk cache."""
    import triton

    capability = "interpreter" if interpreting() else _capability(device)
    if interpreting():
        _interpret.patch_bf16_dot()  # else the interpreter's bf16 tl.dot multiplies bit patterns
    else:
        cache.remember_triton_key()  # before the first launch: Triton's cache lookup needs it
    key = cache.cache_key("patterncc-triton", codegen.GENERATOR_VERSION, codegen.SOURCE_HASH,
                          hashlib.sha256(source.encode()).hexdigest(), triton.__version__, capability)
    return cache.load_module(key, lambda: source)


def _with_args(module: types.ModuleType, args: tuple[int, ...]) -> types.ModuleType:
    """A namespace of ``module``'s own objects (its kernels are shared, not
    copied) that also holds one pattern's ``PATTERN_ARGS``."""
    bound = types.ModuleType(module.__name__, module.__doc__)
    bound.__dict__.update(module.__dict__)
    bound.PATTERN_ARGS = args
    return bound


def _capability(device) -> str:
    # A CPU device on a CUDA machine is legitimate (flex.mask_mod evaluates its
    # torch predicate on the CPU by default): no capability to ask for there.
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    return "sm_%d%d" % torch.cuda.get_device_capability(device)


# ----------------------------------------------------------------------------
# A call's launches, as one autograd Function
# ----------------------------------------------------------------------------


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
    if not q.shape[0]:  # a batch of no rows: nothing to launch
        return _empty_as(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _keep_if_captured(launches, q)
    standin.settle(launches)
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
    where absent or not taken: ``ScoreTerms.grads``) of the launches' forward, P recomputed from the merged lse
    (never stored); every launch gets the merged delta, and the launches sum
    the gradients in fp32 inside the kernels (``_summed``). ``do`` or ``dlse``
    may be None (no gradient reached that output)."""
    if not q.shape[0]:  # a batch of no rows: no output depends on anything
        return (*(torch.zeros_like(x) for x in (q, k, v)),
                tuple(torch.zeros_like(t) if terms.wants(i) else None for i, t in enumerate(terms.tensors())))
    _keep_if_captured(launches, q)
    standin.settle(launches)
    if do is None:
        do = _empty_as(o).zero_()
    do = do if do.stride(-1) == 1 else do.contiguous()
    kterms = _KernelTerms.of(terms)
    grads = []
    with _on_device_of(q):
        # delta, merged: the same for every launch. One launch that reaches
        # every query writes it in its dQ programs (they load dO anyway);
        # otherwise, or with an lse gradient to take in, a pass of its own.
        in_dq = len(launches) == 1 and launches[0][1].covers_queries and dlse is None
        lse = with_aligned_rows(lse)  # (rows 64-byte aligned at every n: launch.aligned_rows)
        delta = aligned_rows(*lse.shape, lse.device) if in_dq else launches[0][0].delta(o, do, dlse)
        args = (q, k, v, lse, do, delta, scale)
        (dq,) = _summed([order.covers_queries for _, order in launches], (q,),
                        lambda i, outs, ins: launches[i][0].dq(*args, launches[i][1], *outs, *ins,
                                                               o=o if in_dq else None, terms=kterms, grads=grads))
        dk, dv = _summed([order.covers_keys for _, order in launches], (k, v),
                         lambda i, outs, ins: launches[i][0].dkdv(*args, launches[i][1], *outs, *ins, terms=kterms))
        term_grads = _term_grads(terms, kterms, grads, lse, delta)
    standin.backward_ran()
    return dq, dk, dv, term_grads


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
    @once_differentiable  # the kernels' gradients have no gradient of their own: differentiating them again
    def backward(ctx, do, dlse):  # (create_graph=True, a gradient penalty) is an error, never a silent 0
        q, k, v, o, lse, *given = ctx.saved_tensors
        tensors = [given.pop(0) if g else None for g in ctx.given]
        terms = ScoreTerms(ctx.softcap, *tensors).taking(ctx.needs_input_grad[6:9])
        dq, dk, dv, term_grads = launches_backward(ctx.launches, q, k, v, o, lse, do, dlse, ctx.scale, terms)
        return dq, dk, dv, None, None, None, *term_grads


# ----------------------------------------------------------------------------
# Compiling a first call's kernels in parallel
# ----------------------------------------------------------------------------

# The runs whose kernels compile_ahead has compiled (or found compiled).
_AHEAD: "weakref.WeakSet[_Run]" = weakref.WeakSet()
_pool = None


def compile_ahead(launches, q, k, v, scale, terms: ScoreTerms = NO_TERMS, strict: bool = False) -> None:
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
    ``AsyncCompileMode`` (3.4+) and with ``PATTERNCC_COMPILE_AHEAD=0``.
    The compiled kernels are then loaded, and their launchers built, in
    parallel too (``load_ahead``; ``PATTERNCC_LOAD_AHEAD=0`` leaves that to
    each first launch). Kernels an earlier process compiled for these
    modules are put into Triton's in-memory cache first, so that the
    warm-up finds them there without Triton's lookup (``seeds.py``); what
    this one compiled or found is recorded for the next. A failure turns
    compiling ahead off for the process, with a warning; ``strict`` raises
    it instead (the stand-in's kernels: ``standin.py`` runs the pattern's
    own then)."""
    global _ahead_failed
    if q.device.type == "meta" or all(run in _AHEAD for run, _ in launches) or not _compiles_ahead(q):
        return  # (meta: the warm-up's own launches)
    import triton

    def meta(x):
        return None if x is None else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")

    warming = [(replace(run, module=_Warming(run.module)), order) for run, order in launches]
    mq, mk, mv = (meta(x) for x in (q, k, v))
    # the backward takes the gradients of the tensors that want one (its kernels' TERM_GRADS)
    mterms = ScoreTerms(terms.softcap, *(meta(t) for t in terms.tensors())).taking(
        [t is not None and t.requires_grad for t in terms.tensors()])
    compiles = _Recorded(_compile_pool())
    modules = list({id(run.module): run.module for run, _ in launches}.values())
    try:
        device = _cuda_index(q)
        with _on_device_of(q), torch.no_grad(), triton.AsyncCompileMode(compiles):
            # (on the inputs' device: Triton makes a device's caches for its current one)
            planted = [] if device is None else [kernel for module in modules for kernel in seeds.plant(module, device)]
            o, lse = launches_forward(warming, mq, mk, mv, scale, mterms)
            launches_backward(warming, mq, mk, mv, o, lse, _empty_as(o), None, scale, mterms)
    except Exception as err:  # the launches compile their kernels themselves, as without this
        if strict:
            raise
        _ahead_failed = True
        warnings.warn(f"patterncc: compiling a first call's kernels in parallel failed ({type(err).__name__}: "
                      f"{err}); they compile one by one at their launches", RuntimeWarning, stacklevel=3)
        return
    if os.environ.get("PATTERNCC_LOAD_AHEAD") != "0":
        load_ahead(planted + compiles.kernels(), lambda: torch.cuda.device(q.device), _compile_pool())
    if device is not None:
        for module in modules:
            seeds.record(module, device)
    _AHEAD.update(run for run, _ in launches)


def _cuda_index(x) -> int | None:
    """``x``'s CUDA device index, the key of Triton's per-device caches; None off CUDA."""
    if not x.is_cuda:
        return None
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


class _Recorded(Executor):
    """``pool``, keeping the futures of what it is given (``kernels``)."""

    def __init__(self, pool: Executor):
        self.pool = pool
        self.futures = []

    def submit(self, fn, /, *args, **kwargs):
        future = self.pool.submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future

    def kernels(self) -> list:
        """The compiled kernels the jobs returned (each once)."""
        from triton.compiler import CompiledKernel

        done = [f.result() for f in self.futures if f.done() and f.exception() is None]
        return list({id(k): k for k in done if isinstance(k, CompiledKernel)}.values())


def load_ahead(kernels, on_device, pool: Executor) -> None:
    """Build each compiled kernel's launcher and load its binary onto the
    device, in parallel on ``pool`` (each job inside ``on_device()``).

    Triton does both at a kernel's first launch, one kernel after the other,
    and a launcher missing from Triton's cache is a C compile, about half a
    second each (``triton.runtime.build.compile_module_from_src``): a
    first-ever call launches four to eight distinct kernels. A kernel that
    fails here (more shared memory than the card has, say) is left to fail
    again at its launch, where ``_Run._launch`` handles it."""

    def load(kernel):
        try:
            with on_device():
                kernel._init_handles()
        except Exception:  # noqa: BLE001  (the launch raises it again, where it is handled)
            if getattr(kernel, "module", None) is None:
                # Not loaded, though its launcher may be built: the launch starts over, as without this.
                kernel._run = None

    for future in [pool.submit(load, kernel) for kernel in kernels]:
        future.result()


_ahead_failed = False


def _empty_as(x):
    """``torch.empty_like`` of a dense tensor. Not empty_like itself: on meta
    tensors (``compile_ahead``) that runs a Python reference which imports
    sympy, seconds of a first call in a process that never traces."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _compiles_ahead(q) -> bool:
    import triton

    return (q.is_cuda and not interpreting() and not _ahead_failed and hasattr(triton, "AsyncCompileMode")
            and os.environ.get("PATTERNCC_COMPILE_AHEAD") != "0" and not torch.cuda.is_current_stream_capturing())


def _compile_pool():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        # Triton releases the GIL in its compiler passes and ptxas runs as a process: threads overlap
        # (bench/compile_parallel.py: 2.1x on 2 CPUs, Triton 3.9; forked processes 1.5-1.95x there).
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
