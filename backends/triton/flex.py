"""FlexAttention interop: a patterncc layout as a flex_attention BlockMask.

    block_mask = to_flex_block_mask(layout, device="cuda")
    o = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)

The BlockMask has the layout's sparsity exactly: its PARTIAL blocks go to
``kv_num_blocks`` / ``kv_indices`` (flex applies the mask_mod there), its FULL
blocks to ``full_kv_num_blocks`` / ``full_kv_indices`` (no mask_mod), with
``BLOCK_SIZE = layout.block``. The mask_mod is generated from the same IR as
the Triton predicate (``codegen``: ``make_mask_mod``); no element-wise
``create_block_mask`` pass over ``n * n`` is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from patterncc import ir, randomblocks
from patterncc.blocklayout.format import BlockLayout

from .config import default_config


def mask_mod(pattern: ir.Pattern, seq_len: int, device="cpu"):
    """The pattern's FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` at ``seq_len``
    (``pattern`` bound at ``seq_len`` if its arguments use ``n``)."""
    from .codegen import needs_length, shares_ints
    from .runtime import load_kernels

    shared = shares_ints(pattern)
    if needs_length(pattern):
        pattern = ir.bind(pattern, seq_len)
    module = load_kernels(pattern, default_config(), device, shared=shared)
    return module.make_mask_mod(seq_len, random_members(module.RANDOM_TABLES, seq_len, device), module.PATTERN_ARGS)


def random_members(specs, seq_len: int, device="cpu") -> list[torch.Tensor]:
    """One bool ``[nb, nb]`` table per ``(r, b, seed)``: ``[i, j]`` is True when
    query block ``i`` drew key block ``j``."""
    out = []
    for r, b, seed in specs:
        nb = -(-seq_len // b)
        if nb * nb > 2**28:
            raise ValueError(f"random({r}, {b}, {seed}) at n={seq_len} needs a {nb} x {nb} table for the "
                             "mask_mod; use a larger block b")
        member = np.zeros((nb, nb), dtype=bool)
        drawn = randomblocks.draw(r, nb, seed, np.arange(nb))
        np.put_along_axis(member, drawn, True, axis=1)
        out.append(torch.from_numpy(member).to(device))
    return out


def to_flex_block_mask(layout: BlockLayout, pattern: ir.Pattern | None = None, device="cpu", *, mask_mod_fn=None):
    """A ``torch.nn.attention.flex_attention.BlockMask`` with the layout's
    sparsity, ``BLOCK_SIZE = layout.block`` and the generated mask_mod of
    ``pattern`` (default: the bound pattern the layout was built from), or
    ``mask_mod_fn`` if given (reusing one function object spares
    ``torch.compile`` a recompile). Shape ``[1, layout.heads, n, n]``: batch
    and (for head-free patterns) heads broadcast."""
    from torch.nn.attention.flex_attention import BlockMask

    n = layout.seq_len
    pattern = layout.pattern if pattern is None else pattern
    partial_num, partial_idx = _padded_lists(layout, ~layout.kv_full)
    full_num, full_idx = _padded_lists(layout, layout.kv_full)

    def dev(a):
        return torch.from_numpy(a).to(device)[None]  # [1, H, ...]: batch broadcasts

    return BlockMask.from_kv_blocks(
        dev(partial_num), dev(partial_idx), dev(full_num), dev(full_idx),
        BLOCK_SIZE=layout.block, mask_mod=mask_mod_fn or mask_mod(pattern, n, device), seq_lengths=(n, n))


def _padded_lists(layout: BlockLayout, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``[H, nq]`` counts and ``[H, nq, nk]`` key blocks (first ``count``
    entries valid, the rest 0) of the CSR entries where ``keep`` holds."""
    H, nq, nk = layout.heads, layout.n_qblocks, layout.n_kblocks
    counts = np.diff(layout.kv_ptr, axis=1).ravel()
    row = np.repeat(np.arange(H * nq), counts)[keep]
    idx = layout.kv_idx[keep]
    num = np.bincount(row, minlength=H * nq)
    start = np.concatenate([[0], np.cumsum(num)[:-1]])
    slot = np.arange(row.size) - start[row]
    out = np.zeros((H * nq, nk), dtype=np.int32)
    out[row, slot] = idx
    return num.reshape(H, nq).astype(np.int32), out.reshape(H, nq, nk)
