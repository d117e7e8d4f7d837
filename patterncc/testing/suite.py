"""The property suite for one pattern: ``check_pattern`` runs the layout,
kernel and packed checks under hypothesis on every backend that can run
here, and reports each check's result with a shrunk counterexample and the
command that reproduces it (``reproduce``)."""

from __future__ import annotations

import importlib.util
import json
import os
import random as _random
import shlex
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from hypothesis import HealthCheck, Verbosity, given, settings, strategies as st
from hypothesis import seed as _hypothesis_seed

from .. import ir
from ..errors import PatternError
from .assertions import (
    _check_packed_call,
    _packed_expected,
    assert_layout_sound,
    assert_matches_reference,
    assert_packed_matches_reference,
)
from .strategies import (
    AttentionCase,
    _heads_required,
    attention_inputs,
    make_cu_seqlens,
    make_tensors,
    make_terms,
    packed_inputs,
)


def available_backends() -> dict[str, str | None]:
    """``{backend: None if it can run here, else why not}``."""
    return {"reference": None, "triton": _triton_unavailable()}


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("patterncc.backends.triton.runtime") is None:
        return "backends/triton/runtime.py does not exist yet"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch

    if torch.cuda.is_available() or _interpreted():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU)"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class Counterexample:
    """The minimal failing input hypothesis found, and how to rerun it."""

    check: str  # "layout", "kernel" or "packed"
    backend: str | None
    pattern: str  # source text of the pattern
    seq_len: int
    block: int | None
    heads: int
    case: AttentionCase | None
    error: str
    command: str

    def describe(self) -> str:
        what = f"seq_len={self.seq_len}, block={self.block}, heads={self.heads}"
        if self.case is not None:
            what = self.case.describe()
        return (f"minimal counterexample ({self.check}{', ' + self.backend if self.backend else ''}): "
                f"`{self.pattern}` with {what}\n{self.error}\nreproduce with:\n  {self.command}")


@dataclass
class CheckResult:
    check: str  # "layout", "kernel" or "packed"
    backend: str | None
    status: str  # "passed", "failed" or "skipped"
    examples: int = 0
    seconds: float = 0.0
    counterexample: Counterexample | None = None
    reason: str = ""


