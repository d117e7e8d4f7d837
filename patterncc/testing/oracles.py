"""Brute force, the kit's definition of right: block classes straight from
the element mask, attention as a dense float64 torch computation with
autograd (independent of the reference backend's explicit backward), and
the expected values and error magnitudes the assertions compare against."""

from __future__ import annotations

import math

import numpy as np

from .. import ir
from ..blocklayout import EMPTY, FULL, PARTIAL


def block_classes(pat: ir.Pattern | str, seq_len: int, block: int, heads: int = 1) -> np.ndarray:
    """int8 ``[heads, nq, nk]`` (0 empty, 1 partial, 2 full) from ``pcc.mask``:
    the ground truth a layout is checked against. Small ``n`` only."""
    from .. import pipeline

    m = pipeline.mask(pat, seq_len=seq_len, heads=heads)  # (heads, n, n)
    nb = -(-seq_len // block)
    padded = np.zeros((heads, nb * block, nb * block), dtype=bool)
    padded[:, :seq_len, :seq_len] = m
    inside = np.zeros((nb * block, nb * block), dtype=bool)
    inside[:seq_len, :seq_len] = True
    tiles = padded.reshape(heads, nb, block, nb, block)
    inside_tiles = inside.reshape(nb, block, nb, block)
    any_allowed = tiles.any(axis=(2, 4))
    all_allowed = (tiles | ~inside_tiles[None]).all(axis=(2, 4))
    return np.where(any_allowed, np.where(all_allowed, FULL, PARTIAL), EMPTY).astype(np.int8)


def dense_attention(mask, q, k, v, scale=None, terms=None):
    """``(o, lse)`` in float64 torch with autograd: the kit's own definition,
    independent of the reference backend's explicit backward.

    ``mask`` bool ``[H or 1, n, n]``; q ``[B, H, n, D]``, k and v
    ``[B, Hkv, n, D]``, query head ``h`` reading kv head ``h // (H // Hkv)``.
    ``terms``: a ``patterncc.scores.ScoreTerms`` of torch tensors (or None),
    with the formulas of ``patterncc.scores``. A row with no allowed key
    gives ``o = 0``, ``lse = -inf`` (the sink's logit with sinks) and no
    gradient to q, k, v.
    """
    import torch

    B, H, n, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)[None]  # (1, H or 1, n, n)
    k = k.repeat_interleave(group, dim=1)  # (B, H, n, D)
    v = v.repeat_interleave(group, dim=1)
    has_key = mask.any(dim=-1)  # (1, H, n)
    s = torch.where(mask, _term_scores(scale * q @ k.transpose(-1, -2), terms), -math.inf)
    sinks = None if terms is None else terms.sinks
    if sinks is not None:
        sink = sinks.to(s.dtype)[None, :, None, None].expand(B, H, n, 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)  # (B, H, n), finite
        return torch.exp(s - lse[..., None]) @ v, lse
    # Rows without a key get scores 0 instead of all -inf (whose softmax and
    # gradient would be NaN); the mask below zeroes their probabilities.
    s = torch.where(has_key[..., None], s, 0.0)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, n)
    p = torch.exp(s - lse[..., None]) * mask
    return p @ v, torch.where(has_key, lse, -math.inf)


def _term_scores(raw, terms):
    """``raw`` (``scale * q.k``, ``[B, H, n, n]``) with softcap, ALiBi and the
    relative bias of ``terms`` (None: none)."""
    import torch

    if terms is None:
        return raw
    n = raw.shape[-1]
    diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # q - k
    s = raw if terms.softcap is None else terms.softcap * torch.tanh(raw / terms.softcap)
    if terms.alibi_slopes is not None:
        s = s - terms.alibi_slopes.to(raw.dtype)[:, None, None] * diff.abs()
    if terms.rel_bias is not None:
        M = (terms.rel_bias.shape[1] - 1) // 2
        s = s + terms.rel_bias.to(raw.dtype)[:, diff.clamp(-M, M) + M]
    return s


