"""Input checks of the Triton backend: q, k, v as the kernels take them, or
a TypeError/ValueError whose message names the argument and what was expected."""

from __future__ import annotations

import torch

from ._interpret import interpreting
from .config import MAX_HEAD_DIM

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (batch * heads here)


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
    if min(H, n, D, Hkv) < 1:  # (a batch of no rows, B = 0, is an empty result, as on the reference backend)
        raise ValueError(f"every dimension of q and k but the batch must be >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
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
