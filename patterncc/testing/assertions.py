"""Assertions: a layout against the brute-forced block classes, and an
attention (plain or packed) against the float64 reference, forward and
backward, within per-dtype tolerances (``TOLERANCES``, with the reasoning
behind each number)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import ir
from ..blocklayout import EMPTY, FULL, PARTIAL
from .oracles import _as_float64, _expected, block_classes


_CLASS_NAMES = {EMPTY: "EMPTY", PARTIAL: "PARTIAL", FULL: "FULL"}


def assert_layout_sound(pat: ir.Pattern | str, seq_len: int, block: int, heads: int = 1, exact: bool = True):
    """Check ``layout.build(pat, seq_len, block, heads)`` against the classes
    brute-forced from the element mask, and its CSR arrays for consistency.

    Sound: a pair with an allowed element is never EMPTY, a pair with a
    disallowed element is never FULL. ``exact``: every class equals the brute
    force one. The failure message shows the first bad block and its element
    mask. Returns the layout.
    """
    from .. import blocklayout as layout_module
    from ..pipeline import as_pattern

    pat = as_pattern(pat)
    lay = layout_module.build(pat, seq_len, block, heads)
    where = f"layout of `{pat}` at seq_len={seq_len}, block={block}, heads={heads}"
    problems = _csr_problems(lay, seq_len, block, heads, ir.depends_on_head(pat))
    if problems:
        raise AssertionError(f"{where}: malformed record:\n  " + "\n  ".join(problems))
    truth = block_classes(pat, seq_len, block, heads)
    got = np.broadcast_to(lay.to_dense(), truth.shape)
    unsound = ((truth != EMPTY) & (got == EMPTY)) | ((truth != FULL) & (got == FULL))
    bad = unsound | ((truth != got) if exact else False)
    if not bad.any():
        return lay
    first = tuple(int(i) for i in np.argwhere(unsound if unsound.any() else bad)[0])
    kind = "unsound" if unsound.any() else "sound but not exact"
    h, i, j = first
    lines = [
        f"{where} is {kind}: {int(unsound.sum())} unsound and {int((bad & ~unsound).sum())} inexact block pairs.",
        f"first: head {h}, query block {i} (q {i * block}..{min(seq_len, (i + 1) * block) - 1}), "
        f"key block {j} (k {j * block}..{min(seq_len, (j + 1) * block) - 1}): "
        f"layout says {_CLASS_NAMES[int(got[first])]}, the mask says {_CLASS_NAMES[int(truth[first])]}",
        _block_picture(pat, seq_len, block, heads, h, i, j),
    ]
    raise AssertionError("\n".join(lines))


def _csr_problems(lay, seq_len: int, block: int, heads: int, head_dependent: bool) -> list[str]:
    """What is wrong with a BlockLayout's arrays (empty list: nothing)."""
    out = []
    nb = -(-seq_len // block)
    H = heads if head_dependent else 1
    if (lay.seq_len, lay.block) != (seq_len, block):
        out.append(f"record says seq_len={lay.seq_len}, block={lay.block}")
    expect = {"kv_ptr": (H, nb + 1), "q_ptr": (H, nb + 1)}
    for name, shape in expect.items():
        arr = getattr(lay, name)
        if arr.shape != shape and arr.shape != (1, nb + 1):
            out.append(f"{name} has shape {arr.shape}, expected {shape}")
    if out:
        return out
    for side, ptr, idx, full in (("kv", lay.kv_ptr, lay.kv_idx, lay.kv_full), ("q", lay.q_ptr, lay.q_idx, lay.q_full)):
        flat = np.concatenate([ptr[:, :-1].ravel(), ptr[-1:, -1]])
        if flat[0] != 0 or np.any(np.diff(flat) < 0) or flat[-1] != idx.size or full.size != idx.size:
            out.append(f"{side}_ptr is not a running offset into {side}_idx ({idx.size} entries)")
            continue
        if np.any(ptr[1:, 0] != ptr[:-1, -1]):
            out.append(f"{side}_ptr: a head does not start where the previous one ends")
        if idx.size and (idx.min() < 0 or idx.max() >= nb):
            out.append(f"{side}_idx has block indices outside 0..{nb - 1}")
        for h in range(ptr.shape[0]):
            for r in range(nb):
                row = idx[ptr[h, r] : ptr[h, r + 1]]
                if np.any(np.diff(row) <= 0):
                    out.append(f"{side}_idx of head {h}, block {r} is not strictly ascending: {row.tolist()}")
                    break
    if out:
        return out
    by_q = lay.to_dense()
    by_k = np.zeros_like(by_q)
    for h in range(lay.q_ptr.shape[0]):
        for j in range(nb):
            lo, hi = lay.q_ptr[h, j], lay.q_ptr[h, j + 1]
            by_k[h, lay.q_idx[lo:hi], j] = np.where(lay.q_full[lo:hi], FULL, PARTIAL)
    if not np.array_equal(by_q, by_k):
        h, i, j = np.argwhere(by_q != by_k)[0]
        out.append(f"the by-key-block CSR disagrees with the by-query-block one at head {h}, "
                   f"pair ({i}, {j}): {_CLASS_NAMES[int(by_k[h, i, j])]} vs {_CLASS_NAMES[int(by_q[h, i, j])]}")
    return out


def _block_picture(pat, seq_len: int, block: int, heads: int, h: int, i: int, j: int) -> str:
    from .. import pipeline

    m = pipeline.mask(pat, seq_len=seq_len, heads=heads)[h]
    lines = [f"element mask of that block (# allowed, . not allowed, blank beyond seq_len={seq_len}):"]
    shown = min(block, 32)
    for qi in range(i * block, i * block + shown):
        row = "".join(
            " " if qi >= seq_len or kj >= seq_len else ("#" if m[qi, kj] else ".")
            for kj in range(j * block, j * block + shown)
        )
        lines.append(f"  q {qi:>5} {row}")
    if shown < block:
        lines.append(f"  (first {shown} of {block} rows and columns)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Tolerance:
    """Allowed error, componentwise: ``|x - ref| <= rtol * M + atol * max(M)``.

    ``M`` is the magnitude of the terms each value is computed from (its
    error bound's natural scale, from the kit's dense float64 computation):
    ``p @ |v|`` for ``o``, ``scale * sum_j p |q||k|`` plus ``|lse|`` for
    ``lse``, ``scale * |ds| @ |k|`` and ``scale * |ds|^T @ |q|`` for ``dq``,
    ``dk`` (with ``|ds| = p * (|dO| @ |V|^T + rowsum(|dO| |O|))``), and
    ``p^T @ |dO|`` for ``dv``; for the terms' tensors, ``sum |ds| |q - k|``
    (alibi slopes), the sum of ``|ds|`` over each bucket (relative bias),
    ``sum_q exp(t - lse) rowsum(|dO| |O|)`` (sinks), and the terms' own
    sizes join ``lse``'s. ``max(M)`` is over the whole tensor: a floor
    for underflow (fp16 subnormals, probabilities that round to 0).
    """

    rtol: float
    atol: float


# Unit roundoffs u: fp32 2**-24 = 6.0e-8; tf32 and fp16 2**-11 = 4.9e-4;
# bf16 2**-8 = 3.9e-3. A flash-attention kernel rounds each value a few times
# (P to the input dtype before P @ V, dS before dS @ K, the output itself),
# so with the componentwise M above its error is a small multiple of u. A
# simulated flash kernel (fp32 accumulation, P and dS rounded, online softmax)
# on 400 random cases (n <= 300, D <= 128, scale <= 2/sqrt(D), full, causal,
# random 30% and band masks) needed rtol <= 2u with atol = 1u for tf32, fp16
# and bf16, and rtol <= 50u for fp32 (sums of up to n terms). The table
# leaves a safety factor of 2 to 4 for real kernels (exp2, rescaling per
# block):
#   fp64  1e-9 / 1e-9    two float64 algorithms (reference vs the kit's dense)
#   fp32  1e-5 / 1e-6    ~170u / 17u: "ieee" dots, n-term accumulation
#   tf32  4e-3 / 1e-3    ~8u / 2u: fp32 inputs rounded to 10 mantissa bits
#                        inside tl.dot, so scores err in proportion to |s|
#   fp16  2e-3 / 1e-3    4u / 2u
#   bf16  1.6e-2 / 8e-3  4u / 2u
TOLERANCES = {
    "float64": Tolerance(1e-9, 1e-9),
    "float32": Tolerance(1e-5, 1e-6),
    "tf32": Tolerance(4e-3, 1e-3),
    "float16": Tolerance(2e-3, 1e-3),
    "bfloat16": Tolerance(1.6e-2, 8e-3),
}


def assert_matches_reference(
    attn,
    pat: ir.Pattern | str,
    q,
    k,
    v,
    scale: float | None = None,
    do=None,
    *,
    tol: Tolerance | None = None,
    precision: str | None = None,
    against: str = "reference",
    grads: bool = True,
    alibi_slopes=None,
    sinks=None,
    rel_bias=None,
):
    """Check ``attn(q, k, v, scale, return_lse=True)`` and its gradients
    ``dq, dk, dv`` (for ``do``, random when None) against the float64
    reference backend, run on the same input values.

    Score terms: the pattern's own (``A with softcap(c), alibi``: pass the
    pattern ``attn`` runs, ``attn.pattern`` for a compiled one) and the
    call's tensors ``alibi_slopes``, ``sinks``, ``rel_bias``, which are passed
    to ``attn`` and whose gradients (``d_alibi_slopes``, ``d_sinks``,
    ``d_rel_bias``) are checked too.

    Beyond the tolerance (``TOLERANCES[dtype]`` by default, see its comment
    for the numbers and why; ``precision="tf32"`` or ``"ieee"`` says how the
    kernel multiplies float32; by default ``attn.options["input_precision"]``
    or else "ieee", as patterncc's Triton kernels do): no NaN anywhere; ``lse`` is
    ``-inf`` exactly on the rows with no allowed key and finite elsewhere;
    ``o`` and ``dq`` are exactly 0 on those rows, and ``dk``, ``dv`` exactly 0
    for keys no query attends. ``against="dense"`` compares with the kit's own
    dense computation instead (how the reference itself is checked).

    Returns ``{name: (max abs error, max error / bound)}``; raises
    AssertionError naming the tensor, the max abs and relative errors and the
    worst index.
    """
    import torch

    from ..pipeline import as_pattern

    pat = as_pattern(pat)
    if tol is None:
        tol = TOLERANCES[_precision_name(attn, q, precision)]
    if do is None:
        gen = torch.Generator().manual_seed(0)
        do = torch.randn(tuple(q.shape), generator=gen).to(device=q.device, dtype=q.dtype)
    given = {name: t for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("rel_bias", rel_bias))
             if t is not None}
    got = _outputs(attn, q, k, v, scale, do, grads, given)
    expected, magnitude = _expected(pat, q, k, v, scale, do, against, grads, given)
    problems, errors = _disagreements(got, expected, magnitude, tol, given, grads)
    if problems:
        shape = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, {q.dtype}, scale={scale}"
        raise AssertionError(
            f"{_name(attn)} disagrees with the {against} for `{pat}` ({shape}; "
            f"tolerance rtol={tol.rtol:g}, atol={tol.atol:g}):\n  " + "\n  ".join(problems)
        )
    return errors


def _outputs(attn, q, k, v, scale, do, grads: bool, given: dict, **call) -> dict:
    """``attn``'s o and lse on fresh leaf copies of the inputs and the term
    tensors ``given``, and with ``grads`` their gradients under ``do``
    (``dq``, ``dk``, ``dv``, ``d_<term>``; None where none arrived)."""
    inputs = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    term_inputs = {name: t.detach().clone().requires_grad_(grads) for name, t in given.items()}
    o, lse = attn(*inputs, scale=scale, return_lse=True, **call, **term_inputs)
    got = {"o": o, "lse": lse}
    if grads:
        o.backward(do)
        got.update(dq=inputs[0].grad, dk=inputs[1].grad, dv=inputs[2].grad)
        got.update({f"d_{name}": t.grad for name, t in term_inputs.items()})
    return got


def _disagreements(got: dict, expected: dict, magnitude: dict, tol, given, grads: bool) -> tuple[list, dict]:
    """What a backend's outputs and gradients (``got``, any array type) get
    wrong against ``expected``: the problems, one line each (a gradient that
    never arrived, or ``_compare``'s message), and each compared name's error."""
    got = {name: _as_float64(x) for name, x in got.items() if x is not None}
    wanted = ["dq", "dk", "dv"] + [f"d_{name}" for name in given]
    problems = [f"{name} is None: no gradient reached {name[2:] if name.startswith('d_') else name[1:]}"
                for name in wanted if grads and name not in got]
    errors = {}
    for name, ref in expected.items():
        if name not in got:
            continue
        msg, err = _compare(name, got[name], ref, magnitude.get(name), tol)
        errors[name] = err
        if msg:
            problems.append(msg)
    return problems, errors


def assert_packed_matches_reference(
    attn,
    pat: ir.Pattern | str,
    q,
    k,
    v,
    cu_seqlens,
    scale: float | None = None,
    do=None,
    *,
    tol: Tolerance | None = None,
    precision: str | None = None,
    against: str = "reference",
    grads: bool = True,
    alibi_slopes=None,
    sinks=None,
    rel_bias=None,
):
    """Check the packed call ``attn(q, k, v, scale, return_lse=True,
    cu_seqlens=cu_seqlens)`` (q ``[1, H, total, D]``) and its gradients
    against each sequence computed alone in float64 (the reference, or with
    ``against="dense"`` the kit's dense computation), concatenated: ``o``,
    ``lse``, ``dq``, ``dk``, ``dv`` sequence by sequence, and the score
    terms' gradients summed over the sequences. Tolerances, the exact rules
    for rows with no key, and what it returns and raises: as
    ``assert_matches_reference``."""
    import torch

    from ..pipeline import as_pattern

    pat = as_pattern(pat)
    if do is None:
        gen = torch.Generator().manual_seed(0)
        do = torch.randn(tuple(q.shape), generator=gen).to(device=q.device, dtype=q.dtype)
    given = {name: t for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks), ("rel_bias", rel_bias))
             if t is not None}
    expected = _packed_expected(pat, q, k, v, cu_seqlens, scale, do, against, grads, given)
    return _check_packed_call(attn, pat, q, k, v, cu_seqlens, scale, do, tol, precision, against, grads, given,
                              expected)


