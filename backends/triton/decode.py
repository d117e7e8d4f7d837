"""Queries at the end of their keys: decoding from a KV cache and chunked prefill.

    rows = RowsAttention(pattern)
    o, lse = rows(q, k_cache, v_cache, lens, scale)   # q [B, H, nq, D]; caches [B, Hkv, max_len, D]
    o, lse = rows(q, k_pool, v_pool, lens, block_table=table)   # pools [num_pages, Hkv, page, D]

Row ``b``'s queries are the tokens ``lens[b] - nq .. lens[b] - 1`` and see
the keys ``< lens[b]`` the pattern allows, with ``n = lens[b]``. Forward
only (no autograd): ``patterncc.attention`` sends calls that need gradients
through the training kernels instead. Score terms (softcap, alibi, rel_bias
in the kernel, sinks in the merge) as the training kernels apply them.

Only the key blocks the pattern allows at those positions are read: for
each query tile, the union of the key-block lists of the block rows it
spans (``blocklayout.row_pairs``: the cost of those rows, never of the
whole layout), split across programs (split-KV) so that one row of a long
cache fills the card, then merged by log-sum-exp in a second small kernel.
A program serves every query head of a GQA group (where the pattern is the
same for all heads), so each K and V block is read once per group.

Lengths as host ints: the lists are built for them and cached per
``(length, nq, heads)``, and everything a call launches with (tables on the
device, grids, splits) per lengths and shapes, so the layers of a model at
one decode step pay for it once. A pattern whose meaning depends on ``n``
beyond the bounds (arguments written with ``n``, ``where`` on ``n``,
``random``) is run one batch row at a time, each at its own length; any
other pattern runs every row in one launch per planned piece.

Lengths as an int32 tensor on the device are never read back: the kernel
walks the layout's list of each query block row (``RowsAttention.row_step``),
so a decode step can be captured in a CUDA graph and replayed at new lengths.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patterncc import ir, planner
from patterncc.lru import LRU
from patterncc.orders import NATURAL, Columns, Residue, TokenOrder
from patterncc.backends.reference.checks import check_block_table, check_cache_seqlens, check_pages, check_shapes
from patterncc.blocklayout.builder import row_pairs
from patterncc.masks import evaluate

from . import codegen
from .config import DEFAULT_BLOCK, MAX_HEAD_DIM, KernelConfig, default_config, padded_head_dim
from .resident import to_device, to_device_all
from .runtime import _float32_scale, _on_device_of, _random_buffer, check_tensors, load_kernels

_TEMPLATE = Path(__file__).with_name("decode_kernels.py")
_MARKER = "# ---- query-rows kernel: everything below this line is appended to the generated module ----"
# split-KV aims at this many programs per multiprocessor, at most: two programs of 4 warps, 3 stages
# deep, keep enough loads in flight to stream HBM, and every program more is a prologue and a partial
# row written and merged for nothing; on the H200 two beat eight on the steps measured, most where
# the step reads little (sliding_window(4096) B=8 at 1M: 60% of copy against 51%; PERFORMANCE.md)
_PROGRAMS_PER_SM = 2
_MIN_SPLIT_BLOCKS = 8  # and never splits a list into slices shorter than this (a prologue and a merge each)
# The query-rows kernel's warps and pipeline depth (K and V blocks in flight per program):
# bench/decode_tiles.py times the candidates on a long causal step, where reading K and V is all
_WARPS = 4
_STAGES = 3
# Device-length calls (CUDA graphs) hold every block row's list: at most this many entries (64 MiB)
ROW_LIST_LIMIT = 1 << 24


def _template() -> str:
    text = _TEMPLATE.read_text()
    return text[text.index(_MARKER) + len(_MARKER):]


@dataclass(frozen=True)
class _Piece:
    """One disjoint piece of the pattern (``planner.pieces``): its predicate
    over token positions and the orders that make it block-dense."""

    pattern: ir.Pattern
    q_order: TokenOrder
    k_order: TokenOrder

    @property
    def codes(self) -> tuple[int, int, int]:
        """K_ORDER, ORD_L, ORD_C for the kernel (which counts ORD_S per row)."""
        L, _, C = self.k_order.kernel_args(0)
        return self.k_order.code, L, C


@dataclass(frozen=True)
class _Launch:
    """One piece's launch of ``attn_rows_fwd``: its module, tables and shape."""

    module: object
    random: torch.Tensor
    ptr: torch.Tensor  # int32 LIST_PTR
    idx: torch.Tensor  # int32 LIST_IDX
    grid: tuple
    heads: int  # query heads per program (the GQA group, or 1 where the pattern differs per head)
    layout_heads: int
    tiles: int
    splits: int
    tile_q: int
    block_m: int
    k_order: int
    ord_l: int
    ord_c: int
    split0: int
    class_range: bool = False  # a residue piece walked by its query's class, no lists (row_step)


