#!/usr/bin/env bash
# pretrain_slm.py under the deepspeed launcher; every argument is passed on to pretrain_slm.py.
#
# One node, 8 processes (on a CPU-only machine --num_gpus N starts N processes on gloo):
#   NUM_GPUS=8 examples/launch_deepspeed.sh --ds_config examples/ds_config_zero1.json --teacher-load ...
# Several nodes (run on node 0; the launcher reaches the others by passwordless ssh/pdsh):
#   HOSTFILE=hostfile examples/launch_deepspeed.sh ...     # hostfile lines: "node0 slots=8"
#   optional: NUM_NODES=2 NUM_GPUS=8 (per node) MASTER_ADDR=node0
# MASTER_PORT (default 29500) must be free on node 0: give each job on a node its own.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

ARGS=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && ARGS+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && ARGS+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
status=0
"${DEEPSPEED:-deepspeed}" "${ARGS[@]}" "$HERE/../pretrain_slm.py" "$@" || status=$?
# On CPU, DeepSpeed leaves a 66 MB shared-memory all-reduce buffer per local rank in /dev/shm: remove this job's.
rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"${MASTER_PORT:-29500}"_*
exit "$status"
