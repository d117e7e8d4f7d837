"""The on-disk kernel cache: generated modules as real files, loaded from disk.

``triton.jit`` reads a kernel's source from its file, so generated modules
are written to disk before they are imported. One file per key:

- directory: ``$PATTERNCC_CACHE_DIR``, else ``$XDG_CACHE_HOME/patterncc``,
  else ``~/.cache/patterncc``; if it (or an entry in it) cannot be written,
  ``patterncc-cache-<uid>`` in the system's temporary folder, owned by the
  user and private to them (with a warning, once per process);
- file name: ``k_<sha256>.py``, the hash of everything the code depends on
  (``key_parts``: generator version, the generator's and kernel template's
  own text, the generated source itself, Triton version, device
  capability): patterns whose generated source is the same (they differ
  only in integers, which the kernels take at run time) share one entry;
- first line: ``# patterncc-sha256: <hash of the rest of the file>``. An entry
  whose hash does not match, or that fails to import, is rebuilt: a corrupt or
  truncated file is never fatal;
- writes are atomic (a temporary file in the same directory, then
  ``os.replace``), so concurrent processes each see a complete file, old or
  new, and the last writer of identical text wins harmlessly;
- beside it, ``k_<sha256>.<cache tag>.bin``: its compiled code, used only
  when made from the same text at the same path by the same Python
  (``_compiled``), so a new process does not compile the source again;
- ``m_<sha256>``: empty notes (``mark``), such as which launches' kernels
  this machine has compiled (``standin.py``); ``s_<module>.json``: notes
  with a text (``write_note``), such as where Triton keeps a module's
  compiled kernels (``seeds.py``).

Modules are kept in memory too, so a process imports each key once.

Triton's own cache: to find a compiled kernel on disk, Triton hashes its
own installation once per process (``triton.runtime.cache.triton_key``:
the sha256 of libtriton.so and of its Python sources, 0.39 s of a 0.87 s
warm first call on the GPU machine). ``remember_triton_key`` keeps that
hash in this directory, under a fingerprint of the same files' paths,
sizes and modification times (3 ms to take), and hands it to Triton; any
change to any of those files gives a new fingerprint and a fresh hash.
``PATTERNCC_TRITON_KEY_MEMO=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from patterncc.cachedir import cache_dir  # where generated modules go (see the module docstring)

_CHECKSUM_PREFIX = "# patterncc-sha256: "

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_fallback_dir: Path | None = None


def cache_key(*key_parts) -> str:
    """sha256 over the parts' reprs, in order."""
    h = hashlib.sha256()
    for part in key_parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def load_module(key: str, make_source: Callable[[], str]) -> ModuleType:
    """The module cached under ``key``; ``make_source()`` builds its text when
    the entry is missing, corrupt or fails to import."""
    with _lock:
        if key in _loaded:
            return _loaded[key]
        directory = _writable_dir()
        path = directory / f"k_{key}.py"
        text = _read_verified(path)
        module = None if text is None else _import(path, text, key)
        if module is None:  # missing, corrupt or not importable: (re)build it
            source = make_source()
            try:
                text = _write_atomic(path, source)
            except OSError as err:  # something else sits at the entry's path (a directory, say)
                path = _fallback(f"its entry {str(path)!r} cannot be written ({err.strerror or err})") / path.name
                text = _write_atomic(path, source)
            module = _import(path, text, key, raise_errors=True)
        _loaded[key] = module
        return module


def remember_triton_key() -> None:
    """Give Triton its installation hash from this cache when the installation
    is unchanged (see the module docstring). Once per process; a no-op when
    turned off or when Triton's function is not the one this was written for."""
    global _triton_key_done
    with _lock:
        if _triton_key_done or os.environ.get("PATTERNCC_TRITON_KEY_MEMO") == "0":
            return
        _triton_key_done = True
        import triton
        import triton.runtime.cache as triton_cache

        real = getattr(triton_cache, "triton_key", None)
        if not callable(real) or not hasattr(real, "cache_clear"):  # not the lru_cache'd function we know
            return
        root = Path(triton.__file__).parent
        files = []
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.endswith((".py", ".so")):
                    st = os.stat(os.path.join(dirpath, name))
                    files.append((os.path.join(dirpath, name), st.st_size, st.st_mtime_ns, st.st_ino))
        fingerprint = cache_key("triton_key", triton.__version__, sorted(files))
        path = _writable_dir() / f"triton_key_{fingerprint}.txt"
        text = _read_verified(path)
        if text is None:
            text = _write_atomic(path, real())
        key = text.partition("\n")[2]

        def remembered():
            return key

        remembered.cache_clear = real.cache_clear
        remembered.patterncc_real = real  # Triton's own, for tests
        triton_cache.triton_key = remembered


