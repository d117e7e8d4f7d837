"""Where patterncc keeps what it builds once for every process: generated
kernel modules (``backends/triton/cache.py``) and the parser's tables.

``$PATTERNCC_CACHE_DIR``, else ``$XDG_CACHE_HOME/patterncc``, else
``~/.cache/patterncc``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache directory (it may not exist yet)."""
    if os.environ.get("PATTERNCC_CACHE_DIR"):
        return Path(os.environ["PATTERNCC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "patterncc"


def private_dir() -> Path | None:
    """The cache directory, made if missing, where it is this user's and no
    one else may write to it; else None. For entries that are loaded as
    code or pickles: a directory others can write could hand us theirs."""
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return None
    if os.path.islink(directory) or not directory.is_dir() or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return directory
