"""Compiling a first call's kernels in forked processes (opt-in:
``PATTERNCC_COMPILE_PROCESSES=1``).

``compile_ahead`` hands Triton an executor for its ``AsyncCompileMode``.
A thread pool is the default, and it scales poorly: on the H200's host a
first call's kernels took 11.4 s one after the other and 5.1 s on the
8-thread pool, much of Triton's compile holding Python's GIL.
``ForkedCompiles`` records the jobs instead. Once the warm-up pass has
submitted them all, it forks one child per job, before anything
compiles in this process, so no compiler lock can be held at the fork.
Each child runs its job (the closure Triton submitted: the compile, which
writes its result into Triton's disk cache) and exits. The jobs then run
again here on the thread pool, where each finds its kernel in the disk
cache. A job whose child failed compiles here as it would have without
this. A child should need no CUDA, since the job compiles for a target
Triton resolved before submitting it; where it does fail, the job only
runs here as before.

Not yet run on a GPU, hence opt-in. POSIX only.
"""

from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import Executor, Future


def enabled() -> bool:
    return os.environ.get("PATTERNCC_COMPILE_PROCESSES") == "1" and hasattr(os, "fork") and sys.platform != "darwin"


class ForkedCompiles(Executor):
    """An executor that records ``submit``ted jobs until ``run``."""

    def __init__(self):
        self.jobs: list[tuple] = []  # (job, its future)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        self.jobs.append((lambda: fn(*args, **kwargs), future))
        return future

    def run(self, pool: Executor) -> list[int]:
        """Each job in a child of its own, all forked first, then each
        future resolved by its job run on ``pool``; the children's exit
        codes (0: compiled)."""
        children = [_forked(job) for job, _ in self.jobs]
        codes = [_exit_code(pid) for pid in children]
        for job, future in self.jobs:
            pool.submit(_resolve, job, future)
        return codes


def _forked(job) -> int:
    with warnings.catch_warnings():  # Python 3.12 warns on fork in a threaded process; the child runs one job
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code, never runs its exit handlers
        code = 1
        try:
            job()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _resolve(job, future: Future) -> None:
    try:
        future.set_result(job())
    except BaseException as err:  # the compile's own error, as the thread pool would report it
        future.set_exception(err)
