"""Input checks shared by the numpy reference and its torch glue (``_torch.py``):
messages name the argument and what was expected."""

from __future__ import annotations

import math
import numbers
import sys
import weakref

import numpy as np


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


def check_cu_seqlens(cu_seqlens, total: int):
    """``cu_seqlens`` as int64 numpy offsets ``[S + 1]``: sequence ``s`` is
    tokens ``offsets[s]:offsets[s + 1]`` of the packed batch of ``total``.

    Taken as an int32 or int64 torch tensor (on any device: it is read on the
    host), a numpy integer array, or a list of ints. FlashAttention asks for
    int32 because its kernels read the tensor directly; here it is read once
    on the host, so int64 (what ``torch.cumsum`` returns) is accepted too.
    The offsets start at 0, end at ``total`` and never decrease: empty
    sequences are allowed. TypeError/ValueError naming ``cu_seqlens`` otherwise.
    """
    values = _integer_vector(cu_seqlens)
    if values.size < 2:
        raise ValueError(f"cu_seqlens must hold at least two offsets (0 and the total {total}), got {values.tolist()}")
    ends = f"cu_seqlens must start at 0 and end at the packed length {total} (q.shape[2])"
    if values[0] != 0:
        raise ValueError(f"{ends}, got cu_seqlens[0] = {values[0]}")
    if values[-1] != total:
        raise ValueError(f"{ends}, got cu_seqlens[-1] = {values[-1]}")
    drops = np.flatnonzero(np.diff(values) < 0)
    if drops.size:
        s = int(drops[0])
        raise ValueError(f"cu_seqlens must be non-decreasing (cumulative lengths), got cu_seqlens[{s}] = "
                         f"{values[s]} > cu_seqlens[{s + 1}] = {values[s + 1]}")
    return values


def _integer_vector(cu_seqlens):
    """``cu_seqlens`` as a 1-D int64 numpy array, or a TypeError/ValueError saying what it must be."""
    torch = sys.modules.get("torch")
    wanted = "integers: an int32 tensor [num_seqs + 1] (int64 is accepted too), a numpy int array or a list"
    if torch is not None and isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must hold {wanted}, got a tensor of dtype {cu_seqlens.dtype}")
        values = _host_values(cu_seqlens)
    elif isinstance(cu_seqlens, np.ndarray):
        if not np.issubdtype(cu_seqlens.dtype, np.integer):
            raise TypeError(f"cu_seqlens must hold {wanted}, got a numpy array of dtype {cu_seqlens.dtype}")
        values = cu_seqlens
    elif isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))
                   for x in cu_seqlens):
            raise TypeError(f"cu_seqlens must hold {wanted}, got {cu_seqlens!r}")
        values = np.array([int(x) for x in cu_seqlens], dtype=np.int64)
    else:
        raise TypeError(f"cu_seqlens must hold {wanted}, got {type(cu_seqlens).__name__}")
    if values.ndim != 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1], got shape {tuple(values.shape)}")
    return values.astype(np.int64)


def _host_values(t):
    """A tensor's values in numpy (callers copy them: ``_integer_vector``),
    read once per tensor and version (``host_read``): a packed model hands
    one cu_seqlens tensor to every layer's forward and backward."""
    return host_read(t, lambda: t.detach().cpu().numpy())


def host_read(t, compute, *what):
    """``compute()``, a value read from tensor ``t`` on the host (``what``
    names which, where one tensor gives several), kept for this very tensor
    object at this version where that read waits for ``t``'s device: it
    waits for every launch queued before it. Autograd's own test of a saved
    tensor: an in-place change makes a new version, which is read again."""
    if not _reads_wait(t):
        return compute()
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version: read every time
        return compute()
    slot = (id(t), *what)
    hit = _HOST_READS.get(slot)
    if hit is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    value = compute()

    def forget(ref, slot=slot):
        if _HOST_READS.get(slot, (None,))[0] is ref:
            del _HOST_READS[slot]

    _HOST_READS[slot] = (weakref.ref(t, forget), version, value)
    return value


def _reads_wait(t) -> bool:
    """Whether reading ``t`` on the host waits for its device. A CPU tensor's
    read is a view, never kept: its values may change through numpy without
    a new version."""
    return t.device.type != "cpu"


_HOST_READS: dict[tuple, tuple] = {}  # (id(tensor), *what) -> (weak tensor, its version, the value read)


def check_packed(q, k, v, cu_seqlens, cache_seqlens=None):
    """The checks of a packed call, before any work: q ``[1, H, total, D]``, k
    and v ``[1, Hkv, total, D]`` (arrays or tensors, shaped as
    ``check_shapes`` wants), no ``cache_seqlens``; returns
    ``check_cu_seqlens(cu_seqlens, total)``."""
    if cache_seqlens is not None:
        raise ValueError("cu_seqlens and cache_seqlens cannot be combined: a packed batch is its own keys "
                         "(q, k, v [1, H, total, D]); give one or the other")
    shapes = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = getattr(x, "shape", None)
        if shape is None:
            raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
        shapes.append(tuple(shape))
    q_shape, k_shape, v_shape = shapes
    check_shapes(q_shape, k_shape, v_shape)
    if q_shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch is packed into one row, batch size 1: q [1, H, total, D], "
                         f"k and v [1, Hkv, total, D]; got q {q_shape}")
    if k_shape[2] != q_shape[2]:
        raise ValueError(f"with cu_seqlens q, k and v hold the same packed tokens: q's length {q_shape[2]} must "
                         f"equal k's and v's {k_shape[2]} (q {q_shape}, k {k_shape})")
    return check_cu_seqlens(cu_seqlens, q_shape[2])
