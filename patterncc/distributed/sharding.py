"""Which absolute token positions each rank holds.

Two shardings of ``n`` tokens over ``P`` ranks:

- ``contiguous``: rank ``r`` holds the ``r``-th of ``P`` runs of consecutive
  tokens;
- ``zigzag``: the sequence is cut into ``2P`` runs and rank ``r`` holds run
  ``r`` and run ``2P - 1 - r``, so that under a causal pattern every rank
  has about the same number of allowed pairs (a rank with early queries
  also holds late ones).

When the runs do not divide ``n`` the first runs take one more token each
(``n = 10`` over 4 runs: 3, 3, 2, 2). A rank may hold no token at all when
``n`` is smaller than the number of runs; it still takes part in every
exchange. Positions are int64 numpy arrays, ascending.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

SHARDINGS = ("contiguous", "zigzag")


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is not one of {', '.join(map(repr, SHARDINGS))}")
    return sharding


def run_bounds(n: int, runs: int) -> np.ndarray:
    """int64 ``[runs + 1]``: run ``i`` is positions ``bounds[i] : bounds[i + 1]``;
    the first ``n % runs`` runs hold one token more than the others."""
    sizes = np.full(runs, n // runs, dtype=np.int64)
    sizes[: n % runs] += 1
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def positions(n: int, world_size: int, rank: int, sharding: str = "contiguous") -> np.ndarray:
    """int64, ascending: the absolute positions rank ``rank`` holds out of ``n``."""
    check_sharding(sharding)
    if sharding == "contiguous":
        b = run_bounds(n, world_size)
        return np.arange(b[rank], b[rank + 1], dtype=np.int64)
    b = run_bounds(n, 2 * world_size)
    back = 2 * world_size - 1 - rank
    return np.concatenate([np.arange(b[rank], b[rank + 1]), np.arange(b[back], b[back + 1])]).astype(np.int64)


def local_length(n: int, world_size: int, rank: int, sharding: str = "contiguous") -> int:
    """How many tokens rank ``rank`` holds (``len(positions(...))`` without the array)."""
    check_sharding(sharding)
    if sharding == "contiguous":
        return n // world_size + (rank < n % world_size)
    runs, back = 2 * world_size, 2 * world_size - 1 - rank
    return 2 * (n // runs) + (rank < n % runs) + (back < n % runs)


def owners(n: int, world_size: int, sharding: str = "contiguous") -> np.ndarray:
    """int64 ``[n]``: the rank that holds each position."""
    out = np.empty(n, dtype=np.int64)
    for r in range(world_size):
        out[positions(n, world_size, r, sharding)] = r
    return out


def seq_len_from(lengths, world_size: int, sharding: str = "contiguous") -> int:
    """The ``n`` that gives every rank the local length in ``lengths``
    (indexed by rank), or a ValueError naming the first rank that does not fit."""
    n = int(sum(lengths))
    for r, got in enumerate(lengths):
        want = local_length(n, world_size, r, sharding)
        if got != want:
            raise ValueError(
                f"rank {r} holds {got} tokens, but {sharding} sharding of n={n} tokens over "
                f"{world_size} ranks gives it {want}; pass each rank's shard as shard() cuts it"
            )
    return n


def shard(x: torch.Tensor, world_size: int, rank: int, sharding: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s shard of ``x [B, H, n, D]`` along the sequence (dim 2)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"shard() needs a tensor [B, H, n, D], got {_describe(x)}")
    pos = positions(x.shape[2], world_size, rank, sharding)
    return x.index_select(2, torch.as_tensor(pos, device=x.device))


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def gather_lengths(local_len: int, group=None, device=None) -> list[int]:
    """Every rank's local length, indexed by rank (a small all_gather)."""
    t = torch.tensor([local_len], dtype=torch.int64, device=comm_device(group, device))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x.item()) for x in out]


def unshard(x_local: torch.Tensor, group=None, sharding: str = "contiguous") -> torch.Tensor:
    """The whole ``[B, H, n, D]`` tensor from every rank's shard (on every
    rank; not differentiable: for tests and data, not for the model)."""
    check_sharding(sharding)
    if not isinstance(x_local, torch.Tensor) or x_local.dim() != 4:
        raise ValueError(f"unshard() needs this rank's shard [B, H, n_local, D], got {_describe(x_local)}")
    P = dist.get_world_size(group)
    lengths = gather_lengths(x_local.shape[2], group, x_local.device)
    n = seq_len_from(lengths, P, sharding)
    B, H, _, D = x_local.shape
    dev = comm_device(group, x_local.device)
    padded = x_local.new_zeros(B, H, max(lengths), D, device=dev)  # all_gather needs one shape everywhere
    padded[:, :, : x_local.shape[2]] = x_local.detach().to(dev)
    parts = [torch.empty_like(padded) for _ in range(P)]
    dist.all_gather(parts, padded, group=group)
    full = x_local.new_empty(B, H, n, D)
    for r, part in enumerate(parts):
        pos = torch.as_tensor(positions(n, P, r, sharding), device=full.device)
        full[:, :, pos] = part[:, :, : lengths[r]].to(full.device)
    return full


def comm_device(group, device) -> torch.device:
    """Where a collective's tensors live: the data's device under NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device())
