#!/usr/bin/env bash
# Create .venv (once) with patterncc installed editable and its test extras
# (plot: the pictures; hf: the transformers integration and its tests).
# torch is pinned to 2.13.0 when none is importable: that takes the CPU build
# from local disk on our CPU machines; a GPU machine's own torch is reused
# through --system-site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test,plot,hf]"
# On a GPU, compile the kernels a new pattern's first calls run (the stand-in's) now rather than at
# the first call: seconds once per machine, found in Triton's cache afterwards. PATTERNCC_WARMUP=0
# skips it. If it fails, first calls compile those kernels themselves (and say why), so setup goes on.
if [ "${PATTERNCC_WARMUP:-1}" != 0 ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    .venv/bin/patterncc warmup || echo "scripts/setup.sh: patterncc warmup failed (above); continuing" >&2
fi
