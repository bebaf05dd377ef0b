#!/usr/bin/env bash
# pretrain_slm.py under Open MPI's mpirun (ranks found through mpi4py); every argument goes to pretrain_slm.py.
#
# One node, 8 processes:
#   NP=8 examples/launch_mpirun.sh --ds_config examples/ds_config_zero1.json --teacher-load ...
# Several nodes (run on node 0): NP=16 HOSTFILE=hosts examples/launch_mpirun.sh ...  # lines "node0 slots=8"
#                            or: NP=16 HOSTS=node0:8,node1:8 examples/launch_mpirun.sh ...
#   the rendezvous is rank 0's first `hostname -I` address; MASTER_PORT (default 29500) must be free there,
#   so give each job sharing a node its own port.
#
# MPI only carries the start-up (training traffic is gloo/NCCL), so Open MPI is told not to probe for
# fast networks: pml ob1 with the self/sm(/tcp) transports skips the UCX and libfabric probing (about 1 s per
# start here, far more on hosts with many interfaces), and idle ranks yield the CPU instead of busy-polling
# (a rank waiting in MPI_Finalize otherwise spins on a core the other ranks need). Override any OMPI_MCA_*.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NP="${NP:-$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"

ARGS=(-np "$NP" --bind-to none -x MASTER_PORT -x OMP_NUM_THREADS -x PATH)
[[ -n "${PYTHONPATH:-}" ]] && ARGS+=(-x PYTHONPATH)
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
elif [[ -n "${HOSTS:-}" ]]; then
  ARGS+=(-H "$HOSTS")
else
  export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}"  # one node: no TCP interface probing at all
  ARGS+=(--oversubscribe)                         # allow more ranks than cores (CPU runs)
fi
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm,tcp}"  # several nodes; narrow with OMPI_MCA_btl_tcp_if_include=eth0
[[ "$(id -u)" == 0 ]] && ARGS+=(--allow-run-as-root)
exec "${MPIRUN:-mpirun}" "${ARGS[@]}" "${PYTHON:-python}" "$HERE/../pretrain_slm.py" "$@"
