"""patterncc as a Hugging Face transformers attention implementation.

    import patterncc.integrations.transformers as pt
    pt.register()                                            # attn_implementation="patterncc"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="patterncc")
    pt.apply(model, patterns={"sliding_attention": "strided(128)", 0: "causal"})   # optional: your patterns

Without ``apply`` a model runs its **own** masking through patterncc
patterns, exactly: full causal layers ``causal``, sliding-window layers
(``sliding_window``, ``layer_types``) ``sliding_window(w)`` (transformers'
``q - k < w``), Llama 4's chunked layers ``chunked(chunk)``, Gemma 2's
attention softcap and GPT-OSS's learned sinks (``s_aux``) as score terms,
the module's ``scaling`` as the scale. What it cannot run exactly it refuses,
naming the feature: attention dropout while training, a 4-D custom
``attention_mask``, T5's ``position_bias``, padding that is not one
contiguous run per row, a cache that dropped keys in the middle of a
pattern's period.

``apply`` puts a pattern (object, source text or ``.pat`` path) on layers
chosen by index or by ``config.layer_types`` name; a layer given a pattern
keeps every key in the cache (its type becomes ``full_attention``) since a
user pattern may read far back.

Padding: a 2-D ``attention_mask`` (as ``generate`` builds it) selects each
row's real tokens; the pattern applies to them alone, positions counted from
the row's first real token (transformers' own rule for chunked layers; for
causal and sliding windows the same as counting from the start), and padded
query rows give 0. A flattened batch (``cu_seq_lens_q``/``_k``, as
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives it) is
one packed call (``cu_seqlens``), eager or traced by ``torch.compile``.
Packed rows given by ``position_ids`` alone (restarting without a mask) run
each sequence alone, positions counted from its start: one packed call for
all of them, or one call per sequence inside ``torch.compile`` (finding
the restarts reads the positions on the host, which a trace cannot).

Generation runs through transformers' cache: new queries are the last
positions of the keys, which the decode path serves (the query-rows kernel
on a GPU). The backend is ``"auto"`` (Triton for CUDA tensors, the float64
reference otherwise) unless ``register(backend=...)`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import ir
from ..nn import resolve_pattern
from ..pipeline import compile as compile_pattern, parse as parse_pattern

NAME = "patterncc"
_BACKEND = {"name": "auto", "packed_rows": True}


def register(backend: str = "auto", name: str = NAME, packed_rows: bool = True) -> None:
    """Add ``name`` to transformers' attention and mask interfaces.

    ``packed_rows``: whether a row's ``position_ids`` may restart (packed
    sequences given without ``cu_seq_lens_q/_k``). Finding the restarts
    reads the positions on the host, which a torch.compile trace cannot: it
    breaks the graph at each layer. With ``False`` the positions are never
    read; a device-side check fails the step, loudly, if a row restarts."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"{backend=} is not one of auto, reference, triton")
    if not isinstance(packed_rows, bool):
        raise TypeError(f"packed_rows must be True or False, got {packed_rows!r}")
    _BACKEND["name"] = backend
    _BACKEND["packed_rows"] = packed_rows
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)


def apply(model, patterns: dict | str) -> list[int]:
    """Put patterns on a model's attention layers; returns the layers changed.

    ``patterns``: ``{layer index or layer type: pattern}`` (a pattern object,
    source text, or a ``.pat`` path), or a ``.pat`` path whose definitions
    are named after layer types (``pattern sliding_attention = ...``).
    """
    if isinstance(patterns, str):
        patterns = _patterns_from_file(patterns)
    if not isinstance(patterns, dict) or not patterns:
        raise TypeError("patterns must be a non-empty dict {layer index or layer type: pattern} or a .pat path")
    layers = _attention_layers(model)
    config = _text_config(model.config)
    types = list(getattr(config, "layer_types", None) or [])
    chosen: dict[int, ir.Pattern] = {}
    for key, pat in patterns.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"a layer is chosen by index or type name, got {key!r}")
        if isinstance(key, int):
            if not 0 <= key < len(layers):
                raise ValueError(f"layer {key} does not exist: the model has {len(layers)} attention layers")
            idxs = [key]
        else:
            idxs = [i for i, t in enumerate(types) if t == key]
            if not idxs:
                raise ValueError(f"no layer has type {key!r}; the model's layer types: {sorted(set(types)) or 'none'}")
        for i in idxs:
            chosen[i] = resolve_pattern(pat)
    if not types and (getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)):
        # Without layer types (Mistral) transformers' cache drops keys on every
        # layer of a windowed model, and the model makes one mask for all its
        # layers: every layer keeps every key instead (a layer left alone still
        # runs its own window, exactly, over the longer cache).
        types = ["full_attention"] * getattr(config, "num_hidden_layers", len(layers))
    for i, pat in chosen.items():
        layers[i].patterncc_pattern = pat
        if i < len(types):
            types[i] = "full_attention"  # the cache keeps every key: a user pattern may read far back
    if types:
        config.layer_types = types
    return sorted(chosen)


