"""Tables the kernels read, copied to the device once and kept in a cache.

A cache filled inside a call that ``torch.compile(mode="reduce-overhead")``
runs would break it: CUDA graph trees send every allocation of the calling
thread to the graph's private pool while they warm up and record a graph,
and refuse a tensor of that pool that outlives the call without being one
of its outputs ("tensor(s) in the cudagraph pool not tracked as outputs").
So where graph trees are loaded, a table is made on a thread of its own,
whose allocations take the ordinary allocator, and the copy is finished
before the table is handed back. Elsewhere the copy is from pinned memory
and does not wait for the card; while a stream captures a graph, a plain one.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_copier: ThreadPoolExecutor | None = None


def to_device(host: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """``host`` (a numpy array or a CPU tensor) on ``device``, in memory no
    CUDA graph pool owns (see the module docstring)."""
    t = torch.from_numpy(host) if isinstance(host, np.ndarray) else host
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return t.to(device)
    if _graph_trees_loaded():
        return _copy_thread().submit(_copied, t, device).result()
    # pinned: the copy does not hold the host until the card reaches it
    return t.pin_memory().to(device, non_blocking=True)


# Each table of a shared copy starts a multiple of this many bytes into it: Triton specializes a
# kernel on whether each pointer is 16-byte aligned, so a view must keep the alignment a table of
# its own has, or a new batch's offsets would compile a second variant
_VIEW_ALIGN = 64


def to_device_all(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """Each array on ``device`` (all of one dtype), through one copy: views of
    one buffer, each at an aligned offset, each at least one element long
    (an empty table keeps a pointer into the buffer). A table set built
    for a new shape or batch has a dozen arrays; one pinned copy each was
    most of its host time on the card."""
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        raise TypeError(f"to_device_all takes arrays of one dtype, got {sorted({str(a.dtype) for a in arrays})}")
    per = _VIEW_ALIGN // dtype.itemsize
    sizes = [max(a.size, 1) for a in arrays]
    starts = np.concatenate([[0], np.cumsum([-(-size // per) * per for size in sizes])])
    host = np.zeros(int(starts[-1]), dtype=dtype)
    for a, start in zip(arrays, starts):
        host[start:start + a.size] = a.ravel()
    buffer = to_device(host, device)
    return [buffer[start:start + size] for start, size in zip(starts, sizes)]


def _graph_trees_loaded() -> bool:
    # imported by inductor only when a graph is compiled with CUDA graphs: until then no pool takes our allocations
    return "torch._inductor.cudagraph_trees" in sys.modules


def _copied(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    made = t.to(device)
    torch.cuda.current_stream(device).synchronize()  # the caller's streams may read it at once
    return made


def _copy_thread() -> ThreadPoolExecutor:
    global _copier
    if _copier is None:
        _copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patterncc-tables")
    return _copier