_triton_key_done = False


def mark(key: str) -> None:
    """Note on disk that ``key`` happened (``standin.py``: a launch list's
    kernels were compiled on this machine). Best effort: a note that cannot
    be written is left out."""
    try:
        _replace_atomic(_writable_dir() / f"m_{key}", b"")
    except OSError:
        pass


def marked(key: str) -> bool:
    """Whether ``mark(key)`` was called, in this process or an earlier one."""
    return (_writable_dir() / f"m_{key}").is_file()


def write_note(name: str, text: str) -> None:
    """Keep ``text`` under ``name`` (checksummed, atomic: see the module
    docstring). Best effort: a note that cannot be written is left out."""
    try:
        _write_atomic(_writable_dir() / name, text)
    except OSError:
        pass


def read_note(name: str) -> str | None:
    """The text ``write_note`` kept under ``name``; None if it is missing or corrupt."""
    text = _read_verified(_writable_dir() / name)
    return None if text is None else text.partition("\n")[2]


def clear_memory() -> None:
    """Forget the modules loaded in this process (tests use it to force a disk read)."""
    with _lock:
        _loaded.clear()


# -- files


def _writable_dir() -> Path:
    global _fallback_dir
    if _fallback_dir is not None:
        return _fallback_dir
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True)
        probe.close()
        return directory
    except OSError as err:
        return _fallback(f"the directory {str(directory)!r} is not writable ({err.strerror or err})")


def _fallback(why: str) -> Path:
    """The per-user directory under the system's temporary folder that stands
    in for an unusable cache (the same one in every process, so entries are
    still shared and temporary folders do not pile up); a fresh private one
    only when that is not safely ours. Warns once per process."""
    global _fallback_dir
    if _fallback_dir is None:
        shared = Path(tempfile.gettempdir()) / f"patterncc-cache-{os.getuid()}"
        try:
            shared.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(shared)
            # Another user's directory, or one others may write to, could hand us their code.
            if not os.path.isdir(shared) or os.path.islink(shared) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise PermissionError(f"{shared} is not a private directory of this user")
            _fallback_dir = shared
        except OSError:
            _fallback_dir = Path(tempfile.mkdtemp(prefix="patterncc-cache-"))
        warnings.warn(
            f"patterncc: kernel cache: {why}; using {str(_fallback_dir)!r}. "
            "Set PATTERNCC_CACHE_DIR to a writable directory.",
            RuntimeWarning, stacklevel=4)
    return _fallback_dir


def _compiled(path: Path, text: str):
    """The code object of ``text`` as the module at ``path``: from the
    bytecode kept beside the entry when it was made from this very text, at
    this path, by this Python (its header: the interpreter's magic number and
    the sha256 of path and text, so no stale bytecode can stand in for the
    source), else compiled here and kept for the next process. Compiling a
    generated module (~75 KB of source) takes 20-25 ms on a 2-CPU machine,
    paid per module at every first call of a process without this."""
    header = importlib.util.MAGIC_NUMBER + hashlib.sha256(f"{path}\0{text}".encode()).digest()
    kept = path.with_name(f"{path.stem}.{sys.implementation.cache_tag}.bin")
    try:
        data = kept.read_bytes()
        if data.startswith(header):
            return marshal.loads(data[len(header):])
    except (OSError, ValueError, EOFError, TypeError):
        pass  # missing or unreadable: compile
    code = compile(text, str(path), "exec")
    try:
        _replace_atomic(kept, header + marshal.dumps(code))
    except OSError:
        pass  # an entry that cannot be written is compiled again by the next process
    return code


def _read_verified(path: Path) -> str | None:
    """The file's text if it exists and its embedded checksum matches, else None."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    first, newline, body = text.partition("\n")
    if not newline or not first.startswith(_CHECKSUM_PREFIX):
        return None
    if first[len(_CHECKSUM_PREFIX):].strip() != hashlib.sha256(body.encode()).hexdigest():
        return None
    return text


def _write_atomic(path: Path, source: str) -> str:
    text = f"{_CHECKSUM_PREFIX}{hashlib.sha256(source.encode()).hexdigest()}\n{source}"
    _replace_atomic(path, text.encode())
    return text


def _replace_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _import(path: Path, text: str, key: str, raise_errors: bool = False) -> ModuleType | None:
    """Execute the verified ``text`` as the module of ``path`` (its code from
    ``_compiled``; triton.jit reads the file itself)."""
    name = f"patterncc_kernels_{key[:32]}"
    try:
        module = ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module  # inspect (and so triton.jit) finds functions through their module
        exec(_compiled(path, text), module.__dict__)
        return module
    except Exception:
        sys.modules.pop(name, None)
        if raise_errors:
            raise
        return None
