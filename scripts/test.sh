#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Without a GPU the generated
# Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