@dataclass
class Report:
    """What ``check_pattern`` found: one ``CheckResult`` per check and backend."""

    pattern: str
    seed: int
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed and something was checked: a run of only skips is not a pass."""
        return bool(self.checked) and all(r.status != "failed" for r in self.results)

    @property
    def checked(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "passed" and r.examples > 0]

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    def __str__(self) -> str:
        lines = [f"pattern `{self.pattern}` (hypothesis seed {self.seed}): {'ok' if self.ok else 'FAILED'}"
                 + ("" if self.checked else ", nothing was checked")]
        for r in self.results:
            label = r.check + (f" [{r.backend}]" if r.backend else "")
            extra = f" ({r.reason})" if r.reason else ""
            lines.append(f"  {label:<20} {r.status:<7} {r.examples:>4} examples {r.seconds:6.1f} s{extra}")
        for r in self.failures:
            if r.counterexample is not None:
                lines.append(_indent(r.counterexample.describe(), "  "))
        return "\n".join(lines)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# Shapes per backend: the Triton interpreter runs every program on the CPU in
# numpy, so it gets short sequences and one head dim; CUDA gets the real range.
def _kernel_shapes(backend: str, pat: ir.Pattern) -> dict:
    if backend == "reference":
        # Long enough to see every part of the pattern (a few times its
        # largest constant), short enough for dense float64 checks.
        longest = min(320, max(96, 2 * _largest_constant(pat) + 8))
        return dict(dtypes=("float64",), max_seq_len=longest, head_dims=(8, 16), max_batch=2, max_heads=4)
    if _interpreted():
        return dict(dtypes=("float32", "float16", "bfloat16"), max_seq_len=40, head_dims=(16,), max_batch=1, max_heads=2,
                    blocks=(16, 32))
    return dict(dtypes=("float16", "bfloat16", "float32"), max_seq_len=300, head_dims=(16, 32, 64, 128),
                max_batch=2, max_heads=4, blocks=(16, 32, 64, 128))


def _packed_shapes(backend: str) -> dict:
    """Packed batches per backend: the full range (lengths to 300, up to
    20 sequences) where it runs fast enough, fewer and shorter ones in the
    Triton interpreter."""
    if backend == "reference":
        return dict(dtypes=("float64",), max_len=300, max_count=20, max_total=640, blocks=(8, 16, 64),
                    head_dims=(8, 16), max_heads=4)
    if _interpreted():
        return dict(dtypes=("float32", "float16", "bfloat16"), max_len=40, max_count=5, max_total=96,
                    blocks=(16, 32), head_dims=(16,), max_heads=2)
    return dict(dtypes=("float16", "bfloat16", "float32"), max_len=300, max_count=20, blocks=(16, 32, 64, 128),
                head_dims=(16, 32, 64, 128), max_heads=4)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the user's working directory
        derandomize=False,
        report_multiple_bugs=False,  # one minimal counterexample, not a group
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def check_pattern(
    pat: ir.Pattern | str,
    *,
    backends: Iterable[str] | None = None,
    examples: int = 30,
    seed: int | None = None,
    exact: bool = True,
    source: tuple[str, str | None] | None = None,
    progress: Callable[[str, str | None, int, int], None] | None = None,
    terms: bool = False,
    packed: bool = True,
) -> Report:
    """Run the property suite for one pattern; return a ``Report``.

    - layout: ``assert_layout_sound`` (``exact`` by default) over random
      lengths, block sizes and head counts;
    - kernel, per backend (default: every one available here, see
      ``available_backends``): ``assert_matches_reference`` over
      ``attention_inputs``. The reference backend is compared with the kit's
      own dense float64 computation, on its dense and its sparse path.
      The pattern's score terms (``with softcap(c), alibi``) always apply;
      ``terms=True`` also draws the call's (ALiBi slopes, sinks, relative
      bias) and checks their gradients;
    - packed, per backend (``packed=False`` leaves it out):
      ``assert_packed_matches_reference`` over ``packed_inputs``, a packed
      batch (``cu_seqlens``) against each of its sequences alone.

    ``examples`` hypothesis examples per check; ``seed`` makes the search
    repeatable (a random one is drawn and recorded when None). ``source`` =
    ``(file, entry)`` makes reproduce commands load the pattern from its file.
    ``progress(check, backend, done, total)`` is called after every example.
    """
    from ..pipeline import as_pattern

    pat = as_pattern(pat)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an integer >= 1, got {examples=!r}")
    status = available_backends()
    wanted = checked_backends(backends, status)
    seed = _random.randrange(2**32) if seed is None else seed
    report = Report(pattern=str(pat), seed=seed)

    report.results.append(_run_check("layout", None, pat, examples, seed, exact, source, progress, terms))
    for backend in wanted:
        if status[backend] is not None:
            # Asked for by name (or the only one there is) and unable to run: a
            # check that did not happen is a failure, never a quiet skip.
            named = backends is not None
            report.results.append(CheckResult("kernel", backend, "failed" if named else "skipped",
                                              reason=status[backend]))
        else:
            report.results.append(_run_check("kernel", backend, pat, examples, seed, exact, source, progress, terms))
            if packed:
                report.results.append(_run_check("packed", backend, pat, examples, seed, exact, source, progress,
                                                 terms))
    return report


def checked_backends(backends, status: dict | None = None) -> list[str]:
    """The backends a run checks: every known one for None, else the names
    given (one name or several; none checks the layout alone). An unknown
    name is an error, not a skip."""
    status = available_backends() if status is None else status
    if backends is None:
        return list(status)
    names = [backends] if isinstance(backends, str) else list(backends)
    for name in names:
        if not isinstance(name, str) or name not in status:
            raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(map(repr, status))}")
    return list(dict.fromkeys(names))


def _run_check(check, backend, pat, examples, seed, exact, source, progress, terms=False) -> CheckResult:
    from .. import pipeline

    state = {"done": 0, "last": None, "failed": None}
    attns: dict = {}
    if check == "layout":
        strategy = _layout_inputs(pat)
    elif check == "packed":
        strategy = packed_inputs(pat, gqa=True, terms=terms, **_packed_shapes(backend))
    else:
        strategy = attention_inputs(pat, gqa=True, terms=terms, **_kernel_shapes(backend, pat))

    def body(example):
        state["last"] = example
        try:
            if check == "layout":
                seq_len, block, heads = example
                assert_layout_sound(pat, seq_len, block, heads, exact=exact)
            elif check == "packed":
                _check_packed(backend, pat, example, attns)
            else:
                _check_kernel(backend, pat, example, attns)
        except BaseException as err:  # noqa: BLE001 - recorded, then re-raised for hypothesis
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            state["failed"] = (example, err)
            raise
        finally:
            state["done"] += 1
            if progress is not None:
                progress(check, backend, min(state["done"], examples), examples)

    test = _hypothesis_seed(seed)(_settings(examples)(given(strategy)(body)))
    start = time.perf_counter()
    try:
        test()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001
        example, error = state["failed"] or (state["last"], err)
        result = CheckResult(check, backend, "failed", state["done"], time.perf_counter() - start)
        result.counterexample = _counterexample(check, backend, pat, example, error, source)
        return result
    return CheckResult(check, backend, "passed", min(state["done"], examples), time.perf_counter() - start)


def _layout_inputs(pat: ir.Pattern) -> st.SearchStrategy:
    """``(seq_len, block, heads)``: lengths up to a few times the pattern's
    largest constant (at least 64), blocks of 1 to 64 (powers of two and not)."""
    fixed = _heads_required(pat)
    if fixed is not None:
        heads = st.just(fixed)
    elif ir.depends_on_head(pat):
        heads = st.integers(1, 6)
    else:
        heads = st.integers(1, 2)
    top = min(512, max(64, 3 * _largest_constant(pat) + 8))
    blocks = st.sampled_from([8, 16, 4, 32, 1, 3, 64, 5])
    return st.tuples(st.integers(1, top), blocks, heads)


def _largest_constant(pat: ir.Pattern) -> int:
    """The largest integer in ``pat``'s arguments and conditions (at n = 64)."""
    largest = 0
    for node in ir.walk(pat):
        if type(node) in ir.PRIMITIVE_NAMES and not isinstance(node, ir.Random):
            for a in ir.args_of(node):
                try:
                    largest = max(largest, abs(ir.eval_int(a, {"n": 64})))
                except PatternError:
                    pass
        elif isinstance(node, ir.Random):
            b = node.b if isinstance(node.b, int) else 16
            largest = max(largest, 2 * b)
        elif isinstance(node, ir.Where):
            stack = [node.cond]
            while stack:
                e = stack.pop()
                if isinstance(e, ir.Const):
                    largest = max(largest, abs(e.value))
                stack.extend(ir.expr_children(e))
    return largest


