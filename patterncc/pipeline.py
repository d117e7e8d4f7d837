"""The driver: every stage of patterncc, in order, one line each.

    .pat text --parse--> AST --resolve--> IR --simplify--> IR
    IR --layout(n, block, heads)--> BlockLayout
    IR --plan(n, block, heads)-->  Plan
    IR --compile(backend)--> Attention (kernels generated and cached per backend)

Each stage is a pure function in its own module. With ``PATTERNCC_DEBUG=1``
the IR is validated between stages (``validate``) instead of checks being
scattered through the passes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from . import ir
from .errors import PatternError, PatternValueError


def parse(text: str, filename: str = "<pattern>", *, entry: str | None = None, **overrides: int) -> ir.Pattern:
    """An expression or a whole .pat source -> simplified IR.

    A source that ends with an expression means that expression; otherwise it
    means its last ``pattern`` definition (or ``entry``), called with its
    defaults, which keyword arguments override.
    """
    from .parser import parse_source
    from .resolve import resolve
    from .simplify import simplify

    if not isinstance(text, str):
        raise TypeError(f"parse() takes pattern source text, got {type(text).__name__}")
    module = parse_source(text, filename)           # text -> AST, with line/column on every node
    pattern = _checked(resolve(module, overrides, entry=entry))  # AST -> IR: names, arity, values
    return _checked(simplify(pattern))              # IR -> IR: algebraic clean-up


def load(path: str | os.PathLike, *, entry: str | None = None, **overrides: int) -> ir.Pattern:
    """A ``.pat`` file -> IR; keyword arguments override parameter defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PatternError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse(text, str(path), entry=entry, **overrides)


def as_pattern(pat: ir.Pattern | str | os.PathLike, *, filename: str = "<pattern>", entry: str | None = None,
               **overrides: int) -> ir.Pattern:
    """The one rule for a pattern argument, used by every entry point that takes one
    (``compile``, ``layout``, ``plan``, ``mask``, ``patterncc.nn``, the testing kit, the CLI):

    - a pattern object is itself;
    - an ``os.PathLike`` (``pathlib.Path``) is the ``.pat`` file it names (``load``);
    - a ``str`` is pattern source text, except a one-line string ending in
      ``.pat``, which names a file (no source text can end so: names have no dot).

    ``entry`` and keyword arguments (parameter overrides) apply to source text
    and files, as in ``parse`` and ``load``.
    """
    if isinstance(pat, ir.Pattern):
        if entry is not None or overrides:
            raise TypeError("entry and parameter overrides apply to source text or a .pat file, not a pattern object")
        return pat
    if isinstance(pat, os.PathLike) or (isinstance(pat, str) and _names_file(pat)):
        return load(os.fspath(pat).strip(), entry=entry, **overrides)
    if isinstance(pat, str):
        return parse(pat, filename, entry=entry, **overrides)
    raise TypeError(f"expected a pattern, pattern source text or a .pat path, got {type(pat).__name__}")


def _names_file(text: str) -> bool:
    text = text.strip()
    return text.endswith(".pat") and "\n" not in text


def mask(pat: ir.Pattern | str, seq_len: int, heads: int = 1):
    """numpy bool ``[heads, n, n]``: True where query q may attend to key k (small n only)."""
    from .masks import dense_mask

    return dense_mask(as_pattern(pat), _positive("seq_len", seq_len), _positive("heads", heads))


def sparse_mask(pat: ir.Pattern | str, seq_len: int, heads: int = 1):
    """One scipy.sparse bool CSR ``[n, n]`` per layout head, for long sequences."""
    from .blocklayout.elements import sparse_mask as build_sparse

    return build_sparse(as_pattern(pat), _positive("seq_len", seq_len), _positive("heads", heads))


def layout(pat: ir.Pattern | str, seq_len: int, block: int | None = None, heads: int = 1):
    """The BlockLayout of a pattern at one length, in natural token order.
    ``block=None``: the block a compiled attention uses (``planner.DEFAULT_BLOCK``)."""
    from .blocklayout.builder import build
    from .planner import DEFAULT_BLOCK

    block = DEFAULT_BLOCK if block is None else block
    return build(as_pattern(pat), _positive("seq_len", seq_len), _positive("block", block), _positive("heads", heads))


def plan(pat: ir.Pattern | str, seq_len: int, block: int | None = None, heads: int = 1):
    """The execution plan: components, their token orders and layouts, and why.
    ``block=None``: the block a compiled attention uses, so the plan is the
    one ``compile``'s attention runs at this length (``Attention.plan``)."""
    from .planner import DEFAULT_BLOCK, build_plan

    block = DEFAULT_BLOCK if block is None else block
    return build_plan(as_pattern(pat), _positive("seq_len", seq_len), _positive("block", block), _positive("heads", heads))