def _packed_expected(pat, q, k, v, cu_seqlens, scale, do, against: str, grads: bool, given: dict):
    """``_expected`` of each non-empty sequence alone, joined: token-wise
    tensors concatenated, the terms' gradients (and their magnitudes) added up."""
    from ..backends.reference.checks import check_cu_seqlens

    offsets = check_cu_seqlens(cu_seqlens, q.shape[2])
    parts = [_expected(pat, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale, do[:, :, a:b], against, grads, given)
             for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()) if b > a]
    expected, magnitude = {}, {}
    for name in parts[0][0]:
        join = (lambda xs: sum(xs[1:], xs[0])) if name.startswith("d_") else (lambda xs: np.concatenate(xs, axis=2))
        expected[name] = join([e[name] for e, _ in parts])
        if all(name in m for _, m in parts):  # else (a sequence too long for them) the tensor's largest value
            magnitude[name] = join([m[name] for _, m in parts])
    return expected, magnitude, np.diff(offsets).tolist()


def _check_packed_call(attn, pat, q, k, v, cu_seqlens, scale, do, tol, precision, against, grads, given,
                       expected_and_magnitude):
    """The body of ``assert_packed_matches_reference`` once the expected values are known."""
    expected, magnitude, lengths = expected_and_magnitude
    if tol is None:
        tol = TOLERANCES[_precision_name(attn, q, precision)]
    got = _outputs(attn, q, k, v, scale, do, grads, given, cu_seqlens=cu_seqlens)
    problems, errors = _disagreements(got, expected, magnitude, tol, given, grads)
    if problems:
        shape = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}, lengths {lengths}, {q.dtype}, scale={scale}"
        raise AssertionError(
            f"{_name(attn)} on a packed batch disagrees with each sequence alone ({against}) for `{pat}` "
            f"({shape}; tolerance rtol={tol.rtol:g}, atol={tol.atol:g}):\n  " + "\n  ".join(problems)
        )
    return errors


