#!/usr/bin/env bash
# The Triton backend on a real GPU: correctness, memory safety, speed.
#
#     OUT=/path/to/results bash bench/gpu_check.sh [SECTION...]
#
# Sections (default: check bench, 10 to 14 minutes on one H100; run `check`
# and `bench` as two calls to stay inside a 10-minute command limit):
#   smoke     fwd+bwd of five patterns at n=1000 (not a multiple of the block),
#             bf16 and fp32, against the float64 reference            (~1 min)
#   memcheck  compute-sanitizer memcheck on the same, n=300, bf16     (~1 min)
#   tests     pytest tests/test_triton.py and tests/test_plan.py in GPU mode
#             (default H100 config, n up to 1024, D 64/128/256), 12 workers;
#             TESTS_K="expr" selects tests as pytest -k does (whole: ~4 min)
#   check     = smoke memcheck tests
#   bench     the performance record's table (PERFORMANCE.md) and the planner's:
#             causal, sliding_window(1024), local_global(512,64),
#             fixed(128,32), strided(128) (D=64 only);
#             bf16, B=1, H=16, n=16384/65536, D=64 and 128 (BENCH_D=64 or 128:
#             one of them); patterncc (natural order and plan) vs Flex
#             (create_block_mask, block 128) vs SDPA flash, all in one process
#             per head dim (~8 min each on a fresh machine, BENCH_TIMEOUT caps each)
#   cold      first forward+backward of a new pattern in a fresh process
#             (cold caches) and in a second one (warm disk caches), patterncc
#             and Flex                                              (~1.5 min)
#   long      local_global(512,64) forward+backward at n=262144: time, peak
#             memory; Flex's uncompiled create_block_mask at 131072   (~1 min)
#   plan      the planner: strided(128), fixed(128,32) at n=16384/65536, D=64,
#             natural order vs plan vs Flex vs SDPA                  (~5 min)
#   profile   where planned strided(128) and fixed(128,32) calls at n=16384
#             and 65536 spend their time, launch by launch          (~2 min)
#   sweep     tile candidates for config.py (causal, n=16384, D=64/128 or
#             SWEEP_D) (~3 min; --resources, run where Triton can
#             compile for sm_90, reports registers and spills)
#   tiles     forward tiles on the banded patterns and causal (D=64: sliding_window,
#             causal; D=128: local_global, sliding_window, causal) and D=128
#             backward tile sets on causal and sliding_window, n=16384  (~5 min)
#   host      the host's cost of a planned strided(128) forward at n=16384,
#             layer by layer, and a cProfile of it                 (~30 s)
#   firstcall bench/cold_start.py: a new pattern's first forward+backward in
#             fresh processes (cold, new integers, serial, loaded at launch, caches another
#             pattern filled, warm disk cache) beside Flex's; the stand-in
#             calls' phases (first_call_phases.py); then the cold
#             call profiled (warm_start.py --front --cold) and the kernels
#             compiled serially, on threads and in processes
#             (compile_parallel.py)                                (~6 min)
#   firstab   bench/cold_start.py --before: cold and used-caches first calls of
#             strided, fixed and the cycle with the own compile held for the
#             first backward and the one-stage stand-in, and without, alternating
#             in one run                                            (~3 min)
#   warmup    bench/cold_start.py --warmup: each case's cold first call beside
#             its first call after `patterncc warmup` (what scripts/setup.sh
#             runs on a GPU), and the warmup's own seconds        (~4 min)
#   warm      tests/test_seeds.py and test_standin.py on the card (their
#             fresh-process tests among them), then the warm first call
#             (warm_start.py --front --bytecode) with Triton's own lookup
#             and with PATTERNCC_SEEDS=1                           (~5 min)
#   ops       tests/test_compile_gpu.py (torch.compile, CUDA graphs, export across
#             processes on the card) and tests/test_transformers.py (flattened
#             batches compiled, packed rows) on the card              (~5 min)
#   packed    bench/bench_packed.py: packed batches (cu_seqlens) against
#             Flex with a document mask and the sequences one by one (~4 min)
#   decode    bench/decode_tiles.py (the query-rows kernel's key step and
#             pipeline depth on causal at 1M; split-KV factors on
#             sliding_window and strided in a graph), then bench/bench_decode.py:
#             decode steps from a KV cache against SDPA cuDNN, with
#             CUDA-graph rows, 32K, 128K and 1M, FlexAttention too  (~5 min)
#   scores    bench/bench_scores.py: each score term's cost and Flex's
#             score_mod, sliding_window(4096), D=64 and 128        (~8 min)
#   hf        bench/bench_transformers.py: a 1.1B Llama-shaped model at 32K
#             with sdpa, flex_attention and patterncc               (~4 min)
#   limits    bench/block_rate.py: every pattern against causal's time per
#             block (eager and CUDA-graph replay, Flex, SDPA cuDNN and flash),
#             D=64 at 4K/16K/64K and D=128 at 16K/64K; then the floors:
#             hopper_probe.py's no-steps, no-predicate, no-gather and no-exp2
#             variants, sliding windows of growing walks, and the host's time
#             per call (host_per_call.py)   (~20 min: run it in three calls,
#             LIMITS_PART=1, 2, 3)
#
# Every section runs under `timeout` and writes its log under $OUT as it goes,
# so a cut-off section still leaves what it finished; the exit status is
# nonzero if any section failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-out/gpu_check}
export PYTHONUNBUFFERED=1
export PATTERNCC_CACHE_DIR=/tmp/patterncc-cache
source bench/gpu_env.sh

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(check bench)
status=0
fail() { status=1; echo "== $1 failed or timed out" | tee -a "$OUT/summary.txt" >&2; }