@dataclass(frozen=True)
class _Step:
    """The launches of one call's lengths and shapes (``RowsAttention._step``)."""

    buffer: torch.Tensor  # int32: every table of the step on the device (also a dummy pointer for terms that are off)
    launches: list
    total: int  # splits of every piece
    head_dim: int
    precision: str
    merge_grid: tuple
    merge_rows: int
    by_row: bool = False  # lists per block row of the layout (``row_step``), lengths read on the device
    rows: int = 0  # block rows of those lists per layout head
    max_len: int = 0  # the cache's length: device lengths are kept within it


@dataclass(frozen=True)
class _KernelTerms:
    """A call's score terms as the kernel reads them: fp32, contiguous."""

    softcap: float | None
    alibi_slopes: torch.Tensor | None
    sinks: torch.Tensor | None
    rel_bias: torch.Tensor | None

    @staticmethod
    def of(softcap, alibi_slopes, sinks, rel_bias, q) -> "_KernelTerms":
        f32 = lambda t: None if t is None else t.detach().to(device=q.device, dtype=torch.float32).contiguous()
        return _KernelTerms(None if softcap is None else float(softcap), f32(alibi_slopes), f32(sinks), f32(rel_bias))


def _row_key(max_len: int, B: int, nq: int, H: int, Hkv: int, D: int, dtype, device) -> tuple:
    """``RowsAttention._steps``' key of a cache's per-row step (``row_step``)."""
    return ("rows", max_len, B, nq, H, Hkv, D, dtype, device)


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _heads_per_program(group: int) -> int:
    """Query heads one program serves: the whole GQA group, or its largest
    divisor up to 64 (a tile of more rows would spill its registers)."""
    return max(d for d in range(1, min(group, 64) + 1) if group % d == 0)


