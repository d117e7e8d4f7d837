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
from pathlib import Path

import numpy as np
import torch

from patterncc import ir
from patterncc.backends.reference.attention import check_cache_seqlens
from patterncc.blocklayout import row_pairs

from . import codegen
from .config import DEFAULT_BLOCK, MAX_HEAD_DIM, KernelConfig, default_config, padded_head_dim
from .runtime import _DTYPES, _float32_scale, _on_device_of, _random_buffer, _trim, interpreting, load_kernels

_TEMPLATE = Path(__file__).with_name("decode_kernels.py")
_MARKER = "# ---- query-rows kernel: everything below this line is appended to the generated module ----"
_PROGRAMS_PER_SM = 2  # split-KV aims at this many programs per multiprocessor
_MIN_SPLIT_BLOCKS = 4  # and never splits a list into slices shorter than this


def _template() -> str:
    text = _TEMPLATE.read_text()
    return text[text.index(_MARKER) + len(_MARKER):]


class RowsAttention:
    """The query-rows kernel for one pattern, any lengths (see the module docstring).

    ``block``: the layout block and the kernel's key step (default 64).
    ``splits``: the split-KV factor (default: enough programs for the card).
    """

    def __init__(self, pattern: ir.Pattern, *, block: int | None = None, splits: int | None = None):
        self.pattern = pattern
        self.block = block or DEFAULT_BLOCK
        self.splits = splits
        # rows whose meaning depends on the length run one by one (module docstring)
        self.per_length = ir.uses_n(pattern) or any(isinstance(x, ir.Random) for x in ir.walk(pattern))
        self._lists: dict = {}
        self._modules: dict = {}

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

    # -- one launch over rows that share a module

    def _launch(self, q, k, v, lens: list[int], scale: float, module_len: int):
        B, H, nq, D = q.shape
        Hkv = k.shape[1]
        device = q.device
        head_dim = padded_head_dim(D)
        block_m = min(self.block, max(16, 1 << (nq - 1).bit_length()))  # a tile spans at most two block rows
        tiles = -(-nq // block_m)
        layout_heads = H if ir.depends_on_head(self.pattern) else 1
        ptr, idx = self._tables(lens, nq, H, layout_heads, block_m, tiles)
        splits = self._splits(B * H * tiles, max(int(np.max(np.diff(ptr))), 1), device)
        module = self._module(module_len, head_dim, q.dtype, device)
        o_part = torch.empty((splits, B, H, nq, D), dtype=torch.float32, device=device)
        lse_part = torch.empty((splits, B, H, nq), dtype=torch.float32, device=device)
        with _on_device_of(q):
            dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)  # noqa: E731
            rand = _random_buffer(module.RANDOM_TABLES, module_len, device)
            module.attn_rows_fwd[(tiles, B * H, splits)](
                q, k, v, o_part, lse_part, dev(lens), rand, dev(ptr), dev(idx if idx.size else np.zeros(1)),
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                scale, nq, D, H, H // Hkv, layout_heads, tiles, splits,
                HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=self.block, HEAD_DEPENDENT=layout_heads > 1,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
        return merge_splits(o_part, lse_part, q.dtype)

    def _splits(self, programs: int, longest: int, device) -> int:
        if self.splits is not None:
            return self.splits
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-_PROGRAMS_PER_SM * sms // programs)
        return max(1, min(want, longest // _MIN_SPLIT_BLOCKS))

    def _module(self, n: int, head_dim: int, dtype, device):
        key = (n if codegen.needs_length(self.pattern) else None, head_dim, dtype, str(device))
        if key not in self._modules:
            bound = ir.bind(self.pattern, n) if codegen.needs_length(self.pattern) else self.pattern
            config = default_config(head_dim, dtype, self.block)
            self._modules[key] = load_rows_kernels(bound, config, device)
            _trim(self._modules)
        return self._modules[key]

    # -- the key-block lists

    def _tables(self, lens, nq, H, layout_heads, block_m, tiles):
        """int32 ``LIST_PTR`` ``[B * layout_heads * tiles + 1]`` and ``LIST_IDX``."""
        per_row = [self.lists(n, nq, H, block_m) for n in lens]
        counts = np.concatenate([np.diff(p) for p, _ in per_row])
        ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        ptr[1:] = np.cumsum(counts)
        idx = np.concatenate([i for _, i in per_row]) if per_row else np.zeros(0, dtype=np.int32)
        if ptr[-1] >= 2**31:
            raise ValueError(f"the key-block lists hold {ptr[-1]} entries, over the int32 limit; use a larger block")
        return ptr, idx

    def lists(self, n: int, nq: int, H: int, block_m: int):
        """``(ptr, idx)`` of one row of length ``n``: for each layout head and
        query tile, the key blocks its block rows touch (cached)."""
        key = (n, nq, H, block_m)
        hit = self._lists.get(key)
        if hit is not None:
            return hit
        first_tok = n - nq
        first, last = first_tok // self.block, (n - 1) // self.block
        ptrs, idxs = [0], []
        for i, j, _ in row_pairs(self.pattern, n, self.block, H, first, last):
            for t in range(-(-nq // block_m)):
                lo_tok = max(first_tok + t * block_m, 0)
                hi_tok = min(first_tok + (t + 1) * block_m, n) - 1
                in_tile = (i >= lo_tok // self.block) & (i <= hi_tok // self.block)
                blocks = np.unique(j[in_tile])  # the union of the tile's rows, ascending
                idxs.append(blocks)
                ptrs.append(ptrs[-1] + blocks.size)
        made = (np.asarray(ptrs, dtype=np.int64), np.concatenate(idxs).astype(np.int32))
        if len(self._lists) >= 64:
            self._lists.clear()
        self._lists[key] = made
        return made


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


def check_rows(q, k, v, lens) -> list[int]:
    """``lens`` as host ints, or a TypeError/ValueError naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, n, D], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES or x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}; q, k and v must share one of bfloat16, float16, float32")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: q, k and v must share one device")
        if x.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {x.stride()}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(f"q, k and v are on {q.device}: the Triton backend needs CUDA tensors "
                         "(CPU tensors only with TRITON_INTERPRET=1)")
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
    lens = check_cache_seqlens(lens, q.shape, k.shape)
    return lens