# Above this many score elements the magnitudes M are not computed densely;
# the comparison then uses the tensor's largest reference magnitude instead.
_DENSE_CHECK_ELEMENTS = 2**26


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _expected(pat, q, k, v, scale, do, against: str, grads: bool, given: dict):
    """float64 ``({name: expected}, {name: magnitude M})``; see ``Tolerance``.
    ``given``: the call's term tensors, by keyword."""
    import torch

    from .. import pipeline
    from ..attention import Attention
    from ..scores import ScoreTerms

    B, H, n, D = q.shape
    q64, k64, v64, do64 = (x.detach().to("cpu", torch.float64) for x in (q, k, v, do))
    small = B * H * n * n <= _DENSE_CHECK_ELEMENTS
    mask = pipeline.mask(pat, seq_len=n, heads=H) if small else None
    reference = Attention(pat, backend="reference")
    # The terms in effect: the pattern's and the call's, with the standard
    # ALiBi slopes exactly as the public API makes them.
    given64 = {name: t.detach().to("cpu", torch.float64) for name, t in given.items()}
    call = reference.call_terms(q64, ScoreTerms(reference.terms.softcap, **given64))
    tensors = {name: t for name, t in zip(("alibi_slopes", "sinks", "rel_bias"), call.tensors()) if t is not None}
    leaves64 = {name: t.detach().to(torch.float64).requires_grad_(grads and name in given)
                for name, t in tensors.items()}

    if against == "reference":
        attn = reference
    elif against == "dense":
        if mask is None:
            raise ValueError(f"against='dense' needs a small problem, got {B=} {H=} {n=}")

        def attn(q_, k_, v_, scale=None, return_lse=True, **terms):
            return dense_attention(mask, q_, k_, v_, scale, ScoreTerms(call.softcap, **terms))
    else:
        raise ValueError(f"against must be 'reference' or 'dense', got {against!r}")
    leaves = [x.clone().requires_grad_(grads) for x in (q64, k64, v64)]
    o, lse = attn(*leaves, scale=scale, return_lse=True, **leaves64)
    expected = {"o": o, "lse": lse}
    if grads:
        o.backward(do64)
        expected.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        expected.update({f"d_{name}": leaves64[name].grad for name in given})
    expected = {name: _as_float64(x) for name, x in expected.items()}
    if mask is None:
        return expected, {}
    with torch.no_grad():
        terms64 = ScoreTerms(call.softcap, **{name: t.detach() for name, t in leaves64.items()})
        magnitude = _magnitudes(mask, q64, k64, v64, do64, torch.from_numpy(expected["o"]),
                                torch.from_numpy(expected["lse"]), scale, terms64)
    return expected, {name: m.numpy() for name, m in magnitude.items()}


def _magnitudes(mask, q, k, v, do, o, lse, scale, terms):
    """The componentwise magnitudes ``M`` of ``Tolerance``, float64 torch."""
    import torch

    B, H, n, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = torch.as_tensor(np.asarray(mask))[None]  # (1, H, n, n)
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    raw = scale * q @ kr.transpose(-1, -2)  # (B, H, n, n)
    p = torch.where(mask, torch.exp(_term_scores(raw, terms) - finite[..., None]), 0.0)  # (B, H, n, n)
    qa, ka, va, doa, oa = q.abs(), kr.abs(), vr.abs(), do.abs(), o.abs()
    row = (doa * oa).sum(-1)  # (B, H, n)
    ds = p * (doa @ va.transpose(-1, -2) + row[..., None])
    dk = scale * ds.transpose(-1, -2) @ qa
    dv = p.transpose(-1, -2) @ doa
    # Every added score term's size: its rounding errs in proportion to it.
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()  # (n, n)
    term_sizes = torch.zeros(H, n, n, dtype=q.dtype)
    if terms.alibi_slopes is not None:
        term_sizes += terms.alibi_slopes.abs()[:, None, None] * distance
    if terms.rel_bias is not None:
        M = (terms.rel_bias.shape[1] - 1) // 2
        diff = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        bucket = diff.clamp(-M, M) + M  # (n, n)
        term_sizes += terms.rel_bias.abs()[:, bucket]
    lse_size = scale * (p * (qa @ ka.transpose(-1, -2))).sum(-1) + (p * term_sizes).sum(-1) + finite.abs()

    def per_kv_head(x):  # (B, H, n, D) -> (B, Hkv, n, D): sum over the group
        return x.reshape(B, H // group, group, n, D).sum(2)

    out = {
        "o": p @ va,
        "lse": lse_size,
        "dq": scale * ds @ ka,
        "dk": per_kv_head(dk),
        "dv": per_kv_head(dv),
    }
    if terms.alibi_slopes is not None:
        out["d_alibi_slopes"] = (ds * distance).sum((0, 2, 3))
    if terms.rel_bias is not None:
        per_head = ds.sum(0).reshape(H, n * n)  # (H, n * n)
        out["d_rel_bias"] = torch.zeros_like(terms.rel_bias).index_add_(1, bucket.reshape(-1), per_head)
    if terms.sinks is not None:
        out["d_sinks"] = (torch.exp(terms.sinks[None, :, None] - finite) * row).sum((0, 2))
    return out
