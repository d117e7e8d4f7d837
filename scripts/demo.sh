#!/usr/bin/env bash
# Set up (if needed) and run the main job: on a CPU-only machine a demo of the
# compiler and the reference backend; on a GPU the real Triton kernels too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/patterncc demo "$@"
