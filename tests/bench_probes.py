"""``bench/probes.py`` (the bench scripts' tile sweeps, resource probes and
first-call timing) for tests: it lives outside the package, beside the scripts
that import it, so it is loaded from its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "bench" / "probes.py"


def load():
    if "probes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("probes", PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["probes"] = module
        spec.loader.exec_module(module)
    return sys.modules["probes"]
