"""Every live compiled attention by its key, the text that names it to the
torch ops (ops.py): only tensors, plain numbers and strings cross an op's
boundary.

The key is what the attention computes, written out: its pattern's source
text (score terms included) and its options, as JSON. So a graph that holds
it means the same attention in any process: an exported program saved with
``torch.export.save`` and loaded elsewhere finds an attention of that text
if one is live, and otherwise makes one from the text (``find``). An
integer handed out per process would name whichever attention the loading
process happened to make first under that number. Attentions with one key
compute the same function (a pattern's text parses back to a pattern with
the same mask: the round-trip property tested in test_frontend.py), so the
ops may take any of them; each keeps its own caches.

Its own module so that ops.py (which looks attentions up) and attention.py
(which registers them and calls the ops) both import it and not each other.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import weakref

PREFIX = "patterncc-attention/1 "  # the format of a key; another one is refused, never guessed at
_LOCAL = "patterncc-attention/local "  # options that have no text: valid in this process only

live: dict[str, weakref.WeakSet] = {}  # key -> the live attentions made with it
_one: dict[str, weakref.ref] = {}  # key -> one of them, for a lookup per op call that iterates nothing
_made: dict = {}  # key -> an attention made from its text alone (``find``), kept for later calls
_locals = itertools.count()


def register(attn) -> str:
    """Record ``attn`` (weakly: a dropped attention leaves) and give its key."""
    key = key_of(attn.pattern, attn.backend, attn.plan_mode, attn.dense_sdpa, attn.options)
    _add(key, attn)
    return key


def _add(key: str, attn) -> None:
    live.setdefault(key, weakref.WeakSet()).add(attn)
    if key not in _one or _one[key]() is None:
        _one[key] = weakref.ref(attn)


def key_of(pattern, backend: str, plan: str, dense_sdpa: bool, options: dict) -> str:
    """The key of an attention with these settings (``Attention.__init__``'s)."""
    try:
        fields = dict(pattern=str(pattern), backend=backend, plan=plan, dense_sdpa=bool(dense_sdpa),
                      options={name: _option_text(value) for name, value in sorted(options.items())})
    except TypeError:
        return f"{_LOCAL}{next(_locals)}"
    return PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":"))


def find(key: str):
    """A live attention of ``key``, else one made from its text (and kept)."""
    one = _one.get(key)
    attn = None if one is None else one()
    if attn is not None:
        return attn
    for attn in live.get(key, ()):
        _one[key] = weakref.ref(attn)
        return attn
    attn = _made.get(key)
    if attn is None:
        attn = _made[key] = maker(*fields_of(key))
        _add(key, attn)
    return attn


# (pattern text, backend, plan, dense_sdpa, options) -> Attention: ``pipeline.attention_of_text``, which
# the package installs as it is imported (this module imports none of the modules it serves, only the
# kernel config's dataclass, so that they can all import it)
maker = None


def fields_of(key: str) -> tuple:
    """``(pattern text, backend, plan, dense_sdpa, options)`` of a key, or a
    ValueError saying why it names no attention."""
    if not isinstance(key, str) or not key.startswith(PREFIX):
        if isinstance(key, str) and key.startswith(_LOCAL):
            raise ValueError(f"key={key!r} names a compiled attention of another process whose options have no "
                             "text (only ints, floats, bools, strings and a KernelConfig do): compile it in this "
                             "process with the same options, or pass options that do")
        raise ValueError(f"key={key!r} names no compiled attention: a key is the text an Attention's "
                         f"`key` gives, starting {PREFIX.strip()!r}")
    try:
        fields = json.loads(key[len(PREFIX):])
        options = {name: _option_value(value) for name, value in fields["options"].items()}
        return fields["pattern"], fields["backend"], fields["plan"], fields["dense_sdpa"], options
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"key={key!r} does not describe a compiled attention ({type(err).__name__}: {err})") from err


def _option_text(value):
    """An option's value as JSON: plain numbers and strings as they are, a
    ``KernelConfig`` as its fields; TypeError for anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if dataclasses.is_dataclass(value) and type(value).__name__ == "KernelConfig":
        return {"KernelConfig": dataclasses.asdict(value)}
    raise TypeError(f"no text for an option of type {type(value).__name__}")


def _option_value(value):
    if isinstance(value, dict):
        from .backends.triton.config import KernelConfig

        return KernelConfig(**value["KernelConfig"])
    return value
