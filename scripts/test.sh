#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Without a GPU the generated
# Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
# One test process per core, at most 4 (pytest-xdist): the interpreted kernels
# are single-threaded, so two workers halve the suite on a 2-core machine.
# PATTERNCC_TEST_WORKERS=0 runs everything in this process.
WORKERS=${PATTERNCC_TEST_WORKERS:-$(.venv/bin/python -c "import os; print(min(4, os.cpu_count() or 1))")}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$WORKERS" "$@"