run_smoke() {
    echo "== smoke" | tee -a "$OUT/summary.txt"
    timeout 150 python3 bench/bench_triton.py --smoke --smoke-n 1000 2>&1 | tee "$OUT/smoke.log" || fail smoke
}

run_memcheck() {
    echo "== memcheck" | tee -a "$OUT/summary.txt"
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer not found: memcheck skipped" | tee "$OUT/memcheck.log"
        return
    fi
    # No caching allocator: every tensor is its own allocation, so a read past
    # a tensor's end is out of bounds for the sanitizer, not a read of a neighbour.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 "$sanitizer" --tool memcheck --print-limit 20 \
        python3 bench/bench_triton.py --smoke --smoke-n 300 --smoke-dtypes bfloat16 > "$OUT/memcheck.log" 2>&1 \
        || fail memcheck
    grep -E "ERROR SUMMARY|^(ok|FAIL)" "$OUT/memcheck.log" | tee -a "$OUT/summary.txt"
}

run_tests() {
    echo "== tests" | tee -a "$OUT/summary.txt"
    local workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n 12)
    # From $PKGROOT: the checkout's own patterncc/ (without backends/) must not be sys.path[0].
    local select=()
    [ -n "${TESTS_K:-}" ] && select=(-k "$TESTS_K")
    # Both files whole: ~4 min on an H200 with 12 workers (test_triton.py 168 s, test_plan.py 68 s). A TESTS_K
    # subset is quicker but can miss a CUDA-only failure: every mask_mod test once failed only on a CUDA machine.
    (cd "$PKGROOT" && timeout 420 python3 -m pytest "$REPO/tests/test_triton.py" "$REPO/tests/test_plan.py" -q \
        -p no:cacheprovider "${workers[@]}" "${select[@]}" 2>&1) | tee "$OUT/pytest.log" || fail tests
    tail -3 "$OUT/pytest.log" >> "$OUT/summary.txt"
}

run_bench() {
    echo "== bench" | tee -a "$OUT/summary.txt"
    # One process per head dim (BENCH_D picks them; default both), each under its own timeout: the
    # rows it finished stay in the log. D=64: the record's patterns and the planner's (strided, fixed:
    # natural order and plan); D=128: the record's patterns; both at 16K and 64K. On a fresh H200 the
    # first case spends ~265 s compiling (Flex): run each head dim as its own device call.
    local D
    for D in ${BENCH_D:-64 128}; do
        local patterns=(causal "sliding_window(1024)" "local_global(512,64)" "fixed(128,32)")
        [ "$D" = 64 ] && patterns+=("strided(128)")
        timeout "${BENCH_TIMEOUT:-540}" python3 bench/bench_triton.py --lean --head-dim "$D" --seq-len 16384 65536 \
            --rep 60 --rounds "${BENCH_ROUNDS:-3}" --patterns "${patterns[@]}" --out "$OUT/bench.md" 2>&1 | tee -a "$OUT/bench.log" \
            || fail "bench D=$D"
    done
}