def _check_kernel(backend: str, pat: ir.Pattern, case: AttentionCase, attns: dict) -> None:
    import torch

    from .. import pipeline

    if backend == "reference":
        from ..backends.reference import ReferenceAttention

        # Both reference paths, against the kit's independent dense computation.
        for dense_limit in (4096, 0):
            if dense_limit not in attns:
                attns[dense_limit] = ReferenceAttention(pat, dense_limit=dense_limit)
            q, k, v, do = make_tensors(case)
            assert_matches_reference(attns[dense_limit], pat, q, k, v, case.scale, do, against="dense",
                                     **make_terms(case))
        return
    # The Triton backend builds its layout with the case's block (a power of two >= 16).
    options = {"block": case.block} if backend == "triton" else {}
    key = (backend, case.block if options else None)
    if key not in attns:
        attns[key] = pipeline.compile(pat, backend=backend, **options)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k, v, do = make_tensors(case, device=device)
    assert_matches_reference(attns[key], pat, q, k, v, case.scale, do, **make_terms(case, device=device))


def _check_packed(backend: str, pat: ir.Pattern, case: AttentionCase, attns: dict) -> None:
    import torch

    from .. import pipeline

    if backend == "reference":
        from ..backends.reference import ReferenceAttention

        # The reference's packed call on both its paths, against the kit's dense computation per sequence.
        q, k, v, do = make_tensors(case)
        cu, terms = make_cu_seqlens(case), make_terms(case)
        expected = _packed_expected(pat, q, k, v, cu, case.scale, do, "dense", True, terms)
        for dense_limit in (4096, 0):
            if dense_limit not in attns:
                attns[dense_limit] = ReferenceAttention(pat, dense_limit=dense_limit)
            _check_packed_call(attns[dense_limit], pat, q, k, v, cu, case.scale, do, None, None, "dense", True,
                               terms, expected)
        return
    key = (backend, case.block)
    if key not in attns:
        attns[key] = pipeline.compile(pat, backend=backend, block=case.block)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = make_tensors(case, device=device)
    assert_packed_matches_reference(attns[key], pat, q, k, v, make_cu_seqlens(case, device), case.scale, do,
                                    **make_terms(case, device=device))