def _patterns_from_file(path: str) -> dict:
    """``{definition name: pattern}`` of a ``.pat`` file (every definition,
    called with its defaults): one per layer type."""
    from pathlib import Path

    from ..parser import parse_source
    from ..pipeline import load

    module = parse_source(Path(path).read_text(encoding="utf-8"), str(path))
    return {d.name: load(path, entry=d.name) for d in module.definitions}


def _attention_layers(model) -> list:
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(layers, key=lambda m: m.layer_idx)


def _text_config(config):
    return getattr(config, "text_config", None) or getattr(config, "get_text_config", lambda: config)()


# ----------------------------------------------------------------------------
# The mask interface: no mask is built, only what the attention needs to know
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Padding:
    """What transformers' mask preparation tells the attention: the 2-D
    padding mask (bool ``[B, kv_offset + kv_length]`` or None: no padding),
    and where the keys and queries sit in absolute positions."""

    mask: torch.Tensor | None
    kv_offset: int
    kv_length: int
    q_offset: int

    @property
    def shape(self):  # transformers reads attention_mask.shape in places; this is no 4-D mask
        return ()


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> Padding:
    """transformers' mask hook: keeps the padding and the offsets, builds nothing."""
    mask = attention_mask
    if mask is not None and bool(mask.all()):
        mask = None
    return Padding(mask, int(kv_offset), int(kv_length), int(q_offset))


# ----------------------------------------------------------------------------
# The attention interface
# ----------------------------------------------------------------------------


def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                      scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                      softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs):
    """query ``[B, H, n_q, D]``, key/value ``[B, Hkv, n_k, D]`` -> (``[B, n_q, H, D]``, None)."""
    if dropout:
        raise ValueError(f"patterncc does not apply attention dropout (the model asks for {dropout}): "
                         "train with attention_dropout=0 or call model.eval()")
    if kwargs.get("position_bias") is not None:
        raise ValueError("patterncc does not take a position_bias (T5-style models): use rel_bias through "
                         "patterncc.nn, or another attn_implementation")
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError("patterncc got a prepared attention mask tensor (a custom 4-D mask, or a model that "
                         "builds its own): patterncc runs patterns, not element masks")
    pattern, period = layer_pattern(module, sliding_window)
    attn = _compiled(pattern, softcap, _BACKEND["name"])
    terms = {} if s_aux is None else {"sinks": s_aux}
    pad = attention_mask if isinstance(attention_mask, Padding) else None
    n_k = key.shape[2] if pad is None else min(pad.kv_length, key.shape[2])
    key, value = key[:, :, :n_k], value[:, :, :n_k]
    n_q = query.shape[2]
    cu = _flattened(kwargs, query.shape[0], pad, n_q, n_k)
    if cu is not None:  # one op call whose offsets stay a tensor: traced by torch.compile too
        o = attn(query, key, value, scale=scaling, cu_seqlens=cu, **terms)
        return o.transpose(1, 2).contiguous(), None
    if _BACKEND["packed_rows"]:
        packed = _packed_segments(kwargs.get("position_ids"), pad, n_q, n_k)
    else:
        packed = _never_packed(kwargs.get("position_ids"), pad, n_q, n_k)
    if pad is not None and pad.q_offset + n_q != pad.kv_offset + n_k:
        raise ValueError(f"the queries (positions {pad.q_offset}..{pad.q_offset + n_q - 1}) do not end where the "
                         f"keys do ({pad.kv_offset}..{pad.kv_offset + n_k - 1}): patterncc needs the new queries "
                         "to be the last positions (a dynamic cache, or no cache)")
    if packed is not None and not torch.compiler.is_compiling():
        # One packed call for every sequence of every row. Packed calls are not traced into graphs
        # yet, so a compiled model runs the sequences one by one (_rows) instead.
        return _packed(attn, query, key, value, scaling, terms, packed), None
    if pad is None or (pad.mask is None and packed is None):
        shift = 0 if pad is None else pad.kv_offset
        out = _span(attn, pattern, period, shift, softcap, query, key, value, scaling, terms)
        return out.transpose(1, 2).contiguous(), None
    return _rows(attn, query, key, value, scaling, terms, pad, packed, period, pattern, softcap), None


