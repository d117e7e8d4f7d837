"""Kernel configurations: the layout block and the tiles of every kernel.

A ``KernelConfig`` names the layout block (``block``: the BlockLayout is built
with it, so it is the granularity at which empty work is skipped) and, for
each kernel, the tile a program owns, the step it walks the other axis by,
and the launch settings:

- forward: a program owns ``block_m`` queries and walks the keys ``block_n``
  at a time (``fwd_warps`` warps, ``fwd_stages`` software-pipeline stages);
- dK/dV: a program owns ``block_n1`` keys and walks the queries ``block_m1``
  at a time;
- dQ: a program owns ``block_m2`` queries and walks the keys ``block_n2`` at
  a time (both backward kernels use ``bwd_warps`` and ``bwd_stages``).

Tiles and block are independent powers of two, at least 16 (the smallest
``tl.dot``): ``tables.py`` maps the layout onto each kernel's (tile, step)
grid, splitting blocks wider than a step and merging blocks narrower than a
tile. The default block, 64, is the smallest step of the table: a 128-query
tile then skips every 64-key step that holds no allowed pair (half the
PARTIAL work of ``fixed(128, 32)``), where a block of 128 (FlexAttention's)
would compute it. The price is a layout with about 4x the entries of block
128 (host memory and build time, once per sequence length). Tests use
``block=16`` with every tile 16.

Defaults for one NVIDIA H100 / H200 (``default_config``) depend on the head
dim, the dtype and, for 16-bit inputs, on how long the forward's loop is:
the layout's ``mean_walk`` (keys per query block row, on average over the
rows that have any). Under ``SHORT_WALK`` keys (banded and planned
patterns: at n = 16384 sliding_window(1024) walks 1054, local_global(512,
64) 629, a planned strided(128)'s components 191 and 96; causal 8224,
fixed(128, 32) in natural order 4160) a program spends
most of its time loading its tile and writing its result, so smaller tiles
win: more programs per SM, one's loads under another's math. Long walks
(causal, fixed(128, 32) in natural order) amortize that and want the
larger tiles' arithmetic intensity. Chosen by time on an H200
(``gpu_check.sh tiles``, n = 16384, H = 16; PERFORMANCE.md "Tile choice"):
D = 64 forward, sliding_window 0.251 ms at 128 x 64 -> 0.208 at 64 x 64 with
2 stages; for long walks 128 x 64 stays (64 x 128 was 7% faster on causal
at 16384 but 3% slower at 65536 and 2x slower on fixed(128, 32)); D = 128 forward,
local_global 0.370 -> 0.277 and sliding_window 0.418 -> 0.386 at 64 x 64,
causal 2.075 at 128 x 128 against 2.372; D = 128 backward, causal 7.52 ->
7.10 with dK/dV 64 x 128 and dQ 128 x 64 (8 warps, 3 stages), sliding_window
1.16 with dK/dV 32 x 64 and dQ 64 x 64 (4 warps) against 1.32 (the long
column of a global token is walked by one program: a 32-key tile halves
it). A causal sweep (``gpu_check.sh sweep``) chose the D = 64 backward: 64 x 64
with 4 warps beat Flex's 64 x 128 / 128 x 64 with 8 warps by 29%.
The float32 rows (exact products, ``input_precision="ieee"``, on the FMA
units) are small tiles, untimed, for every walk.
``python bench/bench_triton.py --resources`` compiles the table for sm_90
without a GPU and reports registers and spills (under Triton 3.6, the GPU
image, its compile call fails, so it runs where a newer Triton is): with
Triton 3.9, compiled as a plain launch specializes them (no GQA, natural
order, int32 row offsets), few 16-bit entries spill (bytes: D = 64 long
forward 16, D = 128 long forward 16 and dK/dV 32; the short rows none),
which the measured times include; the fp32 D = 128 and 256 backward spill
more (up to 3 KiB in the D = 256 dQ).

======  ===========  =====  ================================  ===========================================
D       dtype        walk   forward M x N, warps, stages      backward M1 x N1 / M2 x N2, warps, stages
======  ===========  =====  ================================  ===========================================
<= 64   bf16, fp16   long   128 x 64, 4, 3                    64 x 64 / 64 x 64, 4, 2
<= 64   bf16, fp16   short  64 x 64, 4, 2                     64 x 64 / 64 x 64, 4, 2
128     bf16, fp16   long   128 x 128, 8, 3                   64 x 128 / 128 x 64, 8, 3
128     bf16, fp16   short  64 x 64, 4, 3                     32 x 64 / 64 x 64, 4, 2
256     bf16, fp16   any    64 x 32, 4, 3                     32 x 32 / 64 x 32, 8, 2
<= 64   fp32         any    64 x 32, 8, 2                     32 x 32 / 64 x 32, 8, 1
128     fp32         any    32 x 16, 8, 2                     32 x 32 / 32 x 32, 8, 1
256     fp32         any    32 x 16, 8, 2                     16 x 32 / 32 x 32, 8, 1
======  ===========  =====  ================================  ===========================================

Head dims that are not a power of two use the row of the next power of two
(the runtime pads them with zeros).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from patterncc.planner import DEFAULT_BLOCK

MAX_HEAD_DIM = 256
MIN_TILE = 16  # the smallest M, N and K that tl.dot accepts
SHORT_WALK = 2048  # keys: a layout whose mean_walk is under this takes the short-walk tiles


@dataclass(frozen=True)
class KernelConfig:
    """Layout block, tiles and launch settings (see the module docstring)."""

    block: int = 64
    # forward
    block_m: int = 128
    block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    # backward: dK/dV (block_m1 x block_n1) and dQ (block_m2 x block_n2)
    block_m1: int = 64
    block_n1: int = 64
    block_m2: int = 64
    block_n2: int = 64
    bwd_warps: int = 4
    bwd_stages: int = 2
    # the backward kernels walk each tile's steps as one loop where every tile
    # is a band (tables.band_table); off: on an H200 it gained no more than the run-to-run
    # spread on short walks and made causal's dK/dV up to 1.7x slower (its long loops spill)
    bwd_band: bool = False

    def __post_init__(self):
        if not isinstance(self.bwd_band, bool):
            raise ValueError(f"KernelConfig.bwd_band must be True or False, got bwd_band={self.bwd_band!r}")
        for name, value in asdict(self).items():
            if name == "bwd_band":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelConfig.{name} must be a positive integer, got {name}={value!r}")
        if self.block & (self.block - 1) or self.block < MIN_TILE:
            raise ValueError(f"KernelConfig.block must be a power of two >= {MIN_TILE}, got block={self.block}")
        for name in ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2"):
            tile = getattr(self, name)
            if tile < MIN_TILE or tile & (tile - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= {MIN_TILE}, got {name}={tile}")

    def describe(self) -> str:
        return (f"block={self.block}; forward {self.block_m}x{self.block_n} "
                f"({self.fwd_warps} warps, {self.fwd_stages} stages); backward dK/dV "
                f"{self.block_m1}x{self.block_n1}, dQ {self.block_m2}x{self.block_n2} "
                f"({self.bwd_warps} warps, {self.bwd_stages} stages{', band walk' if self.bwd_band else ''})")


# (16-bit?, padded head dim) -> (forward M, N, warps, stages), (backward M1, N1, M2, N2, warps, stages)
_H100 = {
    (True, 64): ((128, 64, 4, 3), (64, 64, 64, 64, 4, 2)),
    (True, 128): ((128, 128, 8, 3), (64, 128, 128, 64, 8, 3)),
    (True, 256): ((64, 32, 4, 3), (32, 32, 64, 32, 8, 2)),
    (False, 64): ((64, 32, 8, 2), (32, 32, 64, 32, 8, 1)),
    (False, 128): ((32, 16, 8, 2), (32, 32, 32, 32, 8, 1)),
    (False, 256): ((32, 16, 8, 2), (16, 32, 32, 32, 8, 1)),
}

# the 16-bit rows for layouts with a short walk
_H100_SHORT = {
    (True, 64): ((64, 64, 4, 2), (64, 64, 64, 64, 4, 2)),
    (True, 128): ((64, 64, 4, 3), (32, 64, 64, 64, 4, 2)),
}

_DTYPES = {"bfloat16": True, "float16": True, "float32": False}


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels run at: the next power of two, at least 16."""
    return max(MIN_TILE, 1 << (head_dim - 1).bit_length())


def default_config(head_dim: int = 64, dtype="bfloat16", block: int | None = None,
                   walk: float | None = None) -> KernelConfig:
    """The H100 table's entry for ``head_dim`` and ``dtype`` (a torch dtype or
    its name), with layout block ``block`` (default 64); ``walk``, the
    layout's ``mean_walk``, picks the short-walk row under ``SHORT_WALK``
    (None: the long-walk row)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of bfloat16, float16, float32; got {dtype!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be an integer in 1..{MAX_HEAD_DIM}, got {head_dim=!r}")
    row = max(64, padded_head_dim(head_dim))
    key = (_DTYPES[name], row)
    short = walk is not None and walk < SHORT_WALK and key in _H100_SHORT
    (m, n, fw, fs), (m1, n1, m2, n2, bw, bs) = (_H100_SHORT if short else _H100)[key]
    cfg = KernelConfig(DEFAULT_BLOCK, m, n, fw, fs, m1, n1, m2, n2, bw, bs)
    if block is None or block == cfg.block:
        return cfg
    if isinstance(block, bool) or not isinstance(block, int) or block < MIN_TILE or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {MIN_TILE}, got {block=!r}")
    return replace(cfg, block=block)
