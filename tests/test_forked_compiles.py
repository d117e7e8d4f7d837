"""Compiling in forked processes (backends/triton/forked.py), with stand-in
jobs: each runs once in a child of its own, all forked before any runs
here, then once here to resolve its future; a child that fails leaves the
job to run here alone. On the card ``PATTERNCC_COMPILE_PROCESSES=1`` runs
Triton's compile jobs this way."""

from __future__ import annotations

import inspect
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import triton

from patterncc.backends.triton import forked

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _job(tmp_path, name, fail_in_child=False):
    parent = os.getpid()

    def job():
        here = os.getpid()
        with open(tmp_path / name, "a") as f:
            f.write(f"{'parent' if here == parent else 'child'}\n")
        if fail_in_child and here != parent:
            raise RuntimeError("the child's compile failed")
        return f"{name} compiled"

    return job


def test_each_job_runs_in_a_child_then_here(tmp_path):
    executor = forked.ForkedCompiles()
    futures = [executor.submit(_job(tmp_path, f"job{i}")) for i in range(3)]
    assert not any(f.done() for f in futures)  # recorded, not started
    with ThreadPoolExecutor(2) as pool:
        codes = executor.run(pool)
    assert codes == [0, 0, 0]
    assert [f.result(timeout=10) for f in futures] == ["job0 compiled", "job1 compiled", "job2 compiled"]
    for i in range(3):
        assert (tmp_path / f"job{i}").read_text().splitlines() == ["child", "parent"]


def test_a_failed_child_leaves_the_job_to_run_here(tmp_path):
    executor = forked.ForkedCompiles()
    future = executor.submit(_job(tmp_path, "job", fail_in_child=True))
    with ThreadPoolExecutor(1) as pool:
        assert executor.run(pool) == [1]
    assert future.result(timeout=10) == "job compiled"


def test_a_job_that_fails_here_too_reports_its_error(tmp_path):
    executor = forked.ForkedCompiles()

    def job():
        raise ValueError("does not compile")

    future = executor.submit(job)
    with ThreadPoolExecutor(1) as pool:
        assert executor.run(pool) == [1]
    with pytest.raises(ValueError, match="does not compile"):
        future.result(timeout=10)


@pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"), reason="Triton without AsyncCompileMode")
def test_triton_finalizes_what_the_children_compiled(tmp_path):
    """The way compile_ahead uses it: jobs submitted through Triton's
    AsyncCompileMode, run before the mode is left, then finalized by it."""
    executor = forked.ForkedCompiles()
    finalized = []
    with ThreadPoolExecutor(2) as pool, triton.AsyncCompileMode(executor) as mode:
        # (key, compile, finalize) in Triton 3.6; 3.7+ adds a cleanup
        extra = [lambda: None] * (len(inspect.signature(mode.submit).parameters) - 3)
        for i in range(2):
            mode.submit(f"key{i}", _job(tmp_path, f"k{i}"), finalized.append, *extra)
        executor.run(pool)
    assert sorted(finalized) == ["k0 compiled", "k1 compiled"]


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv("PATTERNCC_COMPILE_PROCESSES", raising=False)
    assert not forked.enabled()
    monkeypatch.setenv("PATTERNCC_COMPILE_PROCESSES", "1")
    assert forked.enabled()
