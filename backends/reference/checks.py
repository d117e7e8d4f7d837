"""Input checks shared by the numpy reference and its torch glue (``_torch.py``):
messages name the argument and what was expected."""

from __future__ import annotations

import math
import numbers


def check_shapes(q_shape, k_shape, v_shape) -> None:
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D (B, H, n, D), got shape {tuple(shape)}")
    B, H, n, D = q_shape
    if tuple(v_shape) != tuple(k_shape):
        raise ValueError(f"v must have k's shape {tuple(k_shape)}, got {tuple(v_shape)}")
    Bk, Hkv, nk, Dk = k_shape
    for what, mine, theirs in (("batch size", Bk, B), ("head dim", Dk, D)):
        if mine != theirs:
            raise ValueError(f"k and v have {what} {mine} but q has {theirs} (q {tuple(q_shape)}, k {tuple(k_shape)})")
    if nk < n:
        raise ValueError(f"q's sequence length {n} is longer than k's and v's {nk}: queries are the last n_q of "
                         f"the n_k keys' positions, so n_q <= n_k (q {tuple(q_shape)}, k {tuple(k_shape)})")
    if n < 1:
        raise ValueError(f"the sequence length n (q.shape[2]) must be >= 1, got {n}")
    if D < 1:
        raise ValueError(f"the head dim D (q.shape[3]) must be >= 1, got {D}")
    if H < 1 or Hkv < 1:
        raise ValueError(f"q and k need at least one head, got H={H} (q), Hkv={Hkv} (k, v)")
    if H % Hkv:
        raise ValueError(f"q's heads H={H} must be a multiple of k's and v's heads Hkv={Hkv}")


def check_cache_seqlens(lens, q_shape, k_shape) -> list[int]:
    """``cache_seqlens`` as ints: one per batch row, each counting the row's
    ``n_q`` new queries and fitting its cache (``n_q <= lens[b] <= max_len``)."""
    if hasattr(lens, "tolist"):  # a torch tensor (read on the host) or a numpy array
        lens = lens.tolist()
    if not isinstance(lens, (list, tuple)) or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                       for x in lens):
        raise TypeError(f"cache_seqlens must be a 1-D int tensor or a list of ints, got {lens!r}")
    B, n_q, max_len = q_shape[0], q_shape[2], k_shape[2]
    if len(lens) != B:
        raise ValueError(f"cache_seqlens must hold one length per batch row ({B}), got {len(lens)}")
    for b, n in enumerate(lens):
        if not n_q <= n <= max_len:
            raise ValueError(f"cache_seqlens[{b}] = {n}: each length counts the row's {n_q} new queries and fits "
                             f"its cache ({n_q} <= length <= {max_len})")
    return [int(x) for x in lens]


def check_block_table(table, q_shape, pool_shape) -> int:
    """A paged cache's table and pools: pools ``[num_pages, Hkv, page, D]``,
    ``table`` a 2-D integer array ``[B, max_pages]`` (a tensor or numpy); the
    rows' longest possible length, ``max_pages * page``. Which entries a call
    reads, and that they name pages, is ``check_pages``' business."""
    shape = getattr(table, "shape", None)
    dtype = str(getattr(table, "dtype", ""))
    if shape is None or "int" not in dtype or "uint" in dtype:
        raise TypeError(f"block_table must be a 2-D int tensor or array [B, max_pages], got {table!r:.80}")
    if len(shape) != 2 or shape[0] != q_shape[0] or shape[1] < 1:
        raise ValueError(f"block_table must be shaped [B, max_pages] with B = {q_shape[0]} (q's batch size) and "
                         f"max_pages >= 1, got {tuple(shape)}")
    if len(pool_shape) != 4 or pool_shape[3] != q_shape[3] or min(pool_shape) < 1:
        raise ValueError(f"with block_table, k and v are page pools [num_pages, Hkv, page, D] with D = {q_shape[3]} "
                         f"(q's head dim), got {tuple(pool_shape)}")
    return int(shape[1]) * int(pool_shape[2])


def check_pages(table_rows, lens, page: int, num_pages: int) -> None:
    """Every page a row reads (the first ``ceil(lens[b] / page)`` entries of
    its table row; ``table_rows``: host lists) names a page of the pool."""
    for b, (row, n) in enumerate(zip(table_rows, lens)):
        used = row[:-(-n // page)]
        bad = [x for x in used if not 0 <= x < num_pages]
        if bad:
            raise ValueError(f"block_table[{b}] names page {bad[0]} among the {len(used)} pages its length {n} "
                             f"reads; the pools hold pages 0 .. {num_pages - 1}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale=}")
    return float(scale)