class RowsAttention:
    """The query-rows kernel for one pattern, any lengths (see the module docstring).

    ``block``: the layout block and the kernel's key step (default 64).
    ``splits``: the split-KV factor (default: enough programs for the card).
    ``planned``: run a strided or fixed pattern as the planner's pieces, each
    reading its keys in its own order (default True; False reads the natural
    layout, which for strided has an allowed key in every block).
    """

    def __init__(self, pattern: ir.Pattern, *, block: int | None = None, splits: int | None = None,
                 planned: bool = True):
        self.pattern = pattern
        self.block = block or DEFAULT_BLOCK
        self.splits = splits
        self.planned = planned
        # rows whose meaning depends on the length run one by one (module docstring)
        self.per_length = ir.uses_n(pattern) or any(isinstance(x, ir.Random) for x in ir.walk(pattern))
        self._pieces = LRU(32)
        self._lists = LRU(256)  # per length: a generation loop's recent steps
        self._row_cache = LRU(4096)  # per block row
        self._modules = LRU(32)
        self._randoms = LRU(32)
        self._steps = LRU(64)  # per (lengths, shapes): everything a step launches with but the tensors
        # per (cache length, one query, heads): whether row_step walks natural order (_walks_natural),
        # and under ("pays", ...) whether host lengths take it (_rows_pay)
        self._natural = LRU(32)
        self._by_tables = LRU(64)  # the same, per the tables' content
        self._lens = LRU(16)  # lengths on the device
        self._per_head = LRU(32)  # a residue piece's pattern per layout head
        self._shape_cache = LRU(32)  # per (length if it matters, heads, nq): _shapes
        self._sms = {}

    def __repr__(self) -> str:
        return f"RowsAttention({str(self.pattern)!r}, block={self.block})"

    def __call__(self, q, k, v, lens, scale=None, *, softcap=None, alibi_slopes=None, sinks=None, rel_bias=None,
                 block_table=None):
        """o (q's dtype) ``[B, H, nq, D]`` and lse (fp32, natural log) ``[B, H, nq]``.

        ``lens``: host ints, checked (``check_rows``, ``check_paged``); or an
        int32 tensor ``[B]`` on q's device (``check_device_lens``), which is
        not read back: the call then takes the layout's lists per block row
        at the cache's length (``row_step``) and can be captured in a CUDA
        graph, where the pattern allows (else the lengths are read, once).
        Score terms as ``Attention`` takes them (checked by
        ``scores.check_terms``). ``block_table``: k and v are page pools
        ``[num_pages, Hkv, page, D]`` and row ``b`` reads its keys through
        ``block_table[b]`` (int32)."""
        B, H, nq, D = q.shape
        scale = _float32_scale(1.0 / math.sqrt(D) if scale is None else float(scale))
        terms = _KernelTerms.of(softcap, alibi_slopes, sinks, rel_bias, q)
        o = torch.empty((B, H, nq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
        if not B:  # a batch of no rows: nothing to launch
            return o, lse
        if isinstance(lens, torch.Tensor):
            step = None if block_table is not None else self.row_step(k.shape[2], B, nq, H, k.shape[1], D, q.dtype,
                                                                      q.device)
            if step is not None:
                self._launch(q, k, v, step, lens, scale, o, lse, terms, None)
                return o, lse
            lens = check_cache_seqlens(lens, q.shape, (B, k.shape[1], max_len_of(k, block_table), D))
        elif block_table is None and (max(lens) < k.shape[2] or self._has_row_step(k.shape[2], B, nq, H, k, q)):
            # host lengths take the cache's per-row step too where it reads what the lists would: it is
            # built once per cache, where lists are built and copied for every new length (0.1-0.3 ms of
            # Python a token), and only the lengths are copied. Only for a cache with room, filled in
            # place (or whose step a call with device lengths built): a cache that grows with its
            # lengths (transformers' DynamicCache) would build the whole cache's tables every token
            step = self.row_step(k.shape[2], B, nq, H, k.shape[1], D, q.dtype, q.device, natural=False)
            if step is not None:
                self._launch(q, k, v, step, self._lens_on(lens, q.device), scale, o, lse, terms, None)
                return o, lse
        if not self.per_length:
            step = self._step_of(lens, lens[0], nq, H, k.shape[1], D, q.dtype, q.device)
            self._launch(q, k, v, step, self._lens_on(lens, q.device), scale, o, lse, terms, block_table)
            return o, lse
        for b in range(B):
            kb, vb = (k, v) if block_table is not None else (k[b:b + 1], v[b:b + 1])
            table = None if block_table is None else block_table[b:b + 1]
            step = self._step_of(lens[b:b + 1], lens[b], nq, H, k.shape[1], D, q.dtype, q.device)
            self._launch(q[b:b + 1], kb, vb, step, self._lens_on(lens[b:b + 1], q.device), scale, o[b:b + 1],
                         lse[b:b + 1], terms, table)
        return o, lse

    def pieces(self, n: int, H: int) -> list[_Piece]:
        """The pieces at length ``n`` (the same at every length unless the
        pattern's meaning depends on it)."""
        key = (n if self.per_length else None, H)
        if key not in self._pieces:
            if self.planned:
                made = [_Piece(p, qo, ko) for qo, ko, p in planner.pieces(self.pattern, n, H)]
            else:
                made = [_Piece(ir.bind(self.pattern, n), NATURAL, NATURAL)]
            self._pieces[key] = made or [_Piece(ir.Empty(), NATURAL, NATURAL)]
        return self._pieces[key]

    # -- one launch per piece over rows that share a module, then one merge

    def _step_of(self, lens, module_len, nq, H, Hkv, D, dtype, device) -> "_Step":
        key = (tuple(lens), module_len, nq, H, Hkv, D, dtype, device)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._step(lens, module_len, nq, H, Hkv, D, dtype, device)
        return step

    def _lens_on(self, lens, device) -> torch.Tensor:
        """The lengths as int32 on the device, one copy per lengths (the
        layers of a model at one decode step share it)."""
        key = (tuple(lens), device)
        made = self._lens.get(key)
        if made is None:
            made = self._lens[key] = to_device(torch.tensor(lens, dtype=torch.int32), device)
        return made

    def _launch(self, q, k, v, step: "_Step", lens_t, scale: float, o, lse, terms: "_KernelTerms", table):
        B, H, nq, D = q.shape
        Hkv = k.shape[1]
        o_part = torch.empty((step.total, B, H, nq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((step.total, B, H, nq), dtype=torch.float32, device=q.device)
        paged = table is not None
        table_arg = table if paged else step.buffer
        page = k.shape[2] if paged else 1
        dummy = step.buffer  # an int32 buffer for the pointers of terms that are off
        slopes = terms.alibi_slopes if terms.alibi_slopes is not None else dummy
        rel = terms.rel_bias if terms.rel_bias is not None else dummy
        rel_m = 0 if terms.rel_bias is None else (terms.rel_bias.shape[1] - 1) // 2
        softcap = 1.0 if terms.softcap is None else terms.softcap
        with _on_device_of(q):
            for launch in step.launches:
                launch.module.attn_rows_fwd[launch.grid](
                    q, k, v, o_part, lse_part, lens_t, launch.random, launch.ptr, launch.idx, table_arg,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], table_arg.stride(0),
                    scale, nq, D, H, H // Hkv, launch.heads, launch.layout_heads, launch.tiles, launch.splits,
                    launch.ord_l, launch.ord_c, launch.split0, step.total, softcap, slopes, rel, rel_m,
                    step.rows, step.max_len,
                    HEAD_DIM=step.head_dim, BLOCK_M=launch.block_m, TILE_Q=launch.tile_q, BLOCK_N=self.block,
                    HEAD_DEPENDENT=launch.layout_heads > 1, DOT_PRECISION=step.precision, K_ORDER=launch.k_order,
                    PAGED=paged, PAGE=page, BY_ROW=step.by_row, SOFTCAP=terms.softcap is not None,
                    ALIBI=terms.alibi_slopes is not None, REL_BIAS=terms.rel_bias is not None,
                    PAD_D=D != step.head_dim, CLASS_RANGE=launch.class_range, NUM_STAGES=_STAGES,
                    num_warps=_WARPS)
            sink = terms.sinks if terms.sinks is not None else dummy
            step.launches[0].module.attn_rows_merge[step.merge_grid](
                o_part, lse_part, o, lse, sink, nq, D, H, step.total, *o.stride()[:3],
                HEAD_DIM=step.head_dim, BLOCK_R=step.merge_rows, SINKS=terms.sinks is not None,
                PAD_D=D != step.head_dim, num_warps=4)

    def _step(self, lens, module_len, nq, H, Hkv, D, dtype, device) -> "_Step":
        """Everything a call at these lengths and shapes launches with but the
        tensors and the lengths: built once per distinct set of tables (a
        new length whose queries stay in the same block rows finds the same
        lists, and the step made for them), then every call (every layer of
        a model at one decode step) only allocates its outputs and launches."""
        shapes_key = (module_len if self.per_length else None, H, Hkv, nq)
        if shapes_key not in self._shape_cache:
            self._shape_cache[shapes_key] = self._shapes(self.pieces(module_len, H), H, Hkv, nq)
        shapes = self._shape_cache[shapes_key]
        tables = [self._tables(piece, lens, nq, H, tile_q, tiles) for piece, _, _, tile_q, tiles in shapes]
        content = (module_len if self.per_length else None, len(lens), nq, H, Hkv, D, dtype, device,
                   *(a.tobytes() for table in tables for a in table))
        step = self._by_tables.get(content)
        if step is None:
            step = self._by_tables[content] = self._assemble(shapes, tables, len(lens), module_len, nq, H, D, dtype,
                                                             device)
        return step

    def row_step(self, max_len: int, B: int, nq: int, H: int, Hkv: int, D: int, dtype, device,
                 natural: bool = True) -> "_Step | None":
        """The step of a call whose lengths stay on the device: the layout's
        key-block list of every query block row of a cache of ``max_len``
        (``BY_ROW`` in the kernel), so nothing depends on the lengths and a
        CUDA graph may capture the call (warm it up first: the lists are
        built and copied on the first call). None where that cannot be:
        a pattern whose meaning depends on the length, or lists over
        ``ROW_LIST_LIMIT`` entries (a long dense causal cache: 134M at 1M
        tokens); the caller then reads the lengths. A planned residue piece
        (strided) has slot lists that change with every length: with one
        query per row (decoding) the kernel walks the query's residue class
        instead (``CLASS_RANGE``), where the class is mostly keys the query
        may attend (``_class_is_dense``); otherwise such a pattern is walked
        in natural order here, or, with ``natural`` False (a caller that has
        the lengths and so the planned lists), there is no step (None)."""
        if self.per_length:
            return None
        if not natural and not self._rows_pay(max_len, nq, H):
            return None
        walks_natural = self._walks_natural(max_len, nq, H)
        key = _row_key(max_len, B, nq, H, Hkv, D, dtype, device)
        if key in self._steps:
            return self._steps[key]
        pieces = self.pieces(max_len, H)
        ranged = [isinstance(piece.q_order, Residue) for piece in pieces]
        if walks_natural:
            pieces, ranged = [_Piece(ir.bind(self.pattern, max_len), NATURAL, NATURAL)], [False]
        shapes = self._shapes(pieces, H, Hkv, nq)
        tables, class_blocks = [], {}
        for i, ((piece, *_), r) in enumerate(zip(shapes, ranged)):
            if r:  # no lists: the kernel computes the class's run of slot blocks from the row's length
                tables.append((np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int32)))
                class_blocks[i] = -(-max_len // piece.q_order.l) // self.block + 2  # the run, straddling blocks
                continue
            made = self._row_tables(piece, max_len, H, ROW_LIST_LIMIT - sum(idx.size for _, idx in tables))
            if made is None:
                self._steps[key] = None
                return None
            tables.append(made)
        rows = -(-max_len // self.block)
        self._steps[key] = self._assemble(shapes, tables, B, max_len, nq, H, D, dtype, device, class_blocks,
                                          by_row=True, rows=rows, max_len=max_len)
        return self._steps[key]

    def _walks_natural(self, max_len: int, nq: int, H: int) -> bool:
        """Whether ``row_step`` walks a planned residue piece in natural order
        (cached: the class test evaluates the pattern over a class's keys)."""
        key = (max_len, nq == 1, H)
        if key not in self._natural:
            ranged = [piece for piece in self.pieces(max_len, H) if isinstance(piece.q_order, Residue)]
            self._natural[key] = bool(ranged) and not (nq == 1 and all(self._class_is_dense(piece, max_len, H)
                                                                        for piece in ranged))
        return self._natural[key]

    def _has_row_step(self, max_len: int, B: int, nq: int, H: int, k, q) -> bool:
        return self._steps.get(_row_key(max_len, B, nq, H, k.shape[1], q.shape[3], q.dtype, q.device)) is not None

    def _rows_pay(self, max_len: int, nq: int, H: int) -> bool:
        """Whether a call with host lengths takes ``row_step``: not where it
        would walk a planned pattern in natural order (the lists read less),
        nor where its tables would pass ``ROW_LIST_LIMIT``, judged from three
        block rows before any table is built (a causal or fixed cache of 1M
        tokens took 1-4 s to find that out by building)."""
        key = ("pays", max_len, nq == 1, H)
        if key not in self._natural:
            self._natural[key] = (not self._walks_natural(max_len, nq, H)
                                  and self._row_entries(max_len, H) <= ROW_LIST_LIMIT)
        return self._natural[key]

    def _row_entries(self, max_len: int, H: int) -> int:
        """About how many entries ``row_step``'s tables would hold: per list
        piece, the longest of the first, middle and last block rows' lists
        (every layout head), times the block rows."""
        Bk = self.block
        rows = -(-max_len // Bk)
        side = rows * Bk
        total = 0
        for piece in self.pieces(max_len, H):
            if isinstance(piece.q_order, Residue):
                continue  # walked by class (CLASS_RANGE): no lists
            longest = 0
            for r in {0, rows // 2, rows - 1}:
                row = row_pairs(piece.pattern, side, Bk, H, r, r)
                if isinstance(piece.k_order, Columns):
                    longest = max(longest, sum(_column_blocks(j, piece.k_order, side, Bk).size for _, j, _ in row))
                else:
                    longest = max(longest, sum(j.size for _, j, _ in row))
            total += longest * rows
        return total

    def _class_is_dense(self, piece: _Piece, n: int, H: int) -> bool:
        """Whether the last query of a row of ``n`` may attend at least half
        of its residue class's keys in every layout head: walking the whole
        class (``CLASS_RANGE``) then reads at most twice what lists would
        (strided's piece: every key of the class but the last)."""
        l = piece.q_order.l
        t = n - 1
        keys = np.arange(t % l, n, l, dtype=np.int64)
        return all(2 * int(evaluate(ph, np.array([[t]]), keys[None, :], n).sum()) >= keys.size
                   for ph in self._heads_of(piece, n, H))

    def _row_tables(self, piece: _Piece, max_len: int, H: int, limit: int):
        """``(ptr, idx)`` of every query block row's key blocks (slot blocks of
        a columns piece) of a cache of ``max_len``, per layout head
        (``ptr[h * rows + r]``); None past ``limit`` entries."""
        Bk = self.block
        rows = -(-max_len // Bk)
        side = rows * Bk
        heads = H if ir.depends_on_head(piece.pattern) else 1
        pairs = [([], []) for _ in range(heads)]
        total, chunk = 0, max(1, (1 << 20) // rows)  # rows per row_pairs call: about 1M candidate pairs
        for first in range(0, rows, chunk):
            for h, (i, j, _) in enumerate(row_pairs(piece.pattern, side, Bk, H, first, min(rows, first + chunk) - 1)):
                pairs[h][0].append(i)
                pairs[h][1].append(j)
                total += j.size
            if total > limit:
                return None
        ptrs, idxs = [np.zeros(1, dtype=np.int64)], []
        for h_i, h_j in pairs:
            i, j = np.concatenate(h_i), np.concatenate(h_j)
            if isinstance(piece.k_order, Columns):
                starts = np.searchsorted(i, np.arange(rows + 1))
                per_row = [_column_blocks(j[a:b], piece.k_order, side, Bk) for a, b in zip(starts[:-1], starts[1:])]
                counts = np.asarray([x.size for x in per_row], dtype=np.int64)
                j = np.concatenate(per_row) if per_row else j
            else:
                counts = np.bincount(i, minlength=rows)
            ptrs.append(ptrs[-1][-1] + np.cumsum(counts))
            idxs.append(j)
        idx = np.concatenate(idxs).astype(np.int32) if idxs else np.zeros(0, dtype=np.int32)
        if idx.size > limit:
            return None
        return np.concatenate(ptrs), idx

    def _shapes(self, pieces, H, Hkv, nq) -> list:
        """Per piece: ``(piece, layout_heads, heads, tile_q, tiles)``; a tile is
        ``heads`` query heads times ``tile_q`` positions (at most two block rows)."""
        shapes = []
        for piece in pieces:
            layout_heads = H if ir.depends_on_head(piece.pattern) else 1
            heads = 1 if layout_heads > 1 else _heads_per_program(H // Hkv)
            tile_q = min(_pow2(nq), self.block, max(1, 64 // _pow2(heads)))
            shapes.append((piece, layout_heads, heads, tile_q, -(-nq // tile_q)))
        return shapes

    def _assemble(self, shapes, tables, B, module_len, nq, H, D, dtype, device, class_blocks=None,
                  **row_mode) -> "_Step":
        """The launches of ``shapes`` over ``tables`` (``_step``, ``row_step``);
        ``class_blocks``: piece index -> the longest run of a piece walked by
        class (``CLASS_RANGE``, no lists)."""
        class_blocks = class_blocks or {}
        head_dim = padded_head_dim(D)
        # a piece's lists (or a class's runs) are cut into splits: its longest one sets how many
        longest = [class_blocks.get(i) or max(int(np.max(np.diff(ptr))), 1) for i, (ptr, _) in enumerate(tables)]
        splits = self._splits([B * (H // heads) * tiles for _, _, heads, _, tiles in shapes], longest, device)
        # every table of the call in one host-to-device copy: each piece's pointers and lists
        # (aligned views: Triton specializes on pointer alignment, which list sizes must not change)
        views = to_device_all([a.astype(np.int32) for ptr, idx in tables for a in (ptr, idx)], device)
        packed = views[0]
        launches, first = [], 0
        for i, ((piece, layout_heads, heads, tile_q, tiles), count) in enumerate(zip(shapes, splits)):
            module = self._module(piece.pattern, module_len, head_dim, dtype, device)
            k_order, ord_l, ord_c = piece.codes
            launches.append(_Launch(module, self._random(module, module_len, device), views[2 * i],
                                    views[2 * i + 1], (tiles, B * (H // heads), count), heads, layout_heads,
                                    tiles, count, tile_q, max(16, _pow2(heads * tile_q)), k_order, ord_l, ord_c,
                                    first, i in class_blocks))
            first += count
        merge_rows = min(_pow2(nq), 16)
        return _Step(packed, launches, first, head_dim, "ieee" if dtype == torch.float32 else "tf32",
                     (B * H, -(-nq // merge_rows)), merge_rows, **row_mode)

    def _random(self, module, n: int, device):
        """The random(...) tables at length ``n`` on the device (cached)."""
        key = (id(module), n if self.per_length else None, str(device))  # (random(...) makes a pattern per-length)
        if key not in self._randoms:
            self._randoms[key] = _random_buffer(module.RANDOM_TABLES, n, device, module.PATTERN_ARGS)
        return self._randoms[key]

    def _splits(self, rows: list[int], longest: list[int], device) -> list[int]:
        """Per piece, the split-KV factor of its ``rows`` programs, whose
        longest list is ``longest`` blocks. One slice length for every piece:
        the work (blocks) over ``_PROGRAMS_PER_SM`` programs per multiprocessor,
        so a planned pattern's long piece gets the splits and its short one
        (a band of two blocks) none, and no program reads more than twice
        the slice while the others wait."""
        if self.splits is not None:
            return [self.splits] * len(rows)
        if device.type != "cuda":
            return [1] * len(rows)
        if device not in self._sms:
            self._sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        work = sum(r * l for r, l in zip(rows, longest))
        programs = _PROGRAMS_PER_SM * self._sms[device]
        if work <= programs * _MIN_SPLIT_BLOCKS:  # the slice would be shorter than the minimum
            return [max(1, l // _MIN_SPLIT_BLOCKS) for l in longest]
        return [max(1, l * programs // work) for l in longest]  # l over work / programs, in integers

    def _module(self, pattern: ir.Pattern, n: int, head_dim: int, dtype, device):
        bound = ir.bind(pattern, n) if codegen.needs_length(pattern) else pattern
        key = (bound, head_dim, dtype, str(device))
        if key not in self._modules:
            self._modules[key] = load_rows_kernels(bound, default_config(head_dim, dtype, self.block), device,
                                                   codegen.shares_ints(self.pattern))
        return self._modules[key]

    # -- the key-block lists

    def _tables(self, piece: _Piece, lens, nq, H, block_m, tiles):
        """int32 ``LIST_PTR`` ``[B * layout_heads * tiles + 1]`` and ``LIST_IDX`` of one piece."""
        per_row = [self.lists(n, nq, H, block_m, piece) for n in lens]
        counts = np.concatenate([np.diff(p) for p, _ in per_row])
        ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        ptr[1:] = np.cumsum(counts)
        idx = np.concatenate([i for _, i in per_row]) if per_row else np.zeros(0, dtype=np.int32)
        if ptr[-1] >= 2**31:
            raise ValueError(f"the key-block lists hold {ptr[-1]} entries, over the int32 limit; use a larger block")
        return ptr, idx

    def lists(self, n: int, nq: int, H: int, block_m: int, piece: _Piece | None = None):
        """``(ptr, idx)`` of one row of length ``n``: for each layout head and
        query tile, the key blocks (slot blocks of a planned piece) its query
        rows touch, ascending.

        Decoding asks for a new length every step, so the block rows behind
        the lists are cached where they do not change: a natural piece's rows
        are built at ``n`` rounded up to the block (keys past ``n`` are
        masked in the kernel: a length-independent pattern allows the same
        pairs below ``n`` at any length), and gathered columns come from the
        natural rows, mapped. A residue piece's keys are one residue class,
        ``n / l`` candidates a query: they are evaluated directly
        (``_residue_lists``), since its slot rows change with every token."""
        piece = piece or self.pieces(n, H)[0]
        B = self.block
        first_tok = n - nq
        tokens = [np.arange(max(first_tok + t * block_m, 0), min(first_tok + (t + 1) * block_m, n))
                  for t in range(-(-nq // block_m))]
        if isinstance(piece.q_order, Residue):
            return self._residue_lists(piece, tokens, n, H)
        side = n if self.per_length else -(-n // B) * B
        pattern = piece.pattern
        tile_rows = [np.unique(tok // B) for tok in tokens]
        key = (pattern, side, H, tuple(tuple(r) for r in tile_rows), piece.k_order)
        hit = self._lists.get(key)
        if hit is not None:
            return hit
        rows = self._rows(pattern, side, H, np.unique(np.concatenate(tile_rows)))
        ptrs, idxs = [0], []
        for i, j in rows:  # per layout head
            for tile in tile_rows:
                blocks = np.unique(j[np.isin(i, tile)])  # the union of the tile's rows, ascending
                if isinstance(piece.k_order, Columns):
                    blocks = _column_blocks(blocks, piece.k_order, side, B)
                idxs.append(blocks)
                ptrs.append(ptrs[-1] + blocks.size)
        made = (np.asarray(ptrs, dtype=np.int64), np.concatenate(idxs).astype(np.int32))
        self._lists[key] = made
        return made

    def _residue_lists(self, piece: _Piece, tokens: list, n: int, H: int):
        """``(ptr, idx)`` of a residue(l) piece: each query's keys lie in its
        own class (the slots ``r * S .. r * S + S - 1`` of tokens ``r, r + l, ...``
        with ``r = t % l``, ``S = ceil(n / l)``); the slot blocks of the allowed ones."""
        l, B = piece.q_order.l, self.block
        S = -(-n // l)
        m = np.arange(S, dtype=np.int64)
        ptrs, idxs = [0], []
        for ph in self._heads_of(piece, n, H):
            for tok in tokens:
                r = (tok % l)[:, None]
                keys = r + l * m[None, :]  # (tokens, S): every key of each query's class
                allowed = (keys < n) & evaluate(ph, tok[:, None], np.minimum(keys, n - 1), n)
                blocks = np.unique(((r * S + m[None, :]) // B)[allowed])
                idxs.append(blocks)
                ptrs.append(ptrs[-1] + blocks.size)
        return np.asarray(ptrs, dtype=np.int64), np.concatenate(idxs).astype(np.int32)

    def _heads_of(self, piece: _Piece, n: int, H: int) -> list:
        """A piece's predicate at length ``n`` per layout head (one if it is the same for every head)."""
        key = (piece.pattern, n if self.per_length else None, H)
        if key not in self._per_head:
            bound = ir.bind(piece.pattern, n)
            self._per_head[key] = [ir.for_head(bound, h) for h in range(H if ir.depends_on_head(bound) else 1)]
        return self._per_head[key]

    def _rows(self, pattern: ir.Pattern, side: int, H: int, wanted: np.ndarray) -> list:
        """``(i, j)`` of block rows ``wanted`` per layout head (each row cached)."""
        heads = H if ir.depends_on_head(pattern) else 1
        found = {int(r): self._row_cache.get((pattern, side, H, int(r))) for r in wanted}
        missing = [r for r, js in found.items() if js is None]
        for run in np.split(np.asarray(missing), np.nonzero(np.diff(missing) != 1)[0] + 1) if missing else []:
            per_head = row_pairs(pattern, side, self.block, H, int(run[0]), int(run[-1]))
            for r in run:
                found[int(r)] = [j[i == r] for i, j, _ in per_head]
        for r in missing:
            self._row_cache[(pattern, side, H, r)] = found[r]
        return [(np.concatenate([np.full(found[r][h].size, r) for r in found]),
                 np.concatenate([found[r][h] for r in found])) for h in range(heads)]


def _column_blocks(natural_blocks: np.ndarray, order: Columns, n: int, block: int) -> np.ndarray:
    """The slot blocks of ``columns(l, c)`` order that hold the summary keys
    of the given natural key blocks (at ``n`` tokens), ascending."""
    lo = order.count_before(natural_blocks.astype(np.int64) * block)
    hi = order.count_before(np.minimum((natural_blocks.astype(np.int64) + 1) * block, n))
    keep = hi > lo
    lo, hi = lo[keep] // block, (hi[keep] - 1) // block
    counts = hi - lo + 1
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.unique(starts + np.arange(int(counts.sum())))  # every block of every range


def load_rows_kernels(pattern: ir.Pattern, config: KernelConfig, device=None, shared: bool | None = None):
    """The pattern's generated module with the query-rows kernel appended."""
    return load_kernels(pattern, config, device, appendix="\n\n" + _template().lstrip("\n"), shared=shared)


def check_rows(q, k, v, lens, copies_strided: bool = False) -> list[int]:
    """``lens`` as host ints, or a TypeError/ValueError naming the argument.
    ``lens`` None: no cache, every row's keys are all of k's positions.
    ``copies_strided``: the caller copies a last dimension that is not
    contiguous (the training kernels do), so it is not refused here."""
    check_tensors(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and not copies_strided:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {x.stride()}")
    B, H, nq, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Bk, Hkv, max_len, Dk = k.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"k and v must have q's batch size and head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if min(H, nq, D, Hkv, max_len) < 1 or H % Hkv:  # (B = 0, a batch of no rows, is an empty result)
        raise ValueError(f"every dimension but the batch must be >= 1 and q's heads H={H} a multiple of k's "
                         f"Hkv={Hkv}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is over the Triton backend's limit of {MAX_HEAD_DIM}")
    if lens is None:
        check_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape))  # names n_q > n_k
        return [max_len] * B
    return check_cache_seqlens(lens, q.shape, k.shape)


_PAGES_CHECKED = LRU(64)  # (pointer, version, shape, pages read) -> a weak reference to the table found in range


def check_paged(q, k_pool, v_pool, lens, table) -> list[int]:
    """``lens`` as host ints for a paged call, or a TypeError/ValueError
    naming the argument: pools ``[num_pages, Hkv, page, D]`` (last dimension
    contiguous), ``table`` int32 ``[B, max_pages]`` on q's device, every page
    a row reads in the pools. The pages are read back from the device once
    per table version and number of pages read (a decode loop pays it when
    a row starts a new page, not every step)."""
    check_tensors(q, k_pool, v_pool)
    for name, x in (("q", q), ("k", k_pool), ("v", v_pool)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {x.stride()}")
    if tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"v must have k's shape {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    max_len = check_block_table(table, q.shape, k_pool.shape)
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int32 or table.device != q.device:
        raise TypeError(f"block_table must be an int32 tensor on q's device {q.device}, got "
                        f"{getattr(table, 'dtype', type(table).__name__)} on {getattr(table, 'device', 'the host')}")
    if table.stride(-1) != 1:
        raise ValueError(f"block_table's last dimension must be contiguous (stride 1), got strides {table.stride()}")
    B, H, nq, D = q.shape
    num_pages, Hkv, page, _ = k_pool.shape
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of the pools' Hkv={Hkv}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is over the Triton backend's limit of {MAX_HEAD_DIM}")
    lens = check_cache_seqlens(lens, q.shape, (B, Hkv, max_len, D))
    read = tuple(-(-n // page) for n in lens)
    key = (table.data_ptr(), table._version, tuple(table.shape), table.stride(0), read, num_pages)
    seen = _PAGES_CHECKED.get(key)
    if seen is None or seen() is not table:  # (another tensor may have been made at a freed one's address)
        check_pages(table.tolist(), lens, page, num_pages)
        _PAGES_CHECKED[key] = weakref.ref(table)
    return lens


def max_len_of(k, block_table) -> int:
    """The longest a row may be: the cache's length, or its pages' total."""
    return k.shape[2] if block_table is None else block_table.shape[1] * k.shape[2]


def check_device_lens(lens, q) -> bool:
    """Whether ``lens`` are lengths to leave on the device: an int32 tensor
    ``[B]`` on q's device (a TypeError/ValueError for a tensor there of
    another shape or dtype). Their values are not read, so not checked on a
    GPU: the kernel keeps each within ``0 .. max_len`` (rows past their
    length then see fewer keys), and a row shorter than its queries has
    those in front with no key (o = 0). On the CPU (the interpreter) they
    are checked like host lengths."""
    if not isinstance(lens, torch.Tensor) or lens.device != q.device:
        return False
    if lens.dtype != torch.int32 or tuple(lens.shape) != (q.shape[0],):
        raise ValueError(f"cache_seqlens on q's device must be an int32 tensor [B] with B = {q.shape[0]}, "
                         f"got {lens.dtype} {tuple(lens.shape)}")
    return True
