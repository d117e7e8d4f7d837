"""Stand-in kernels: a new pattern runs at once while its own kernels compile.

A pattern's own kernels (codegen.py) are compiled for it: a second or more
on the first call of a pattern new to the machine, as many kernels as its
plan has components times three. One module serves every pattern, though:
``codegen.bitmap_source``, whose predicate reads the pattern's cells from a
bitmap handed over at run time, so its kernels are compiled once per
config (head dim, dtype, tiles) and score terms, whatever the pattern. A
new pattern's first call runs on them while its own kernels compile in a
thread, and its later calls switch to those as soon as they are ready.

The bitmap (``bitmap_host``, int32, the kernels' ``RANDOM`` argument):

- ``[0]`` 0, ``[1]`` ``nb`` (blocks of ``B = layout.block`` per side),
  ``[2]`` the head stride of the codes (``nb * nb``, or 0 when the pattern
  ignores the head), ``[3]`` the offset of the words;
- the codes, int32 ``[heads, nb, nb]``: -1 EMPTY, -2 FULL, ``p >= 0`` the
  ``p``-th PARTIAL block;
- the words: ``B * B / 32`` per PARTIAL block, its cells ``(q % B, k % B)``
  row-major, cell ``t`` in bit ``t % 32`` of word ``t // 32``.

It holds only the layout's PARTIAL blocks' cells, evaluated by
``masks.evaluate`` (the definition the reference backend uses), once for
heads with the same pattern, so it costs their number times ``B * B``;
past ``MAX_BITMAP_CELLS`` (or codes past ``MAX_BITMAP_CODES``) a first
call waits for the pattern's own kernels instead.

Which kernels a first call runs (``while_compiling``): the pattern's own
when this machine has compiled them before (a note in the kernel cache,
``compile_key``); otherwise the stand-in's, found in Triton's cache (where
``patterncc warmup``, ``warmup.py``, compiled them ahead) or compiled first
(three or four kernels, the pattern's own are as many per planned
component), and the pattern's own compile in a thread (once the
first call's backward is over, where one follows it), each call switching
to them once they are ready. A forward and its backward always
run the same kernels. The stand-in runs in natural token order, one
launch; a plan that reorders tokens, where that bitmap is over the limits,
gets one per component instead, over the component's layout in its token
order (``planned._PlanStandIns``). Both sets compute the same function,
but with other tiles (and, in natural order, without the planner), so
their results differ in rounding: a run that needs the same bits on
every call sets ``torch.use_deterministic_algorithms(True)`` (or
``PATTERNCC_STANDIN=0``), and the pattern's own kernels always run;
``PATTERNCC_STANDIN=always`` runs every call on the stand-in (to compare
the two). Never while a CUDA graph is captured or under the
``patterncc::attention`` op (``torch.compile``): there the pattern's own
kernels run, after waiting for their compile in flight.
"""

from __future__ import annotations

import os
import threading
import weakref
import warnings
from dataclasses import replace

import numpy as np
import torch

from patterncc import ir, masks
from patterncc.blocklayout.builder import build as build_layout
from patterncc.blocklayout.format import BlockLayout
from patterncc.lru import LRU
from patterncc.orders import SlotOrder

from . import cache
from .config import DEFAULT_BLOCK, default_config, padded_head_dim
from .device_tables import _DeviceTables
from .launch import _Run
from .resident import to_device

MAX_BITMAP_CELLS = 2**25  # cells of PARTIAL blocks evaluated for a bitmap (4 MiB of words)
MAX_BITMAP_CODES = 2**22  # heads * nb * nb codes (16 MiB)
_EMPTY, _FULL = -1, -2
STAGES = 1  # the stand-in kernels' software-pipeline stages (StandIns._make says why); None: the config's
_HEADER = 4
_EVAL_CELLS = 2**22  # cells evaluated per numpy call


