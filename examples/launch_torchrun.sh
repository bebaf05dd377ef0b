#!/usr/bin/env bash
# pretrain_slm.py under torchrun; every argument is passed on to pretrain_slm.py.
#
# One node, 8 processes (GPUs, or CPU processes on gloo):
#   NPROC_PER_NODE=8 examples/launch_torchrun.sh --ds_config examples/ds_config_zero1.json --teacher-load ... 
# Several nodes: run the same line on every node, with node 0's address as the c10d rendezvous endpoint:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 examples/launch_torchrun.sh ...
#
# One node uses --standalone (a c10d rendezvous on a free localhost port), so several jobs can share a node.
# (`--master-port 0` does not pick a free port: the workers hang in init_process_group.)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$NNODES" == 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-id "${RDZV_ID:-megatron_subnet}"
        --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}")
fi
exec "${TORCHRUN:-torchrun}" "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" "$HERE/../pretrain_slm.py" "$@"