def _counterexample(check, backend, pat, example, error, source) -> Counterexample:
    message = f"{type(error).__name__}: {error}"
    if not isinstance(error, AssertionError):  # a crash: say where
        frames = traceback.format_exception(type(error), error, error.__traceback__)
        message += "\n" + "".join(frames[-4:-1]).rstrip()
    if check == "layout":
        seq_len, block, heads = example
        kwargs = dict(check="layout", seq_len=seq_len, block=block, heads=heads)
        case = None
    else:
        case = example
        seq_len, block, heads = case.n, case.block, case.H
        kwargs = dict(backend=backend, **asdict(case))
        if check == "packed":
            kwargs = dict(check=check, **kwargs)
        else:
            del kwargs["lengths"]  # None: a plain call
    return Counterexample(check, backend, str(pat), seq_len, block, heads, case, message,
                          _command(pat, source, backend, kwargs))


def _command(pat, source, backend, kwargs: dict) -> str:
    if source is not None:
        path, entry = source
        target = _py(str(path)) + (f", entry={_py(entry)}" if entry else "")
    elif _round_trips(pat):
        target = _py(str(pat))
    else:  # the parser would simplify it into another pattern: spell out the IR
        target = repr(pat)
    imports = "" if source is not None or _round_trips(pat) else "from patterncc.ir import *; "
    args = ", ".join(f"{k}={_py(v)}" for k, v in kwargs.items())
    code = f"{imports}from patterncc.testing import reproduce; reproduce({target}, {args})"
    env = "TRITON_INTERPRET=1 " if backend == "triton" and _interpreted() else ""
    return f"{env}python -c {shlex.quote(code)}"


def _round_trips(pat: ir.Pattern) -> bool:
    """True when ``parse(str(pat))`` gives ``pat`` back (not simplified away)."""
    from .. import pipeline

    try:
        return pipeline.parse(str(pat)) == pat
    except Exception:  # noqa: BLE001 - no parser yet, or a printing bug: use the IR
        return False


def _py(value) -> str:
    """Python source for a value; strings in double quotes, so the shell
    command can wrap the code in single quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def reproduce(pattern, *, entry: str | None = None, check: str = "kernel", backend: str = "reference",
              seq_len: int | None = None, block: int | None = None, heads: int = 1, **case) -> None:
    """Rerun one counterexample of ``check_pattern`` (the commands it prints
    call this). ``pattern``: source text, a pattern, or a ``.pat`` file."""
    from .. import pipeline

    pat = pipeline.as_pattern(pattern, entry=entry)
    if check == "layout":
        assert_layout_sound(pat, seq_len, block, heads)
    elif check == "packed":
        _check_packed(backend, pat, AttentionCase(**case), {})
    else:
        _check_kernel(backend, pat, AttentionCase(**case), {})
    print(f"passed: {check} of `{pat}`")