def bitmap_host(lay: BlockLayout) -> np.ndarray | None:
    """int32: the layout's pattern as the stand-in kernels read it (the
    module docstring); None where it is over the limits."""
    B, n, nb = lay.block, lay.seq_len, lay.n_qblocks
    if lay.heads * nb * nb > MAX_BITMAP_CODES:
        return None
    pattern = ir.split_terms(lay.pattern)[0]  # score terms never change which pairs attend
    codes = np.full((lay.heads, nb, nb), _EMPTY, dtype=np.int32)
    flat = lay.kv_rows()  # h * nb + i of every pair
    rows, heads = flat % nb, flat // nb
    words, count = [], 0
    seen: dict[tuple, int] = {}  # heads with the same pattern and blocks share their words
    for h in range(lay.heads):
        mine = heads == h
        r, c, full = rows[mine], lay.kv_idx[mine].astype(np.int64), lay.kv_full[mine]
        codes[h, r[full], c[full]] = _FULL
        part_r, part_c = r[~full], c[~full]
        key = (ir.for_head(pattern, h), part_r.tobytes(), part_c.tobytes())
        if key not in seen:
            if (count + part_r.size) * B * B > MAX_BITMAP_CELLS:
                return None
            seen[key] = count
            words.append(_partial_words(key[0], part_r, part_c, B, n))
            count += part_r.size
        codes[h, part_r, part_c] = seen[key] + np.arange(part_r.size, dtype=np.int32)
    header = np.array([0, nb, nb * nb if lay.heads > 1 else 0, _HEADER + codes.size], dtype=np.int32)
    # one block's words of zeros at the end: the kernels read a word for every cell of a partial step,
    # at block 0's place where the cell's block is EMPTY or FULL, so the words are never fewer than that
    return np.concatenate([header, codes.ravel(), *words, np.zeros(B * B // 32, dtype=np.int32)])


def _partial_words(pattern: ir.Pattern, rows: np.ndarray, cols: np.ndarray, B: int, n: int) -> np.ndarray:
    """int32 ``[blocks * B * B / 32]``: the cells of the blocks ``(rows[i],
    cols[i])``, packed (the module docstring's words)."""
    offs = np.arange(B, dtype=np.int64)
    out = []
    step = max(1, _EVAL_CELLS // (B * B))
    for s in range(0, rows.size, step):
        # positions past n (the last block's tail) read n - 1: the kernels mask them anyway
        q = np.minimum(rows[s:s + step, None, None] * B + offs[None, :, None], n - 1)
        k = np.minimum(cols[s:s + step, None, None] * B + offs[None, None, :], n - 1)
        cells = masks.evaluate(pattern, q, k, n).reshape(-1, B * B)
        out.append(np.packbits(cells, axis=1, bitorder="little").view("<i4").ravel())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


class StandIns:
    """The stand-in launch of one pattern per shape (cached); ``load(config,
    device)`` gives the bitmap module (``runtime.load_bitmap_kernels``);
    ``layout(n, H, block)``, where given, the layout the pattern's own
    kernels walk (a planned component's, over its slots), else the
    pattern's own is built."""

    def __init__(self, pattern: ir.Pattern, block: int | None, load, layout=None):
        self.pattern = pattern
        self.block = block or DEFAULT_BLOCK
        self.load = load
        self.layout = layout
        self._runs = LRU(8)

    def launches(self, q, k) -> list | None:
        """The stand-in's launch list for inputs shaped like ``q``, ``k``; None
        where its bitmap is over the limits."""
        run = self.run(*_shape(q, k))
        return None if run is None else [(run, SlotOrder())]

    def run(self, n: int, H: int, Hkv: int, head_dim: int, dtype, device) -> _Run | None:
        """The stand-in ``_Run`` for this shape; None where its bitmap is over the limits."""
        key = (n, H, Hkv, head_dim, dtype, str(device))
        if key not in self._runs:
            self._runs[key] = self._make(*key)
        return self._runs[key]

    def _make(self, n, H, Hkv, head_dim, dtype, device) -> _Run | None:
        ir.check_heads(self.pattern, H)
        lay = self.layout(n, H, self.block) if self.layout else build_layout(self.pattern, n, self.block, H)
        bitmap = bitmap_host(lay)
        if bitmap is None:
            return None
        # the short-walk row's tiles: the bitmap's two gathers per score on the long-walk row's
        # larger tiles spill (528 B a thread in the forward at D = 64, for sm_90), and at D = 128
        # its forward wants more shared memory than the card has (a second compile at launch).
        # One stage, no software pipelining: on an empty machine the stand-in's compile is
        # the first call's critical path, and its longest kernel compiles for sm_90 (2 CPUs)
        # in 0.81 s with one stage against 1.23 s with two (D = 64; D = 128: 1.01 against
        # 1.20 s), while its launches serve a first call or a few.
        config = default_config(padded_head_dim(head_dim), dtype, self.block, walk=0.0)
        if STAGES is not None:
            config = replace(config, fwd_stages=STAGES, bwd_stages=STAGES)
        module = self.load(config, device)
        # FULL steps one by one, never as runs: one specialization of each kernel whatever the
        # layout, so that fewer are compiled (or warmed ahead: ``warmup.py``) for the calls it serves
        tables = _DeviceTables.build(lay, Hkv, config, module, device, runs=False)
        tables = replace(tables, random=to_device(bitmap, device))
        run = _Run(module, tables, config, head_dim, H, Hkv, n, dtype)
        _made.add(run)
        return run


_made: "weakref.WeakSet[_Run]" = weakref.WeakSet()  # every stand-in run (is_standin)


def is_standin(launches: list) -> bool:
    """Whether a launch list runs stand-in kernels (for tests and benchmarks
    to tell which kernels a call ran)."""
    return any(run in _made for run, _ in launches)


# ----------------------------------------------------------------------------
# Which kernels a first call runs
# ----------------------------------------------------------------------------

_lock = threading.Lock()
_pending: dict[str, threading.Event] = {}  # compile_key -> set when that compile in a thread is over
_held: dict[str, threading.Event] = {}  # compile_key -> set when that compile may start (``_start``)
_by_run: dict[int, str] = {}  # id(run) -> its compile_key while that compile is pending, for settle
_failed: set[str] = set()  # compile_key of compiles that raised: own ones in a thread, or the stand-in's
# How long a compile held for its call's backward waits for it before it starts anyway (a forward
# with gradients that no backward follows, say); a first forward+backward takes well under this.
HOLD_SECONDS = 2.0


def mode() -> str:
    """``PATTERNCC_STANDIN``: ``"0"`` never, ``"always"`` every call on the
    stand-in kernels where their bitmap is within the limits (to compare
    them with the pattern's own), else ``"auto"`` (``while_compiling``),
    unless ``torch.use_deterministic_algorithms(True)`` asks for the same
    bits on every run: the switch to the pattern's own kernels would change
    them mid-run."""
    value = os.environ.get("PATTERNCC_STANDIN", "auto")
    if value == "auto" and torch.are_deterministic_algorithms_enabled():
        return "0"
    return value if value in ("0", "always") else "auto"


def always(launches: list, standins: StandIns, q, k) -> list:
    """The stand-in's launches, or ``launches`` where its bitmap is over the limits."""
    mine = standins.launches(q, k)
    return launches if mine is None else mine


def while_compiling(launches: list, standins: StandIns, q, k, v, scale, terms, *, compile, ready) -> list:
    """The launches a call runs: ``launches``, the pattern's own, when
    ``ready(run)`` holds for each run or this machine has compiled them
    before (``compile_key``: Triton finds them in its cache at their
    launch); else the stand-in's, compiled now (``compile(launches, q, k,
    v, scale, terms)``), with the pattern's own then compiling in a thread
    (after this call's backward, where autograd records it: ``_start``),
    once for every launch list of the same kernels, until they are ready."""
    if all(ready(run) for run, _ in launches):
        return launches
    key = compile_key(launches, terms)
    with _lock:
        own = _pending.get(key)
    if own is None and cache.marked(key):
        return launches
    mine = standins.launches(q, k)
    if mine is None:
        if own is not None:
            own.wait()
        return launches
    if not all(ready(run) for run, _ in mine):
        failed = compile_key(mine, terms)
        if failed in _failed:
            return launches
        try:
            compile(mine, q, k, v, scale, terms, strict=True)  # found in Triton's cache, or compiled
        except Exception as err:  # noqa: BLE001  (the pattern's own kernels run, as without a stand-in)
            _failed.add(failed)
            warnings.warn(f"patterncc: the stand-in kernels failed to compile ({type(err).__name__}: {err}); "
                          "a new pattern's first calls wait for its own", RuntimeWarning, stacklevel=4)
            return launches
        if not all(ready(run) for run, _ in mine):  # not compiled ahead (no AsyncCompileMode): the launches
            return launches  # compile as they run
    if own is None and key not in _failed:
        _start(key, launches, q, k, v, scale, terms, compile, ready, hold=_backward_follows(q, k, v, terms))
    return mine


def _backward_follows(q, k, v, terms) -> bool:
    """Whether autograd records this call, so that a backward may follow it."""
    given = () if terms is None else terms.tensors()
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, *given))


def compile_key(launches: list, terms) -> str:
    """What decides the kernels a launch list compiles, roughly as Triton
    specializes them: each run's module (its text, Triton's version, the
    card), tiles, head dim, dtype, walks and token orders, whether heads
    are grouped, and which score terms come and want gradients (no kernel
    specializes on the length: test_packed_triton.py). Two lists with one
    key compile the same kernels; a kernel a key misses compiles at its
    launch."""
    runs = tuple((run.module.__name__, run.config, run.head_dim, str(run.dtype), run.H == run.Hkv,
                  run.tables.layout_heads > 1, run.tables.fwd_walk, run.tables.dq_walk, run.tables.dkdv_walk,
                  order.q, order.k) for run, order in launches)
    given = () if terms is None else (terms.softcap is not None, *(
        (t is not None, t is not None and t.requires_grad) for t in terms.tensors()))
    return cache.cache_key("patterncc-compiled", runs, given, os.environ.get("TRITON_CACHE_DIR"))


def _start(key: str, launches, q, k, v, scale, terms, compile, ready, hold: bool = False) -> None:
    """Compile the launches' kernels in a thread; note ``key`` on disk once
    they are. ``hold``: the compile waits for the end of the backward pass
    that follows this call (``backward_ran``; at most ``HOLD_SECONDS``).
    Its Python parts hold the GIL: a first forward+backward on the stand-in
    took 0.66 s from the forward's issue to the backward's end with six
    kernels compiling beside it, where its launches alone take a few
    milliseconds. So the first step goes first; later calls run on the
    stand-in until the compile is over, as before."""
    runs = [run for run, _ in launches]
    event, go = threading.Event(), threading.Event()
    if not hold:
        go.set()
    with _lock:
        _pending[key] = event
        _held[key] = go
        _by_run.update((id(run), key) for run in runs)

    def work():
        try:
            go.wait(HOLD_SECONDS)
            compile(launches, q, k, v, scale, terms)
            if all(ready(run) for run in runs):
                cache.mark(key)
        except RuntimeError as err:
            _failed.add(key)  # not tried again: the calls run the stand-in's kernels
            if "after shutdown" not in str(err):  # else the process is exiting: its pool takes no more work
                warnings.warn(f"patterncc: compiling a pattern's own kernels failed ({err}); its calls run "
                              "the stand-in kernels", RuntimeWarning, stacklevel=1)
        finally:
            with _lock:
                _pending.pop(key, None)
                _held.pop(key, None)
                for run in runs:
                    _by_run.pop(id(run), None)
            event.set()

    threading.Thread(target=work, name="patterncc-compile", daemon=True).start()


def backward_ran() -> None:
    """A backward ran: compiles held for one (``_start``) start when the
    backward pass it belongs to is over (at once outside one)."""
    if not _held:  # (every call but a first one's)
        return
    try:
        torch.autograd.Variable._execution_engine.queue_callback(_release)
    except RuntimeError:  # not inside the autograd engine's backward pass
        _release()


def _release(keys=None) -> None:
    """Let the held compiles of ``keys`` (all when None) start."""
    with _lock:
        gos = list(_held.values()) if keys is None else [_held[key] for key in keys if key in _held]
    for go in gos:
        go.set()


def settle(launches) -> None:
    """Wait for a compile of these launches' kernels in flight in a thread
    (starting it, if it is held), so that a launch that cannot use the
    stand-in (a CUDA graph's capture, a backward whose forward ran them)
    does not compile them a second time."""
    if not _by_run:  # (a warm call: nothing compiles in a thread)
        return
    with _lock:
        keys = {_by_run[id(run)] for run, _ in launches if id(run) in _by_run}
        events = [_pending[key] for key in keys if key in _pending]
    _release(keys)
    for event in events:
        event.wait()


def wait_all() -> None:
    """Wait for every pattern's own kernels compiling in a thread, starting
    the held ones now, so that the calls after it run them: a call before
    their compile is over runs the stand-in's, which a timing must not see."""
    with _lock:
        events = list(_pending.values())
    _release()
    for event in events:
        event.wait()


def pending() -> bool:
    """Whether some pattern's own kernels are compiling in a thread."""
    with _lock:
        return bool(_pending)


def _shape(q, k) -> tuple:
    return q.shape[2], q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device