def layer_pattern(module, sliding_window: int | None) -> tuple[ir.Pattern, int]:
    """The pattern a layer runs, and the shift of positions it is invariant under
    (1: any shift; 0: none but 0)."""
    user = getattr(module, "patterncc_pattern", None)
    if user is not None:
        return user, _period(user)
    config = _text_config(module.config) if hasattr(module, "config") else None
    types = getattr(config, "layer_types", None) if config is not None else None
    layer_type = types[module.layer_idx] if types and getattr(module, "layer_idx", None) is not None else None
    if not getattr(module, "is_causal", True):
        return ir.All(), 1
    if layer_type == "chunked_attention":
        chunk = getattr(config, "attention_chunk_size", None)
        if not chunk:
            raise ValueError("a chunked_attention layer without config.attention_chunk_size")
        return _chunked(int(chunk)), int(chunk)
    if sliding_window:
        return ir.Causal() & ir.Local(int(sliding_window)), 1
    return ir.Causal(), 1


def _chunked(l: int) -> ir.Pattern:
    """The standard library's ``chunked(l)``, Llama 4's chunked attention
    (``causal & block(l)``), parsed once per chunk size (a plain dict, as
    ``_compiled``'s, which torch.compile reads without tracing the parser)."""
    if l not in _CHUNKED:
        _CHUNKED[l] = parse_pattern(f"chunked({l})")  # l is an int: the text is always well formed
    return _CHUNKED[l]


_CHUNKED: dict[int, ir.Pattern] = {}


def _period(p: ir.Pattern) -> int:
    """The smallest shift ``s`` with ``p(q + s, k + s) == p(q, k)`` that this
    check can prove (1 for rules of ``q - k``, ``l`` for ``block(l)`` and
    ``summary(l, c)``, 0 where no shift but 0 keeps the pattern)."""
    period = 1
    for node in ir.walk(p):
        if isinstance(node, ir.Primitive):  # each primitive's own period (None: none)
            step = node.period()
            if step == 1:
                continue
            step = step if isinstance(step, int) else 0  # none, or an argument over n
        elif isinstance(node, ir.Where):
            step = 0
        else:
            continue
        period = 0 if step == 0 or period == 0 else period * step // math.gcd(period, step)
    return period


def _span(attn, pattern, period: int, shift: int, softcap, query, key, value, scaling, terms):
    """Attention of queries at the end of their keys, the key tensor's first
    position ``shift`` tokens after the sequence's first. A chunked layer whose
    keys do not start on a chunk (transformers' chunked cache keeps only the
    last chunk's keys) runs each chunk of queries as causal attention over its
    own chunk's keys: exactly ``causal & block(l)`` at the true positions."""
    if _shift_ok(shift, period):
        return attn(query, key, value, scale=scaling, **terms)
    chunk = _chunk_of(pattern)
    if chunk is None:
        raise _offset_error(pattern, shift, period)
    causal = _compiled(ir.Causal(), softcap, _BACKEND["name"])
    n_q, n_k = query.shape[2], key.shape[2]
    out = []
    first = n_k - n_q  # key index of the first query
    i = 0
    while i < n_q:
        pos = shift + first + i  # the query's position in its sequence
        end = min(n_q, i + chunk - pos % chunk)  # queries up to the end of this chunk
        lo = max(0, pos - pos % chunk - shift)  # the chunk's first key in the key tensor
        out.append(causal(query[:, :, i:end], key[:, :, lo:first + end], value[:, :, lo:first + end],
                          scale=scaling, **terms))
        i = end
    return torch.cat(out, dim=2)


def _chunk_of(pattern: ir.Pattern) -> int | None:
    """``l`` when the pattern is ``causal & block(l)`` (a chunked layer)."""
    if isinstance(pattern, ir.Intersect) and len(pattern.parts) == 2:
        kinds = {type(p): p for p in pattern.parts}
        if ir.Causal in kinds and ir.Block in kinds and isinstance(kinds[ir.Block].l, int):
            return kinds[ir.Block].l
    return None


