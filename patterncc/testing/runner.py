"""Files: ``patterncc test FILE...`` property-tests every pattern of each
file with ``check_pattern``, with a progress line on stderr and a summary
table on stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from .. import ir
from ..errors import PatternError
from .suite import _indent, check_pattern, checked_backends


def file_entries(path: str) -> list[tuple[str | None, ir.Pattern]]:
    """``[(entry name or None, pattern)]``: every definition of the file whose
    parameters all have defaults, and its final expression if it has one;
    just the file's main pattern if the parser cannot list definitions."""
    from .. import pipeline

    try:
        from ..parser import parse_source
    except ImportError:
        return [(None, pipeline.load(path))]
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PatternError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    module = parse_source(text, str(path))
    out: list[tuple[str | None, ir.Pattern]] = []
    for d in module.definitions:
        if all(p.default is not None for p in d.params):
            out.append((d.name, pipeline.load(path, entry=d.name)))
    if module.expr is not None or not out:
        out.append((None, pipeline.load(path)))
    return out


class _Progress:
    """``pattern i/N  backend  examples done`` on one line of stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        if self.tty:
            print("\r" + text[:100].ljust(100), end="", file=self.stream, flush=True)
        elif force:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=self.stream, flush=True)


def run_files(files: Sequence[str], examples: int = 30, backends: Sequence[str] | None = None,
              seed: int | None = None) -> int:
    """Property-test every pattern in each file; print progress on stderr and
    a summary table on stdout. Returns 0 if everything passed, 1 otherwise
    (with each minimal counterexample and the command that reproduces it)."""
    try:
        checked_backends(backends)
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"examples must be an integer >= 1, got {examples=!r}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if backends and "triton" in backends and "triton" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # asked for triton on a CPU machine
    jobs, failed = [], 0
    for path in files:
        try:
            jobs += [(path, entry, pat) for entry, pat in file_entries(path)]
        except PatternError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
        except OSError as err:
            print(f"error: {path}: cannot read: {err.strerror}", file=sys.stderr)
            failed += 1

    bar = _Progress()
    reports = []
    for number, (path, entry, pat) in enumerate(jobs, 1):
        name = f"{path}" + (f":{entry}" if entry else "")

        def progress(check, backend, done, total, number=number, name=name):
            bar.show(f"pattern {number}/{len(jobs)} {name}  {check}{' [' + backend + ']' if backend else ''}  "
                     f"{done}/{total} examples")

        bar.show(f"pattern {number}/{len(jobs)} {name}", force=True)
        try:
            report = check_pattern(pat, backends=backends, examples=examples, seed=seed,
                                   source=(path, entry), progress=progress)
        except PatternError as err:
            bar.done()
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        reports.append((name, report))
    bar.done()

    print(_summary(reports))
    for name, report in reports:
        for r in report.failures:
            print(f"\nFAILED {name}: {r.check}" + (f" [{r.backend}]" if r.backend else ""))
            if r.counterexample is not None:
                print(_indent(r.counterexample.describe(), "  "))
    failed += sum(1 for _, report in reports if not report.ok)
    return 1 if failed else 0


def _summary(reports) -> str:
    """One row per pattern and check; skip reasons are numbered below the table."""
    rows = [("pattern", "check", "backend", "result", "examples", "seconds")]
    reasons: list[str] = []
    for name, report in reports:
        for r in report.results:
            result = r.status
            if r.reason:
                if r.reason not in reasons:
                    reasons.append(r.reason)
                result += f" ({reasons.index(r.reason) + 1})"
            rows.append((name, r.check, r.backend or "-", result, str(r.examples), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"({i}) {reason}" for i, reason in enumerate(reasons, 1)]
    passed = sum(1 for _, report in reports if report.ok)
    ran = [r for _, report in reports for r in report.checked]
    what = sorted({r.check + (f" [{r.backend}]" if r.backend else "") for r in ran})
    lines.append(f"{passed} of {len(reports)} patterns passed; checked: "
                 + (", ".join(what) + f" ({sum(r.examples for r in ran)} examples in all)" if ran else "nothing"))
    return "\n".join(lines)