run_cold() {
    echo "== cold" | tee -a "$OUT/summary.txt"
    timeout 120 python3 bench/bench_triton.py --cold-start --out "$OUT/cold.md" 2>&1 | tee -a "$OUT/cold.log" \
        || fail cold-start
}

run_long() {
    echo "== long" | tee -a "$OUT/summary.txt"
    timeout 150 python3 bench/long_context.py 2>&1 | tee "$OUT/long.log" || fail long
}

run_plan() {
    echo "== plan" | tee -a "$OUT/summary.txt"
    # The planner's targets: strided and fixed at 16K and 64K, D=64, against Flex and SDPA.
    timeout 420 python3 bench/bench_triton.py --patterns "strided(128)" "fixed(128,32)" --seq-len 16384 65536 \
        --head-dim 64 --rep 60 --out "$OUT/plan.md" 2>&1 | tee -a "$OUT/plan.log" || fail plan
}

run_profile() {
    echo "== profile" | tee -a "$OUT/summary.txt"
    timeout 240 python3 bench/profile_plan.py --pattern "strided(128)" "fixed(128,32)" --seq-len 16384 65536 \
        2>&1 | tee "$OUT/profile.log" || fail profile
}

run_sweep() {
    echo "== sweep" | tee -a "$OUT/summary.txt"
    timeout 300 python3 bench/bench_triton.py --sweep --patterns causal --seq-len 16384 --head-dim ${SWEEP_D:-64 128} \
        --out "$OUT/sweep.md" 2>&1 | tee "$OUT/sweep.log" || fail sweep
}

run_tiles() {
    echo "== tiles" | tee -a "$OUT/summary.txt"
    local sweep=(python3 bench/bench_triton.py --sweep --seq-len 16384 --rep 40)
    local f64=(128x64:4:3 128x128:8:3 128x128:4:3 64x64:4:3 64x128:4:3 128x64:4:2 64x64:4:2)
    local f128=(128x128:8:3 128x64:8:3 128x64:4:3 64x64:4:3 64x128:4:3 64x128:8:3 128x128:8:2)
    local b128=(32x64/64x64:4:2 64x128/64x64:8:2 64x128/128x64:8:3 32x128/64x64:4:2 64x64/64x64:4:2)
    timeout 120 "${sweep[@]}" --head-dim 64 --patterns "sliding_window(1024)" causal \
        --fwd-candidates "${f64[@]}" --bwd-candidates 2>&1 | tee "$OUT/tiles.log" || fail "tiles D=64"
    timeout 200 "${sweep[@]}" --head-dim 128 --patterns "local_global(512,64)" "sliding_window(1024)" causal \
        --fwd-candidates "${f128[@]}" --bwd-candidates 2>&1 | tee -a "$OUT/tiles.log" || fail "tiles D=128 fwd"
    timeout 150 "${sweep[@]}" --head-dim 128 --patterns causal "sliding_window(1024)" \
        --fwd-candidates --bwd-candidates "${b128[@]}" 2>&1 | tee -a "$OUT/tiles.log" || fail "tiles D=128 bwd"
}

run_host() {
    echo "== host" | tee -a "$OUT/summary.txt"
    timeout 90 python3 bench/profile_plan.py --host --pattern "strided(128)" --seq-len 16384 2>&1 \
        | tee "$OUT/host.log" || fail host
}

run_firstcall() {
    echo "== firstcall" | tee -a "$OUT/summary.txt"
    timeout 420 python3 bench/cold_start.py --n 4096 --json "$OUT/cold_start.json" 2>&1 \
        | tee "$OUT/cold_start.log" || fail firstcall
    # where a stand-in first call goes (backends/triton/standin.py), D = 64, then D = 128
    timeout 90 python3 bench/first_call_phases.py "strided(192)" "strided(128)" "fixed(128, 32)" "fixed(128, 32)" \
        2>&1 | tee "$OUT/phases.log" || fail firstcall
    PHASES_D=128 timeout 60 python3 bench/first_call_phases.py "strided(128)" "fixed(128, 32)" 2>&1 \
        | tee "$OUT/phases-d128.log" || fail firstcall
    timeout 90 python3 bench/warm_start.py --front --cold --top 60 2>&1 | tee "$OUT/cold_profile.log" || fail firstcall
    timeout 150 python3 bench/compile_parallel.py --patterns "strided(128)" "fixed(128,32)" 2>&1 \
        | tee "$OUT/compile_parallel.log" || fail firstcall
}

