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


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale=}")
    return float(scale)


def check_cu_seqlens(cu_seqlens, total: int):
    """The token offsets of a packed batch, numpy int64 ``[S + 1]``, from
    ``cu_seqlens`` (an int32 tensor or array ``[S + 1]``: 0, non-decreasing,
    ending at ``total``, the tokens of q, k and v); else a TypeError or
    ValueError naming it."""
    import numpy as np

    if hasattr(cu_seqlens, "detach"):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex:
            raise TypeError(f"cu_seqlens must hold integers (int32), got {cu_seqlens.dtype}")
        cu_seqlens = cu_seqlens.detach().cpu().numpy()
    offsets = np.asarray(cu_seqlens)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"cu_seqlens must hold integers (int32), got {offsets.dtype}")
    if offsets.ndim != 1 or offsets.size < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1] with at least 2 entries, got shape {offsets.shape}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total} (q.shape[2]), "
                         f"got {offsets[0]} .. {offsets[-1]}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("cu_seqlens must be non-decreasing (cumulative sequence lengths)")
    return offsets
