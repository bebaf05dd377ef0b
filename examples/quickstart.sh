#!/usr/bin/env bash
# The whole method on the demo, small enough for a 2-core CPU (about 6 minutes after the fetches):
# SmolLM2-135M teacher -> importance -> evolutionary search at ~50% of its non-embedding parameters
# -> distillation run under the deepspeed launcher -> Hugging Face export -> perplexity.
# `make quickstart` fetches the corpus and teacher and tokenizes the corpus first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
CACHE="${MEGATRON_SUBNET_CACHE:-$HOME/.cache/megatron_subnet}"
DATA="${DATA:-data/demo_text_document}"
OUT="${OUT:-runs/quickstart}"
NUM_GPUS="${NUM_GPUS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$OUT"

echo "== 1. teacher -> our checkpoint"
[[ -f "$OUT/teacher/model.safetensors" ]] ||
  "$PY" tools/convert_checkpoint.py import --input "$CACHE/smollm2-135m-instruct" --output "$OUT/teacher"

echo "== 2. importance scores (2 calibration batches)"
[[ -f "$OUT/importance.safetensors" ]] ||
  "$PY" tools/compute_importance.py --load "$OUT/teacher" --data-path "$DATA" --seq-length 256 \
    --micro-batch-size 2 --calib-iters 2 --drop-loss-iters 0 --output "$OUT/importance.safetensors"

echo "== 3. evolutionary search at 50% of the non-embedding parameters (tiny budget)"
"$PY" tools/search_subnet.py --load "$OUT/teacher" --data-path "$DATA" --importance "$OUT/importance.safetensors" \
  --space uniform --target-params 0.5 --tolerance 0.05 --population 6 --generations 3 --elite 2 \
  --seq-length 128 --micro-batch-size 2 --fitness-batches 1 --seed 0 --output "$OUT/search"

echo "== 4. distillation from the teacher (deepspeed launcher, $NUM_GPUS processes, ZeRO-1)"
NUM_GPUS="$NUM_GPUS" examples/launch_deepspeed.sh --ds_config examples/ds_config_zero1.json \
  --teacher-load "$OUT/teacher" --subnet "$OUT/search/best_subnet.json" --data-path "$DATA" \
  --micro-batch-size 2 --global-batch-size 8 --seq-length 256 --train-iters 20 --lr 3e-4 --min-lr 3e-5 \
  --lr-warmup-iters 2 --kd-alpha 0.5 --kd-temperature 1.0 --log-interval 2 --eval-interval 10 --eval-iters 2 \
  --save "$OUT/student" --save-interval 10 --overwrite  # a rerun of the quickstart trains anew

echo "== 5. export to Hugging Face and check with transformers"
"$PY" tools/convert_checkpoint.py export --input "$OUT/student/final_model" --output "$OUT/student_hf" --overwrite
"$PY" tools/evaluate.py --load "$OUT/student_hf" --hf --data-path "$DATA" --split-name test --seq-length 256 \
  --micro-batch-size 2 --eval-iters 2
echo "done: loss curve $OUT/student/loss_curve.png, metrics $OUT/student/metrics.jsonl, model $OUT/student_hf"