def _shift_ok(shift: int, period: int) -> bool:
    """Whether positions counted ``shift`` later give the same pattern."""
    return shift == 0 or (period > 0 and shift % period == 0)


def _offset_error(pattern, shift: int, period: int) -> ValueError:
    what = "any shift" if period == 0 else f"a shift that is not a multiple of {period}"
    return ValueError(f"`{pattern}` changes under {what}, and this layer's keys start {shift} positions after the "
                      "row's first token (a cache that dropped keys, or a mask patterncc cannot follow): use a "
                      "cache that keeps every key for this layer (patterncc.integrations.transformers.apply does)")


_ATTENTIONS: dict = {}  # (pattern, softcap, backend) -> compiled attention
_BY_KEY: dict = {}  # its registry key -> the same attention (a plain dict: Dynamo reads it, not weak references)


def _compiled(pattern: ir.Pattern, softcap: float | None, backend: str):
    """The compiled attention of a layer's pattern, made once per process.

    Under ``torch.compile`` the attention must not be made inside the trace
    (Dynamo cannot trace the registry's weak references: a graph break),
    nor found through ``functools.lru_cache`` (Dynamo traces the wrapped
    function as if the cache were not there). So the trace asks for the
    attention's key by the pattern's text, a constant Dynamo computes once,
    outside the graph, and looks the attention up by it in a plain dict."""
    if torch.compiler.is_compiling():
        return _BY_KEY[_compiled_key(str(pattern), softcap, backend)]
    return _made(pattern, softcap, backend)


@torch._dynamo.assume_constant_result
def _compiled_key(text: str, softcap: float | None, backend: str) -> str:
    """The registry key of the attention of ``text`` (a pattern's text
    parses back to an equal pattern)."""
    from ..pipeline import parse

    return _made(parse(text), softcap, backend).key


def _made(pattern: ir.Pattern, softcap: float | None, backend: str):
    key = (pattern, softcap, backend)
    attn = _ATTENTIONS.get(key)
    if attn is None:
        options = {} if softcap is None else {"softcap": float(softcap)}
        attn = _ATTENTIONS[key] = compile_pattern(pattern, backend=backend, **options)
        _BY_KEY[attn.key] = attn
    return attn


# ----------------------------------------------------------------------------
# Padding and packed rows: each sequence alone
# ----------------------------------------------------------------------------


