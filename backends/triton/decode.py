"""Queries at the end of their keys: decoding from a KV cache and chunked prefill.

    rows = RowsAttention(pattern)
    o, lse = rows(q, k_cache, v_cache, lens, scale)   # q [B, H, nq, D]; caches [B, Hkv, max_len, D]

Row ``b``'s queries are the tokens ``lens[b] - nq .. lens[b] - 1`` and see
the keys ``< lens[b]`` the pattern allows, with ``n = lens[b]``. Forward
only (no autograd): ``patterncc.attention`` sends calls that need gradients
through the training kernels instead.

Only the key blocks the pattern allows at those positions are read: for
each query tile, the union of the key-block lists of the block rows it
spans (``blocklayout.row_pairs``: the cost of those rows, never of the
whole layout), split across programs (split-KV) so that one row of a long
cache fills the card, then merged by log-sum-exp.

The host reads ``lens`` (one device-to-host copy when it is a CUDA tensor)
to build the lists; they are cached per ``(length, nq, heads)``. A pattern
whose meaning depends on ``n`` beyond the bounds (arguments written with
``n``, ``where`` on ``n``, ``random``) is run one batch row at a time, each
at its own length; any other pattern runs every row in one launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patterncc import ir, planner
from patterncc.lru import LRU
from patterncc.planner import NATURAL, TokenOrder
from patterncc.backends.reference.checks import check_cache_seqlens, check_shapes
from patterncc.blocklayout import row_pairs
from patterncc.masks import evaluate

from . import codegen
from .config import DEFAULT_BLOCK, MAX_HEAD_DIM, KernelConfig, default_config, padded_head_dim
from .runtime import _float32_scale, _on_device_of, _random_buffer, check_tensors, load_kernels

_TEMPLATE = Path(__file__).with_name("decode_kernels.py")
_MARKER = "# ---- query-rows kernel: everything below this line is appended to the generated module ----"
_PROGRAMS_PER_SM = 8  # split-KV aims at this many programs per multiprocessor (loads in flight)
_MIN_SPLIT_BLOCKS = 4  # and never splits a list into slices shorter than this


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
        """K_ORDER, ORD_L, ORD_C for the kernel."""
        kind = self.k_order.kind
        return {"natural": 0, "residue": 1, "columns": 2}[kind], max(1, self.k_order.l), max(1, self.k_order.c)


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

    def __repr__(self) -> str:
        return f"RowsAttention({str(self.pattern)!r}, block={self.block})"

    def __call__(self, q, k, v, lens, scale=None):
        """o (q's dtype) ``[B, H, nq, D]`` and lse (fp32, natural log) ``[B, H, nq]``."""
        lens = check_rows(q, k, v, lens)
        B, H, nq, D = q.shape
        scale = _float32_scale(1.0 / math.sqrt(D) if scale is None else float(scale))
        if not self.per_length:
            return self._launch(q, k, v, lens, scale, lens[0])
        outs = [self._launch(q[b:b + 1], k[b:b + 1], v[b:b + 1], lens[b:b + 1], scale, lens[b]) for b in range(B)]
        return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])

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

    # -- one launch per piece over rows that share a module

    def _launch(self, q, k, v, lens: list[int], scale: float, module_len: int):
        B, H, nq, D = q.shape
        Hkv = k.shape[1]
        device = q.device
        head_dim = padded_head_dim(D)
        block_m = min(self.block, max(16, 1 << (nq - 1).bit_length()))  # a tile spans at most two block rows
        tiles = -(-nq // block_m)
        pieces = self.pieces(module_len, H)
        tables = [self._tables(piece, lens, nq, H, block_m, tiles) for piece in pieces]
        splits = [self._splits(B * H * tiles * len(pieces), max(int(np.max(np.diff(ptr))), 1), device)
                  for ptr, _ in tables]
        total = sum(splits)
        o_part = torch.empty((total, B, H, nq, D), dtype=torch.float32, device=device)
        lse_part = torch.empty((total, B, H, nq), dtype=torch.float32, device=device)
        # every table of the call in one host-to-device copy: lengths, then each piece's pointers and lists
        parts = [np.asarray(lens, dtype=np.int64)]
        for ptr, idx in tables:
            parts += [ptr, idx if idx.size else np.zeros(1, dtype=np.int64)]
        packed = torch.from_numpy(np.concatenate(parts).astype(np.int32)).to(device, non_blocking=True)
        views = torch.split(packed, [p.size for p in parts])
        first = 0
        with _on_device_of(q):
            for i, (piece, count) in enumerate(zip(pieces, splits)):
                module = self._module(piece.pattern, module_len, head_dim, q.dtype, device)
                layout_heads = H if ir.depends_on_head(piece.pattern) else 1
                k_order, ord_l, ord_c = piece.codes
                module.attn_rows_fwd[(tiles, B * H, count)](
                    q, k, v, o_part, lse_part, views[0], self._random(module, module_len, device),
                    views[1 + 2 * i], views[2 + 2 * i],
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    scale, nq, D, H, H // Hkv, layout_heads, tiles, count, ord_l, ord_c, first, total,
                    HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=self.block, HEAD_DEPENDENT=layout_heads > 1,
                    DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", K_ORDER=k_order, num_warps=4)
                first += count
        return merge_splits(o_part, lse_part, q.dtype)

    def _random(self, module, n: int, device):
        """The random(...) tables at length ``n`` on the device (cached)."""
        key = (id(module), n, str(device))
        if key not in self._randoms:
            self._randoms[key] = _random_buffer(module.RANDOM_TABLES, n, device, module.PATTERN_ARGS)
        return self._randoms[key]

    def _splits(self, programs: int, longest: int, device) -> int:
        if self.splits is not None:
            return self.splits
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-_PROGRAMS_PER_SM * sms // programs)
        return max(1, min(want, longest // _MIN_SPLIT_BLOCKS))

    def _module(self, pattern: ir.Pattern, n: int, head_dim: int, dtype, device):
        bound = ir.bind(pattern, n) if codegen.needs_length(pattern) else pattern
        key = (bound, head_dim, dtype, str(device))
        if key not in self._modules:
            self._modules[key] = load_rows_kernels(bound, default_config(head_dim, dtype, self.block), device)
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
        if piece.q_order.kind == "residue":
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
                if piece.k_order.kind == "columns":
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
        bound = ir.bind(piece.pattern, n)
        ptrs, idxs = [0], []
        for h in range(H if ir.depends_on_head(bound) else 1):
            ph = ir.for_head(bound, h)
            for tok in tokens:
                r = (tok % l)[:, None]
                keys = r + l * m[None, :]  # (tokens, S): every key of each query's class
                allowed = (keys < n) & evaluate(ph, tok[:, None], np.minimum(keys, n - 1), n)
                blocks = np.unique(((r * S + m[None, :]) // B)[allowed])
                idxs.append(blocks)
                ptrs.append(ptrs[-1] + blocks.size)
        return np.asarray(ptrs, dtype=np.int64), np.concatenate(idxs).astype(np.int32)

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


def _column_blocks(natural_blocks: np.ndarray, order: TokenOrder, n: int, block: int) -> np.ndarray:
    """The slot blocks of ``columns(l, c)`` order that hold the summary keys
    of the given natural key blocks (at ``n`` tokens), ascending."""
    l, c = order.l, order.c

    def before(x):  # summary keys (slots) before token x
        return (x // l) * c + np.clip(x % l - (l - c), 0, c)

    lo = before(natural_blocks.astype(np.int64) * block)
    hi = before(np.minimum((natural_blocks.astype(np.int64) + 1) * block, n))
    keep = hi > lo
    lo, hi = lo[keep] // block, (hi[keep] - 1) // block
    counts = hi - lo + 1
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.unique(starts + np.arange(int(counts.sum())))  # every block of every range


def merge_splits(o_part, lse_part, dtype):
    """The splits' partial results merged by log-sum-exp: o in ``dtype``, lse
    fp32; a row no split saw stays o = 0, lse = -inf (never NaN)."""
    if o_part.shape[0] == 1:
        return o_part[0].to(dtype), lse_part[0]
    lse = torch.logsumexp(lse_part, dim=0)
    w = torch.where(lse_part == float("-inf"), 0.0, torch.exp(lse_part - lse.unsqueeze(0)))
    return (w.unsqueeze(-1) * o_part).sum(0).to(dtype), lse


def load_rows_kernels(pattern: ir.Pattern, config: KernelConfig, device=None):
    """The pattern's generated module with the query-rows kernel appended."""
    return load_kernels(pattern, config, device, appendix="\n\n" + _template().lstrip("\n"))


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
    if min(B, H, nq, D, Hkv, max_len) < 1 or H % Hkv:
        raise ValueError(f"every dimension must be >= 1 and q's heads H={H} a multiple of k's Hkv={Hkv}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is over the Triton backend's limit of {MAX_HEAD_DIM}")
    if lens is None:
        check_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape))  # names n_q > n_k
        return [max_len] * B
    return check_cache_seqlens(lens, q.shape, k.shape)
