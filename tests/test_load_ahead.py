"""Loading a first call's compiled kernels ahead of their launches
(runtime.load_ahead): every kernel's launcher is built and its binary
loaded on the pool, side by side, inside the device's context; a kernel
that fails there is left for its launch to fail again (where it is
handled). On the card ``compile_ahead`` runs it; here stand-in kernels
record what happened."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from triton.compiler import CompiledKernel

from patterncc.backends.triton.runtime import _Recorded, load_ahead


class _Kernel(CompiledKernel):
    def __init__(self, log, barrier=None, fails=False):  # nothing compiled: only the loading is recorded
        self.log, self.barrier, self.fails = log, barrier, fails
        self.module = self._run = None

    def __del__(self):
        pass

    def _init_handles(self):
        self.log.append(("loaded", id(self), getattr(_context, "inside", False)))
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # returns only when every kernel is loading at once
        self._run = "launcher"  # Triton builds the launcher before it loads the binary
        if self.fails:
            raise RuntimeError("the binary does not load")
        self.module = "module"


_context = threading.local()


@contextlib.contextmanager
def _on_device():
    _context.inside = True
    try:
        yield
    finally:
        _context.inside = False


def test_kernels_load_side_by_side_inside_the_device_context():
    log, barrier = [], threading.Barrier(3)
    kernels = [_Kernel(log, barrier) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        load_ahead(kernels, _on_device, pool)
    assert sorted(entry[1] for entry in log) == sorted(map(id, kernels))
    assert all(inside for _, _, inside in log)


def test_a_kernel_that_fails_to_load_is_left_to_its_launch():
    """Its launch then loads it from the start (a launcher built before the
    failure is not taken for a loaded kernel) and raises what it raises."""
    log = []
    failing, fine = _Kernel(log, fails=True), _Kernel(log)
    with ThreadPoolExecutor(2) as pool:
        load_ahead([failing, fine], _on_device, pool)  # no error here
    assert len(log) == 2
    assert failing.module is None and failing._run is None
    assert fine.module == "module" and fine._run == "launcher"


def test_the_recorded_compiles_give_each_compiled_kernel_once():
    log = []
    kernel, other = _Kernel(log), _Kernel(log)
    with ThreadPoolExecutor(2) as pool:
        recorded = _Recorded(pool)
        futures = [recorded.submit(lambda k=k: k) for k in (kernel, kernel, other)]
        futures.append(recorded.submit(lambda: None))  # a warm-up that compiled nothing
        futures.append(recorded.submit(lambda: 1 / 0))  # a compile that failed: its launch compiles again
        for f in futures:
            f.exception()
    assert [id(k) for k in recorded.kernels()] == [id(kernel), id(other)]