run_firstab() {
    echo "== firstab" | tee -a "$OUT/summary.txt"
    timeout 420 python3 bench/cold_start.py --n 4096 --cases strided,fixed,cycle --before \
        --json "$OUT/cold_before_now.json" 2>&1 | tee "$OUT/cold_before_now.log" || fail firstab
}

run_warmup() {
    echo "== warmup" | tee -a "$OUT/summary.txt"
    timeout 480 python3 bench/cold_start.py --n 4096 --warmup --json "$OUT/cold_warmup.json" 2>&1 \
        | tee "$OUT/cold_warmup.log" || fail warmup
}

run_warm() {
    echo "== warm" | tee -a "$OUT/summary.txt"
    # a new process on the kernels an earlier one recorded (backends/triton/seeds.py), then the warm
    # first call with Triton's own lookup and with the seeds, each after its own cold process
    (cd "$PKGROOT" && timeout 240 python3 -m pytest "$REPO/tests/test_seeds.py" "$REPO/tests/test_standin.py" -q \
        -p no:cacheprovider 2>&1) | tee "$OUT/seeds-tests.log" || fail warm
    timeout 150 python3 bench/warm_start.py --front --bytecode --top 45 2>&1 | tee "$OUT/warm.log" || fail warm
    PATTERNCC_SEEDS=1 timeout 150 python3 bench/warm_start.py --front --bytecode --top 45 2>&1 \
        | tee "$OUT/warm-seeds.log" || fail warm
}

run_ops() {
    echo "== ops" | tee -a "$OUT/summary.txt"
    (cd "$PKGROOT" && timeout 420 python3 -m pytest "$REPO/tests/test_compile_gpu.py" "$REPO/tests/test_transformers.py" \
        -q -p no:cacheprovider 2>&1) | tee "$OUT/ops-tests.log" || fail ops
    tail -3 "$OUT/ops-tests.log" >> "$OUT/summary.txt"
}

run_packed() {
    echo "== packed" | tee -a "$OUT/summary.txt"
    timeout 420 python3 bench/bench_packed.py --out "$OUT/packed.md" 2>&1 | tee "$OUT/packed.log" || fail packed
}

run_decode() {
    echo "== decode" | tee -a "$OUT/summary.txt"
    timeout 150 python3 bench/decode_tiles.py --warps 4 --rep 30 2>&1 | tee "$OUT/decode_tiles.log" || fail decode
    # the split-KV factor on the steps that read little (decode._splits against forced factors)
    timeout 120 python3 bench/decode_tiles.py --patterns "sliding_window(4096)" "strided(128)" --blocks 64 \
        --stages 3 --warps 4 --splits 0 2 4 8 16 32 --graph --rep 20 2>&1 | tee "$OUT/decode_splits.log" || fail decode
    timeout 300 python3 bench/bench_decode.py --rounds 1 --rep 20 --batches 1 8 --contexts 32768 131072 1048576 \
        --variants contiguous graph 2>&1 | tee "$OUT/decode.log" || fail decode
}

run_scores() {
    echo "== scores" | tee -a "$OUT/summary.txt"
    timeout 560 python3 bench/bench_scores.py --patterns "sliding_window(4096)" --rounds 2 --rep 40 \
        --out "$OUT/scores.md" 2>&1 | tee "$OUT/scores.log" || fail scores
}