def compile(pat: ir.Pattern | str, backend: str = "auto", **options):
    """A callable ``attn(q, k, v, scale=None, return_lse=False, *,
    alibi_slopes=None, sinks=None, rel_bias=None)`` for the pattern.

    ``backend``: ``"reference"`` (numpy/scipy, float64), ``"triton"`` (the
    generated GPU kernels) or ``"auto"`` (Triton for CUDA tensors, the
    reference otherwise, chosen per call). ``softcap=c`` adds (or replaces)
    the pattern's ``softcap(c)``.
    """
    torch = sys.modules.get("torch")  # loaded already if this runs inside torch.compile
    if torch is not None and torch.compiler.is_compiling():
        return _TRACED[_traced_key(pat, backend, **options)]
    from .attention import Attention

    return Attention(_checked(as_pattern(pat)), backend=backend, **options)


def wait_for_kernels() -> None:
    """Block until the own kernels of every pattern compiling in a thread
    are ready. A pattern new to the machine runs its first calls on shared
    stand-in kernels while its own compile (``backends/triton/standin.py``),
    and switches when they are ready: time a pattern after this call, or
    the first timings are the stand-in's."""
    standin = sys.modules.get("patterncc.backends.triton.standin")
    if standin is not None:  # (not loaded: no Triton call has run, so nothing compiles)
        standin.wait_all()


def attention_of_text(text: str, backend: str, plan: str, dense_sdpa: bool, options: dict):
    """The attention a key describes (``registry.fields_of``): in a process
    that runs a graph made in another, such as a loaded exported program."""
    from .attention import Attention

    return Attention(_checked(as_pattern(text)), backend=backend, plan=plan, dense_sdpa=dense_sdpa, **options)


def _traced_key(pat, backend: str = "auto", **options) -> str:
    """``compile`` inside torch.compile: the key of an attention for these
    arguments, made on the first call and kept for the process. Dynamo calls
    this function instead of tracing it (marked below: the parser and the
    layout code are plain Python it must not trace) and takes the key as a
    constant; ``compile`` then looks the attention up in ``_TRACED``, a
    lookup Dynamo traces and guards like any module global. The graph
    names the attention by that key (ops.py), so it must outlive the trace,
    and a retrace (a new shape) finds it with its layouts and kernels built."""
    from .attention import Attention

    # The values' types too: block=True must not find the attention of block=1.
    memo_key = (type(pat), pat, backend, tuple(sorted((name, type(value), value) for name, value in options.items())))
    try:
        key = _TRACED_KEYS.get(memo_key)
    except TypeError:  # an unhashable argument: a new attention (or its own clear error) at each trace
        memo_key = key = None
    if key is None:
        attn = Attention(_checked(as_pattern(pat)), backend=backend, **options)
        key = attn.key
        _TRACED[key] = attn
        if memo_key is not None:
            _TRACED_KEYS[memo_key] = key
    return key


_TRACED: dict = {}  # key -> Attention, every one made inside torch.compile
_TRACED_KEYS: dict = {}  # (pattern, backend, options) -> key
_traced_key._dynamo_marked_constant = True  # torch.compiler.assume_constant_result, without importing torch


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatternValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)  # numpy integers (np.int64(256)) are integers too
    if value < 1:
        raise PatternValueError(f"{name} must be >= 1, got {name}={value}")
    return value


def _checked(p: ir.Pattern) -> ir.Pattern:
    if os.environ.get("PATTERNCC_DEBUG"):
        validate(p)
    return p


def validate(p: ir.Pattern) -> None:
    """Internal invariants of the IR (a bug in a pass, never a user error)."""
    for node in ir.walk(p):
        assert isinstance(node, ir.Pattern), f"not a pattern node: {node!r}"
        hash(node)
        if isinstance(node, (ir.Union, ir.Intersect)):
            assert len(node.parts) >= 2, f"{type(node).__name__} with {len(node.parts)} parts"
            assert not any(isinstance(c, type(node)) for c in node.parts), "unflattened chain"
        if isinstance(node, ir.Cycle):
            assert node.parts, "empty cycle"
        if isinstance(node, ir.Scored):
            assert node is p and node.terms, "score terms below the top of the pattern, or none"
        if type(node) in ir.PRIMITIVE_NAMES:
            for a in ir.args_of(node):
                assert isinstance(a, (int, ir.Expr)) and not isinstance(a, bool), f"bad argument {a!r}"
                if isinstance(a, ir.Expr):
                    assert ir.expr_vars(a) <= {"n"}, f"argument depends on {ir.expr_vars(a)}"
