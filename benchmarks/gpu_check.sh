#!/usr/bin/env bash
# The GPU check, every step under its own time limit; a failing step never stops the ones after it.
#
#   bash benchmarks/gpu_check.sh [--cpu] [--out DIR] [--only STEP,STEP...]
#
# Steps: env (versions, the GPU, its peak), attention (which SDPA kernels take our bf16 attention, and which one
# the default dispatch runs), tests (the CUDA tests: each compares with the CPU), prepare (a random-init parent
# of SmolLM2-135M's shape and a ~1B llama config: no weights need to travel), then the throughput runs of
# pretrain_slm.py on one device, bf16 first (run_<name>), and the summary. Writes DIR/summary.md (every step's
# outcome, the attention table, tokens/s and MFU per run) and DIR/logs.tar.gz (every step's whole output and
# each run's metrics.jsonl): two files, whatever fails. Exit 0 when every step passed, else 1.
#
# --cpu runs the same wiring on the CPU with tiny shapes in a few minutes (tests/test_gpu_check.py runs it);
# --only reruns some steps (prepare is implied by a run_ step). PYTHON (default python3), TESTS (the test
# files of the tests step) and BUDGET (seconds for the whole check, default 540 on a GPU: a step whose limit
# no longer fits is skipped, and the summary and archive are rewritten after every step, so a call cut off
# at its limit still returns them) can be set. benchmarks/gpu_session.sh is the one command for the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=gpu_results
CPU=
ONLY=
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) CPU=--cpu ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        --only) ONLY=,${2:?--only needs step names},; shift ;;
        *) echo "error: gpu_check.sh: unknown argument $1 (expected --cpu, --out DIR, --only STEPS)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$CPU" ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU even on a GPU machine
    ITERS=4 SEQ=64 MICRO=2 RUN_LIMIT=300 TEST_LIMIT=300 BUDGET=${BUDGET:-3600}  # generous: a CPU may be shared
    TESTS=${TESTS:-tests/test_cuda.py tests/test_losses.py}
else
    ITERS=12 SEQ=2048 MICRO=4 RUN_LIMIT=120 TEST_LIMIT=240 BUDGET=${BUDGET:-540}
    # the CPU's device rules (tests/test_device_rules.py) are CPU tests by design: not here
    TESTS=${TESTS:-tests/test_cuda.py tests/test_losses.py tests/test_flops.py}
fi
DEADLINE=$(($(date +%s) + BUDGET))
mkdir -p "$OUT" || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
mkdir -p "$LOGS/runs"
: > "$LOGS/steps.tsv"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
FAILED=0

wanted() { [ -z "$ONLY" ] || [[ $ONLY == *",$1,"* ]] || { [ "$1" = prepare ] && [[ $ONLY == *",run_"* ]]; }; }

publish() {  # summary.md and logs.tar.gz as they stand: written again after every step
    "$PY" benchmarks/gpu_check.py summary "$LOGS" > "$OUT/summary.md.tmp" 2> "$LOGS/summary.log" \
        || { echo "summary failed:"; cat "$LOGS/summary.log" "$LOGS/steps.tsv"; } > "$OUT/summary.md.tmp"
    mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    tar czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

step() {  # name, time limit in seconds, command...: output to LOGS/name.log, outcome to steps.tsv
    local name=$1 limit=$2 start rc outcome
    shift 2
    wanted "$name" || return 0
    start=$(date +%s)
    if [ $((start + limit)) -gt "$DEADLINE" ]; then
        outcome="SKIPPED (${limit}s limit past the ${BUDGET}s budget)"
        FAILED=1
    else
        echo "== $name (limit ${limit}s)"
        timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
        rc=$?
        case $rc in
            0) outcome=ok ;;
            124 | 137) outcome="TIMEOUT after ${limit}s" ;;
            *) outcome="FAILED (exit $rc)" ;;
        esac
        [ $rc -eq 0 ] || { FAILED=1; tail -n 15 "$LOGS/$name.log"; }
        # a job the tests started in its own session outlives a timeout: none may hold the GPU into the next step
        [ -n "$CPU" ] || pkill -9 -f "tests/training_utils.py|pretrain_slm.py" 2> /dev/null
    fi
    printf '%s\t%s\t%s\n' "$name" "$outcome" "$(($(date +%s) - start))" >> "$LOGS/steps.tsv"
    echo "   $name: $outcome"
    publish
}

run() {  # name, then pretrain_slm.py flags: one device, the prepared tokens, no evaluation
    local name=$1
    shift
    step "run_$name" "$RUN_LIMIT" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_slm.py \
        --ds_config "$WORK/ds.json" --teacher-load "$WORK/parent" --data-path "$WORK/tokens" --split 100,0,0 \
        --micro-batch-size "$MICRO" --seq-length "$SEQ" --train-iters "$ITERS" --log-interval 1 --eval-iters 0 \
        --eval-interval "$ITERS" --lr-warmup-iters 1 --log-dir "$WORK/runs/$name" --overwrite "$@"
    [ -f "$WORK/runs/$name/metrics.jsonl" ] && cp "$WORK/runs/$name/metrics.jsonl" "$LOGS/runs/$name.jsonl"
}

step env 60 "$PY" benchmarks/gpu_check.py env
step attention 180 "$PY" benchmarks/gpu_check.py attention $CPU --output "$LOGS/attention.json"
# shellcheck disable=SC2086 # TESTS is a list of files
step tests "$TEST_LIMIT" "$PY" -m pytest -q -rfEs -p no:cacheprovider $TESTS
step prepare 180 "$PY" benchmarks/gpu_check.py prepare "$WORK" $CPU --iters "$ITERS" --seq-length "$SEQ" \
    --micro-batch-size "$MICRO"
SMOLLM2=(--subnet "$WORK/parent_subnet.json")
ONE_B=(--init random --model-config "$WORK/llama_1b.json")
KD=(--kd-alpha 0.5 --teacher-dtype bf16)
run smollm2_bf16 "${SMOLLM2[@]}" --kd-alpha 0 --bf16
run smollm2_bf16_kd "${SMOLLM2[@]}" "${KD[@]}" --bf16
run 1b_bf16 "${ONE_B[@]}" --kd-alpha 0 --bf16
run 1b_bf16_kd "${ONE_B[@]}" "${KD[@]}" --bf16
run 1b_bf16_recompute "${ONE_B[@]}" --kd-alpha 0 --bf16 --recompute-activations
run smollm2_fp32 "${SMOLLM2[@]}" --kd-alpha 0
run 1b_fp32 "${ONE_B[@]}" --kd-alpha 0

publish
grep -q "^summary failed" "$OUT/summary.md" && FAILED=1
cat "$OUT/summary.md"
echo "wrote $OUT/summary.md and $OUT/logs.tar.gz"
exit $FAILED