def _name(attn) -> str:
    return getattr(attn, "backend", None) and f"backend {attn.backend!r}" or type(attn).__name__


def _precision_name(attn, q, precision: str | None) -> str:
    name = str(q.dtype).replace("torch.", "")
    if name != "float32":
        return name
    if precision is None:
        options = getattr(attn, "options", None) or {}
        precision = options.get("input_precision")
    if precision is None:
        precision = "ieee"  # patterncc's Triton kernels multiply float32 exactly
    return "tf32" if precision in ("tf32", "tf32x3") else "float32"


def _compare(name: str, got: np.ndarray, ref: np.ndarray, magnitude, tol: Tolerance):
    """``(problem or None, (max abs error, max error / bound))`` for one tensor."""
    if got.shape != ref.shape:
        return f"{name} has shape {got.shape}, expected {ref.shape}", (math.inf, math.inf)
    if np.isnan(got).any():
        idx = tuple(int(i) for i in np.argwhere(np.isnan(got))[0])
        return f"{name} has {int(np.isnan(got).sum())} NaN values, the first at {idx}", (math.nan, math.inf)
    ref_inf = np.isinf(ref)
    if not np.array_equal(np.isinf(got), ref_inf) or not np.array_equal(got[ref_inf], ref[ref_inf]):
        idx = tuple(int(i) for i in np.argwhere((np.isinf(got) != ref_inf) | (ref_inf & (got != ref)))[0])
        return (f"{name}[{idx}] = {got[idx]!r} but the reference has {ref[idx]!r} "
                f"(-inf exactly on the rows with no allowed key, finite elsewhere)"), (math.inf, math.inf)
    got, ref = np.where(ref_inf, 0.0, got), np.where(ref_inf, 0.0, ref)
    if magnitude is None:
        magnitude = np.full(ref.shape, np.abs(ref).max(initial=0.0))
    # Where no allowed pair contributes (M = 0) the value must be exactly 0.
    bound = np.where(magnitude > 0, tol.rtol * magnitude + tol.atol * magnitude.max(initial=0.0), 0.0)
    error = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / bound)  # inf where the bound is 0: exact zero expected
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), ratio.shape)) if ratio.size else ()
    max_abs = float(error.max(initial=0.0))
    max_ratio = float(ratio.max(initial=0.0))
    if max_ratio <= 1.0:
        return None, (max_abs, max_ratio)
    nonzero = ref != 0
    max_rel = float((error[nonzero] / np.abs(ref[nonzero])).max(initial=0.0))
    count = int((ratio > 1).sum())
    if bound[worst] == 0:
        why = "expected exactly 0 (no allowed pair contributes there)"
    else:
        why = f"{max_ratio:.3g}x the bound {bound[worst]:.3g}"
    return (f"{name}: {count} of {ratio.size} values off; max abs error {max_abs:.3g}, "
            f"max rel error {max_rel:.3g}; worst at {name}{list(worst)}: "
            f"got {got[worst]:.9g}, expected {ref[worst]:.9g} ({why})"), (max_abs, max_ratio)
