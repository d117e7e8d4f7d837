"""Context parallelism: attention over a sequence sharded across ranks,
moving only the keys and values the pattern reads.

    import torch.distributed as dist
    from patterncc.distributed import ContextParallelAttention
    cp = ContextParallelAttention("sliding_window(4096)", sharding="zigzag")
    o_local = cp(cp.shard(q), cp.shard(k), cp.shard(v))
    o = cp.unshard(o_local)

``sharding`` says which positions each rank holds; ``exchange`` which keys
each rank needs and how they move; ``attention`` the module users call.
"""

from .attention import ContextParallelAttention
from .exchange import needed_keys
from .sharding import SHARDINGS, local_length, positions, shard, unshard

__all__ = ["SHARDINGS", "ContextParallelAttention", "local_length", "needed_keys", "positions", "shard", "unshard"]