def _flattened(kwargs: dict, batch: int, pad: Padding | None, n_q: int, n_k: int):
    """The offsets of a flattened batch as transformers hands them to the
    attention (``cu_seq_lens_q``/``cu_seq_lens_k``, from
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), or None
    without them. Query and key offsets must be equal (packed self-attention
    over one row, no padding, no cache); eagerly that is checked (both are
    read on the host once per tensor: ``checks._host_values``); inside
    torch.compile the query offsets are taken as both."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("transformers passed only one of cu_seq_lens_q and cu_seq_lens_k: patterncc runs a "
                         "flattened batch with both (equal: packed self-attention)")
    if batch != 1 or n_q != n_k or (pad is not None and (pad.mask is not None or pad.kv_offset)):
        raise ValueError(f"cu_seq_lens_q/k describe a flattened batch: one row of packed sequences, without "
                         f"padding or a cache; got batch {batch}, {n_q} queries and {n_k} keys"
                         + ("" if pad is None or pad.mask is None else ", and an attention_mask"))
    if cu_k is not cu_q and not torch.compiler.is_compiling():
        from ..backends.reference.checks import check_cu_seqlens

        if not np.array_equal(check_cu_seqlens(cu_q, n_q), check_cu_seqlens(cu_k, n_k)):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: patterncc runs packed self-attention, "
                             "where each sequence's queries are its keys")
    return cu_q


def _never_packed(position_ids, pad: Padding | None, n_q: int, n_k: int) -> None:
    """``register(packed_rows=False)``: rows whose positions restart fail the
    step on the device (no host read, nothing for a trace to break on)."""
    if _packable(position_ids, pad, n_q, n_k):
        torch._assert_async(~_restarts(position_ids).any(), "patterncc: position_ids restart inside a row (packed "
                            "sequences), but register(packed_rows=False) said rows are never packed: register with "
                            "packed_rows=True, or pass cu_seq_lens_q/_k (DataCollatorWithFlattening("
                            "return_flash_attn_kwargs=True))")
    return None


def _packed_segments(position_ids, pad: Padding | None, n_q: int, n_k: int):
    """``[(row, start, stop)]`` of the sequences packed in each row when
    ``position_ids`` restart inside a row and there is neither padding nor a
    cache (transformers' packed format); None otherwise."""
    if not _packable(position_ids, pad, n_q, n_k):
        return None
    if torch.compiler.is_compiling():
        return _segments(position_ids, n_q)
    from ..backends.reference.checks import host_read

    # every layer of a forward gets the same position_ids: read once per forward, not once per layer
    return host_read(position_ids, lambda: _segments(position_ids, n_q), "segments", n_q)


def _packable(position_ids, pad: Padding | None, n_q: int, n_k: int) -> bool:
    """Whether rows could be packed through ``position_ids``: positions given,
    one per query, and neither padding nor a cache."""
    if position_ids is None or n_q != n_k or (pad is not None and (pad.mask is not None or pad.kv_offset)):
        return False
    return position_ids.shape[-1] == n_q


def _restarts(position_ids) -> torch.Tensor:
    """bool ``[rows, n - 1]``: where a row's positions restart (a packed sequence begins after)."""
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    return pos[:, 1:] != pos[:, :-1] + 1


def _segments(position_ids, n_q: int):
    """``_packed_segments`` read on the host (a device sync)."""
    restarts = _restarts(position_ids)
    if not bool(restarts.any()):
        return None
    segments = []
    for b in range(restarts.shape[0]):
        cuts = [0, *(torch.nonzero(restarts[b]).flatten() + 1).tolist(), n_q]
        segments += [(b, s, e) for s, e in zip(cuts, cuts[1:])]
    return segments


def _packed(attn, query, key, value, scaling, terms, segments):
    """Packed rows as one packed call: the rows laid end to end, each
    ``(row, start, stop)`` segment one sequence of ``cu_seqlens``; the
    output ``[B, n, H, D]``."""
    B, H, n, D = query.shape

    def end_to_end(x):  # (B, h, n, D) -> (1, h, B * n, D)
        return x.transpose(0, 1).reshape(1, x.shape[1], B * n, D)

    cu = torch.tensor([0] + [b * n + stop for b, _, stop in segments], dtype=torch.int32)
    o = attn(end_to_end(query), end_to_end(key), end_to_end(value), scale=scaling, cu_seqlens=cu, **terms)
    return o.reshape(H, B, n, D).permute(1, 2, 0, 3).contiguous()  # (B, n, H, D)


def _rows(attn, query, key, value, scaling, terms, pad: Padding, packed, period: int, pattern, softcap):
    """Each row's real tokens (or each packed sequence) alone; padded query rows 0."""
    B, H, n_q, D = query.shape
    n_k = key.shape[2]
    out = query.new_zeros(B, n_q, H, D)
    first_query = n_k - n_q  # key index of query 0
    if packed is not None:
        spans = [(b, s, e, 0) for b, s, e in packed]
    else:
        spans = []
        mask = pad.mask[:, -(pad.kv_offset + n_k):] if pad.mask is not None else None
        for b in range(B):
            if mask is None:
                spans.append((b, 0, n_k, pad.kv_offset))
                continue
            real = torch.nonzero(mask[b]).flatten()
            if real.numel() == 0:
                continue
            first, last = int(real[0]), int(real[-1])
            if last - first + 1 != real.numel():
                raise ValueError(f"row {b}'s attention_mask is not one run of real tokens: patterncc runs each row's "
                                 "tokens as one sequence (left or right padding only)")
            start = max(first - pad.kv_offset, 0)  # in the key tensor
            shift = max(pad.kv_offset - first, 0)  # positions of the row before the key tensor's start
            spans.append((b, start, last - pad.kv_offset + 1, shift))
    for b, start, stop, shift in spans:
        q_lo, q_hi = max(start, first_query) - first_query, stop - first_query
        if q_hi <= q_lo:
            continue  # no query of this row is a real token
        o = _span(attn, pattern, period, shift, softcap, query[b:b + 1, :, q_lo:q_hi], key[b:b + 1, :, start:stop],
                  value[b:b + 1, :, start:stop], scaling, terms)
        out[b:b + 1, q_lo:q_hi] = o.transpose(1, 2).to(out.dtype)
    return out
