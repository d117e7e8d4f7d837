"""launch.Launcher: Triton's launch once per specialization key, then the
compiled kernel's launcher directly (stand-ins for the JIT function and the
compiled kernel: the direct call's arguments are checked one by one; the GPU
runs of bench/gpu_check.sh check it on real kernels)."""

from __future__ import annotations

import pytest
import torch

from patterncc.backends.triton import launch


def kernel_fn(X, Y, n, scale, BLOCK, FLAG=True):
    """The stand-in kernel's signature: two pointers, an int, a float, two constexprs."""


class CompiledStandIn:
    def __init__(self):
        self.function = object()
        self.packed_metadata = ("metadata",)
        self.calls = []

    def run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
            exit_hook, *args):
        self.calls.append((grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                           exit_hook, args))


class JITStandIn:
    def __init__(self, compiled=None):
        self.fn = kernel_fn
        self.compiled = compiled or CompiledStandIn()
        self.launches = []

    def run(self, *args, **kwargs):  # what Launcher checks for; it launches through fn[grid]
        raise AssertionError("not called directly")

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.compiled
        return go


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(launch, "enabled", lambda: True)
    monkeypatch.setattr(launch, "_hooked", lambda: False)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_second_call_goes_straight_to_the_compiled_kernel(direct):
    fn = JITStandIn()
    go = launch.Launcher(fn)
    x, y = torch.zeros(64), torch.zeros(64)
    go((4, 2), x, y, 100, 0.5, BLOCK=16, num_warps=4)
    assert len(fn.launches) == 1 and fn.compiled.calls == []
    x2, y2 = torch.ones(64), torch.ones(64)  # other tensors, same key (dtype, alignment)
    go((4, 2), x2, y2, 100, 0.5, BLOCK=16, num_warps=4)
    assert len(fn.launches) == 1
    (call,) = fn.compiled.calls
    gx, gy, gz, stream, function, packed, meta, enter, exit_, args = call
    assert (gx, gy, gz, stream) == (4, 2, 1, 1234)
    assert function is fn.compiled.function and packed == ("metadata",) and (meta, enter, exit_) == (None,) * 3
    # every parameter in signature order: the constexpr given, the default, no launch options
    assert args[0] is x2 and args[1] is y2 and args[2:] == (100, 0.5, 16, True)


@pytest.mark.parametrize("change", ["int", "float", "constexpr", "option", "alignment", "dtype"])
def test_a_new_specialization_goes_through_triton(direct, change):
    fn = JITStandIn()
    go = launch.Launcher(fn)
    x, y = torch.zeros(64), torch.zeros(64)
    args, kwargs = [x, y, 100, 0.5], dict(BLOCK=16, num_warps=4)
    go((1,), *args, **kwargs)
    if change == "int":
        args[2] = 101
    elif change == "float":
        args[3] = 0.25
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    else:
        args[0] = x.double()
    go((1,), *args, **kwargs)
    assert len(fn.launches) == 2 and fn.compiled.calls == []
    go((1,), *args, **kwargs)  # and that key is now direct too
    assert len(fn.launches) == 2 and len(fn.compiled.calls) == 1


def test_launch_hooks_keep_tritons_path(direct, monkeypatch):
    monkeypatch.setattr(launch, "_hooked", lambda: True)
    fn = JITStandIn()
    go = launch.Launcher(fn)
    for _ in range(3):
        go((1,), torch.zeros(4), torch.zeros(4), 1, 1.0, BLOCK=16)
    assert len(fn.launches) == 3 and fn.compiled.calls == []


def test_an_unknown_launcher_signature_turns_the_direct_path_off(direct):
    class OtherRun(CompiledStandIn):
        def run(self, grid_x, grid_y, grid_z, stream, function, *args):  # not the signature relied on
            raise AssertionError("must not be called")

    fn = JITStandIn(OtherRun())
    go = launch.Launcher(fn)
    for _ in range(3):
        go((1,), torch.zeros(4), torch.zeros(4), 1, 1.0, BLOCK=16)
    assert len(fn.launches) == 3 and not go.direct


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PATTERNCC_DIRECT_LAUNCH", "0")
    assert not launch.enabled()
    fn = JITStandIn()
    go = launch.Launcher(fn)
    for _ in range(2):
        go((1,), torch.zeros(4), torch.zeros(4), 1, 1.0, BLOCK=16)
    assert len(fn.launches) == 2 and fn.compiled.calls == []


def test_tail_binds_constexprs_and_defaults_in_signature_order():
    assert launch._tail(kernel_fn, (1, 2, 3, 4.0), dict(BLOCK=8, num_warps=4)) == (8, True)
    assert launch._tail(kernel_fn, (1, 2, 3, 4.0), dict(FLAG=False, BLOCK=8)) == (8, False)
    with pytest.raises(TypeError, match="BLOCK"):
        launch._tail(kernel_fn, (1, 2, 3, 4.0), {})


def test_hook_chains_count_only_when_they_hold_a_hook():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not launch._active(None) and not launch._active(Chain([]))
    assert launch._active(Chain([print])) and launch._active(print)


def test_scalars_before_tensors_keep_tritons_path(direct):
    """The key assumes tensors first; a kernel taking them otherwise is never launched directly."""
    def mixed(n, X, BLOCK):
        """n first, then a pointer."""

    fn = JITStandIn()
    fn.fn = mixed
    go = launch.Launcher(fn)
    for _ in range(3):
        go((1,), 5, torch.zeros(4), BLOCK=16)
    assert len(fn.launches) == 3 and not go.direct


def test_the_installed_triton_has_no_hook_by_default():
    """Triton 3.6+ keeps empty hook chains: they must not send every launch down Triton's path."""
    assert not launch._hooked()