run_limits() {
    echo "== limits" | tee -a "$OUT/summary.txt"
    local part=${LIMITS_PART:-all}
    local floor=(--seq-lens 4096 16384 65536 --head-dims 64 --flex --no-sdpa --patterns "strided(128)"
                 "fixed(128,32)" "sliding_window(1024)" "axial(256)" "causal & dilated(256, 4)" "longformer(512,64)")
    local at64k=(--seq-lens 65536 --head-dims 64 --flex --no-sdpa --rep 30)
    if [ "$part" = all ] || [ "$part" = 1 ]; then
        timeout 300 python3 bench/block_rate.py --seq-lens 4096 16384 65536 --head-dims 64 \
            > "$OUT/all-patterns-d64.log" 2>&1 || fail "limits all-patterns"
        timeout 200 python3 bench/host_per_call.py > "$OUT/host-per-call.log" 2>&1 || fail "limits host"
    fi
    if [ "$part" = all ] || [ "$part" = 2 ]; then
        timeout 130 python3 bench/block_rate.py "${floor[@]}" > "$OUT/floor-base-d64.log" 2>&1 || fail "limits base"
        timeout 150 python3 bench/hopper_probe.py --variants no-steps --script bench/block_rate.py "${floor[@]}" \
            > "$OUT/floor-no-steps-d64.log" 2>&1 || fail "limits no-steps"
        timeout 150 python3 bench/hopper_probe.py --variants base no-exp2 --seq-lens 16384 65536 --head-dims 64 128 \
            > "$OUT/causal-no-exp2.log" 2>&1 || fail "limits no-exp2"
    fi
    if [ "$part" = all ] || [ "$part" = 3 ]; then
        timeout 110 python3 bench/block_rate.py "${at64k[@]}" --patterns "sliding_window(128)" "sliding_window(256)" \
            "sliding_window(512)" "sliding_window(2048)" "sliding_window(8192)" "strided(128)" "fixed(128,32)" \
            > "$OUT/walks-d64.log" 2>&1 || fail "limits walks"
        for variant in no-predicate no-gather; do
            timeout 75 python3 bench/hopper_probe.py --variants $variant --script bench/block_rate.py "${at64k[@]}" \
                --patterns "strided(128)" "fixed(128,32)" > "$OUT/$variant-d64.log" 2>&1 || fail "limits $variant"
        done
        timeout 400 python3 bench/block_rate.py --seq-lens 16384 65536 --head-dims 128 --rep 30 --no-sdpa \
            --patterns "strided(128)" "fixed(128,32)" --flex "strided(128)" > "$OUT/base-d128.log" 2>&1 \
            || fail "limits D=128"
        local short=(--flex --no-sdpa --rep 20 --rounds 1 --patterns "sliding_window(128)" "strided(128)")
        timeout 60 python3 bench/block_rate.py --seq-lens 16384 --head-dims 64 "${short[@]}" \
            > "$OUT/walk128-16k-d64.log" 2>&1 || fail "limits walk 16K"
        timeout 90 python3 bench/block_rate.py --seq-lens 65536 --head-dims 128 "${short[@]}" \
            > "$OUT/walk128-64k-d128.log" 2>&1 || fail "limits walk D=128"
        local d128=(--seq-lens 65536 --head-dims 128 --flex --no-sdpa --rep 20 --rounds 1)
        timeout 120 python3 bench/hopper_probe.py --variants no-steps --script bench/block_rate.py "${d128[@]}" \
            --patterns "strided(128)" "fixed(128,32)" > "$OUT/no-steps-64k-d128.log" 2>&1 || fail "limits no-steps D=128"
        timeout 120 python3 bench/hopper_probe.py --variants no-gather --script bench/block_rate.py "${d128[@]}" \
            --patterns "fixed(128,32)" > "$OUT/no-gather-64k-d128.log" 2>&1 || fail "limits no-gather D=128"
    fi
    grep -h "^|" "$OUT"/*-d64.log "$OUT"/*-d128.log "$OUT"/causal-no-exp2.log 2>/dev/null | tee -a "$OUT/summary.txt"
}

run_hf() {
    echo "== hf" | tee -a "$OUT/summary.txt"
    timeout 400 python3 bench/bench_transformers.py --budget-s 330 2>&1 | tee "$OUT/hf.log" || fail hf
}

for section in "${sections[@]}"; do
    case "$section" in
        smoke) run_smoke ;;
        memcheck) run_memcheck ;;
        tests) run_tests ;;
        check) run_smoke; run_memcheck; run_tests ;;
        bench) run_bench ;;
        cold) run_cold ;;
        long) run_long ;;
        plan) run_plan ;;
        profile) run_profile ;;
        sweep) run_sweep ;;
        tiles) run_tiles ;;
        host) run_host ;;
        firstcall) run_firstcall ;;
        warm) run_warm ;;
        warmup) run_warmup ;;
        ops) run_ops ;;
        firstab) run_firstab ;;
        packed) run_packed ;;
        decode) run_decode ;;
        scores) run_scores ;;
        hf) run_hf ;;
        limits) run_limits ;;
        *) echo "unknown section $section (smoke memcheck tests check bench cold long plan profile sweep tiles host" \
                "firstcall firstab warmup warm ops packed decode scores hf limits)" >&2; status=2 ;;
    esac
done
echo "== exit status $status" | tee -a "$OUT/summary.txt"
exit $status
