#!/usr/bin/env bash
# Dense vs sparse character-level LMs on one H100, then the time/memory sweep.
#
#     OUT=/path/to/results bash bench/train_gpu.sh
#
# 1. Training: dense (SDPA flash, causal), fixed(128, 32) and strided(128) at
#    context 32768 (CONTEXT, STEPS, EVAL_EVERY override), with equal steps,
#    batch, learning-rate schedule and seed
#    (the same initial weights and batches). Targets: fixed's median step time
#    <= 0.5x dense's, its validation loss within 2% of dense's.
# 2. Sweep: forward+backward time and peak activation memory over contexts
#    1024..32768 for dense, fixed and strided, with and without recompute
#    (target: with recompute, activation memory linear in context, i.e.
#    flat bytes/token in results.md).
#
# Budget: about 5 minutes of GPU time, each stage under `timeout`; each stage
# writes results.json/results.md as it goes, so a cut-off stage still leaves
# what it finished. Results: $OUT/train and $OUT/sweep (json, md, png).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/train_gpu}
mkdir -p "$OUT"

source bench/gpu_env.sh

MODEL=(--device cuda --dim 256 --depth 4 --heads 4 --dtype bf16 --seed 0)
status=0

timeout ${TRAIN_TIMEOUT:-220} python3 examples/train_char_lm.py "${MODEL[@]}" \
    --context ${CONTEXT:-32768} --batch 1 --steps ${STEPS:-800} --lr 2e-3 --eval-every ${EVAL_EVERY:-200} --eval-batches 8 \
    --timing-warmup 20 --models dense,fixed,strided --l 128 --c 32 \
    --out "$OUT/train" || { status=1; echo "train stage failed or timed out" >&2; }

[ "${SWEEP_TIMEOUT:-120}" = 0 ] || timeout ${SWEEP_TIMEOUT:-120} python3 examples/train_char_lm.py "${MODEL[@]}" --no-train --sweep \
    --sweep-contexts 2048,4096,8192,16384,32768 --sweep-models dense,fixed \
    --sweep-batch 1 --sweep-steps 5 --sweep-warmup 2 \
    --out "$OUT/sweep" || { status=1; echo "sweep stage failed or timed out" >&2; }

exit $status
