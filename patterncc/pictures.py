"""Pictures of a pattern, like the Sparse Transformer paper's figure 3: the
element mask at a small length beside the block layout at the real one."""

from __future__ import annotations

import numpy as np

from . import ir
from .masks import dense_mask

# The element mask is drawn at this length at most, so every cell stays visible.
PICTURE_LEN = 256
# Block layouts larger than this are max-pooled for drawing.
PICTURE_BLOCKS = 512


def draw_pattern(pat: ir.Pattern, lay, path: str, *, heads: int = 1, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n_small = min(lay.seq_len, PICTURE_LEN)
    elements = dense_mask(pat, n_small, heads)[0]
    blocks = _pooled(lay.to_dense()[0], PICTURE_BLOCKS)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    left.imshow(elements, cmap=ListedColormap(["#f4f4f4", "#1f5fa8"]), interpolation="nearest", vmin=0, vmax=1)
    left.set_title(f"element mask, n = {n_small} (head 0)", fontsize=9)
    left.set_xlabel("key k")
    left.set_ylabel("query q")
    right.imshow(blocks, cmap=ListedColormap(["#f4f4f4", "#8fb8e6", "#1f5fa8"]), interpolation="nearest", vmin=0, vmax=2)
    right.set_title(
        f"block layout, n = {lay.seq_len}, block = {lay.block}\n"
        f"{lay.nnz} non-empty blocks, density {lay.density:.3f}\n(dark: full, light: partial)",
        fontsize=9,
    )
    right.set_xlabel("key block")
    right.set_ylabel("query block")
    fig.suptitle(title or str(pat), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pooled(classes: np.ndarray, size: int) -> np.ndarray:
    """Max-pool an int8 [nq, nk] class picture down to at most size x size."""
    factor = -(-max(classes.shape) // size)
    if factor <= 1:
        return classes
    nq, nk = (-(-s // factor) * factor for s in classes.shape)
    padded = np.zeros((nq, nk), dtype=classes.dtype)
    padded[: classes.shape[0], : classes.shape[1]] = classes
    return padded.reshape(nq // factor, factor, nk // factor, factor).max(axis=(1, 3))
