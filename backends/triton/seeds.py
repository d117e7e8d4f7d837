"""A new process finds the kernels an earlier one compiled without Triton's lookup.

Before Triton looks a kernel up in its disk cache it hashes the kernel's
source together with everything the kernel calls (an AST walk per kernel:
0.16 s of a warm first call's 0.60 s on the H200 machine, for the two
modules of a planned pattern) and then reads every stage's IR from the
cache entry. Triton's in-memory cache, per kernel and device, needs much
less: its own key for a launch (the arguments' specialization and the
launch options, computed by its binder at every launch) and the compiled
kernel.

So once ``compile_ahead`` has compiled or found a module's kernels,
``record`` writes down, per kernel: that key, the hash Triton stored the
binary under, and the signature and constants its launcher is built from
(``s_<module key>.json`` in patterncc's cache directory, checksummed like
the modules). In a later process ``plant`` puts those kernels into
Triton's in-memory cache before the first launch, reading only each
entry's metadata and binary. Triton's binder still specializes every
launch: one whose arguments specialize differently misses and compiles
(or finds) its kernel as before.

Planted only where the record's Triton installation hash (``triton_key``)
and Triton's cache-invalidating environment variables are the process's
own, where no JIT hook or compilation listener is set (a tool that
watches compiles sees them all) and ``always_compile`` is off; a module's
text already names its Triton version and card (``runtime._load_source``).
Anything unexpected in Triton's internals turns it off quietly: the
launches then take Triton's own path.

Off unless ``PATTERNCC_SEEDS=1``: the round trip is checked against
Triton 3.6's and 3.9's own classes on the CPU (``tests/test_seeds.py``),
but a planted kernel has not yet been launched on a card
(``test_on_the_card_a_new_process_runs_planted_kernels`` is the check).
"""

from __future__ import annotations

import ast
import json
import os
import threading
from types import ModuleType

from . import cache

MAX_KERNELS = 256  # per module's record: a record that grows past it starts over

_lock = threading.Lock()
_planted: set[tuple[str, int]] = set()  # (module name, device) done in this process
_broken = False  # Triton's internals are not the ones this was written for


def plant(module: ModuleType, device: int) -> list:
    """Put the recorded kernels of ``module`` into Triton's in-memory cache
    for ``device`` (once per module and device); returns the compiled
    kernels planted (not yet loaded onto the card: ``runtime.load_ahead``)."""
    with _lock:
        if _broken or (module.__name__, device) in _planted or not _enabled():
            return []
        _planted.add((module.__name__, device))
    record_ = _read(module)
    if record_ is None or record_.get("triton") != _installation():
        return []
    try:
        from triton.compiler import ASTSource, CompiledKernel
        from triton.runtime.cache import get_cache_manager

        planted = []
        for entry in record_["kernels"]:
            fn = getattr(module, entry["fn"], None)
            caches = getattr(fn, "device_caches", None)
            if caches is None:
                continue
            kernel_cache = caches[device][0]
            if entry["key"] in kernel_cache:
                continue
            group = get_cache_manager(entry["hash"]).get_group(f"{fn.__name__[:150]}.json")  # (Triton's name)
            if not group:
                continue  # Triton's cache no longer has it: the launch finds or compiles it
            files = {name: path for name, path in group.items() if name.endswith((".json", ".cubin"))}
            constants = {tuple(path): ast.literal_eval(value) for path, value in entry["constants"]}
            kernel = CompiledKernel(ASTSource(fn, dict(entry["signature"]), constants), files, entry["hash"])
            kernel_cache[entry["key"]] = kernel
            planted.append(kernel)
        return planted
    except Exception:  # noqa: BLE001  (Triton's internals changed: its own path from now on)
        _turn_off()
        return []


def record(module: ModuleType, device: int) -> None:
    """Write down the compiled kernels Triton holds for ``module`` on
    ``device`` (adding to an earlier record; rewritten only when it grows)."""
    if _broken or not _enabled():
        return
    try:
        from triton.compiler import ASTSource, CompiledKernel

        old = _read(module)
        installation = _installation()
        known = old["kernels"] if old and old.get("triton") == installation else []
        keys = {entry["key"] for entry in known}
        new = []
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if caches is None or device not in caches:
                continue
            for key, kernel in list(caches[device][0].items()):
                if key in keys or not isinstance(key, str) or not isinstance(kernel, CompiledKernel):
                    continue
                src = kernel.src
                if not isinstance(src, ASTSource) or src.fn is not fn:
                    continue
                constants = [[list(path), repr(value)] for path, value in src.constants.items()]
                if not all(_literal(value) for _, value in constants):
                    continue
                new.append(dict(fn=name, key=key, hash=kernel.hash, signature=list(src.signature.items()),
                                constants=constants))
                keys.add(key)
        if not new:
            return
        kernels = known + new if len(known) + len(new) <= MAX_KERNELS else new[-MAX_KERNELS:]
        cache.write_note(_name(module), json.dumps(dict(triton=installation, kernels=kernels)))
    except Exception:  # noqa: BLE001
        _turn_off()


def _read(module: ModuleType) -> dict | None:
    text = cache.read_note(_name(module))
    if text is None:
        return None
    try:
        found = json.loads(text)
        return found if isinstance(found, dict) and isinstance(found.get("kernels"), list) else None
    except ValueError:
        return None


def _name(module: ModuleType) -> str:
    return f"s_{module.__name__}.json"


def _installation() -> list:
    """What the record must match: Triton's installation hash and the
    environment variables that change what it compiles."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import triton_key

    return [triton_key(), [[name, value] for name, value in sorted(get_cache_invalidating_env_vars().items())]]


def _enabled() -> bool:
    if os.environ.get("PATTERNCC_SEEDS") != "1":
        return False
    from triton import knobs

    runtime, compilation = knobs.runtime, knobs.compilation
    return not (compilation.always_compile or compilation.listener or runtime.jit_cache_hook
                or runtime.jit_post_compile_hook)


def _literal(text: str) -> bool:
    try:
        return repr(ast.literal_eval(text)) == text
    except (ValueError, SyntaxError):
        return False


def _turn_off() -> None:
    global _broken
    _broken = True
