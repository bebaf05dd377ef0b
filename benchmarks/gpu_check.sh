#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU (about 10 minutes of GPU time): the tests that use CUDA,
# then training throughput and MFU (pretrain_slm.py on 1 GPU, NCCL) for the SmolLM2-135M parent itself and a
# ~1B llama-shaped student (random init), fp32 and bf16, without and with the SmolLM2 teacher.
#
#   TEACHER=runs/teacher OUT=gpu_results bash benchmarks/gpu_check.sh
#
# Needs: an environment with CUDA torch, deepspeed and transformers (pip install -e '.[test]' without the CPU
# constraints), and TEACHER, a checkpoint from tools/convert_checkpoint.py import (the GPU machine may have no
# network: bring it along). Writes OUT/summary.md and OUT/*.jsonl; prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-runs/teacher}
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
ITERS=${ITERS:-12}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-4}
[ -f "$TEACHER/model_config.json" ] || { echo "error: TEACHER=$TEACHER: no checkpoint (tools/convert_checkpoint.py import)" >&2; exit 2; }
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device")'
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== tests on CUDA"
"$PY" -m pytest -q tests/test_cuda.py tests/test_losses.py tests/test_flops.py 2>&1 | tail -3 | tee "$OUT/tests.txt"

echo "== throughput and MFU"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$WORK" "$TEACHER" "$SEQ" "$MICRO" "$ITERS" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from megatron_subnet.data.indexed import IndexedDatasetBuilder
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.model.weights import load_config

work, teacher, seq, micro, iters = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
parent = load_config(teacher)
SubnetConfig.full(parent).save(work / "parent_subnet.json")
one_b = ModelConfig(arch="llama", vocab_size=parent.vocab_size, hidden_size=2048, num_layers=16,
                    num_attention_heads=32, num_query_groups=8, head_dim=64, ffn_hidden_size=5632,
                    max_position_embeddings=max(seq, 2048), tie_word_embeddings=True, rope_theta=10000.0)
one_b.save(work / "llama_1b.json")
print(f"~1B student: {one_b.num_parameters():,} parameters")
rng = np.random.default_rng(0)
with IndexedDatasetBuilder(work / "tokens", np.int32) as builder:
    for _ in range(iters * micro + 8):
        builder.add_document(rng.integers(0, parent.vocab_size, seq + 1))
(work / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}))
EOF

run() {  # name, then pretrain_slm.py flags
    local name=$1; shift
    echo "-- $name"
    torchrun --standalone --nproc-per-node 1 pretrain_slm.py --ds_config "$WORK/ds.json" --teacher-load "$TEACHER" \
        --data-path "$WORK/tokens" --split 100,0,0 --micro-batch-size "$MICRO" --seq-length "$SEQ" \
        --train-iters "$ITERS" --log-interval 1 --eval-iters 0 --eval-interval "$ITERS" --lr-warmup-iters 1 \
        --log-dir "$WORK/$name" --overwrite "$@" > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log"; return 1; }
    cp "$WORK/$name/metrics.jsonl" "$OUT/$name.jsonl"
}
PARENT=(--subnet "$WORK/parent_subnet.json")
ONE_B=(--init random --model-config "$WORK/llama_1b.json")
run parent_fp32 "${PARENT[@]}" --kd-alpha 0
run parent_bf16 "${PARENT[@]}" --kd-alpha 0 --bf16
run 1b_fp32 "${ONE_B[@]}" --kd-alpha 0
run 1b_bf16 "${ONE_B[@]}" --kd-alpha 0 --bf16
run 1b_bf16_kd "${ONE_B[@]}" --kd-alpha 0.5 --bf16 --teacher-dtype bf16
run 1b_bf16_recompute "${ONE_B[@]}" --kd-alpha 0 --bf16 --recompute-activations

"$PY" - "$OUT" "$ITERS" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys
from pathlib import Path
out, iters = Path(sys.argv[1]), int(sys.argv[2])
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}\n")
print("| run | tokens/s | model TFLOP/s | MFU | total MFU (with teacher) | peak memory GB |\n|---|---:|---:|---:|---:|---:|")
for path in sorted(out.glob("*.jsonl")):
    rows = [json.loads(l) for l in path.read_text().splitlines() if '"loss"' in l][2:]  # 2 warm-up steps
    med = lambda k: statistics.median(r[k] for r in rows)
    print(f"| {path.stem} | {med('tokens_per_s'):,.0f} | {med('model_tflops'):.1f} | {100 * med('mfu'):.1f}% | "
          f"{100 * med('total_mfu'):.1f}% | {max(r['peak_memory_mb'] for r in rows) / 1024:.1f} |")
EOF
