#!/usr/bin/env bash
# The one prepared command for a GPU session (about 6 minutes on one H200; see README, "On a GPU").
#
#   here:   bash benchmarks/gpu_wheels.sh                  # once: the wheels the GPU image lacks, into .whl/
#   there:  bash benchmarks/gpu_session.sh [--only STEPS]  # device tool: run, carry [".whl"], timeout_s 600
#
# Installs .whl/ into /tmp/site (no registry there), then runs benchmarks/gpu_check.sh: environment, attention
# kernels, the CUDA tests, throughput and MFU, each step under its own limit, none stopped by another's
# failure. Results in $OUT (default gpu_results): summary.md, logs.tar.gz, install.log. --only reruns some
# steps (e.g. --only tests,run_1b_bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" || exit 2
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/install.log" 2>&1 || { echo "wheel install failed:"; tail -5 "$OUT/install.log"; }
else
    echo "no .whl/ here: run benchmarks/gpu_wheels.sh before the session and carry .whl" | tee "$OUT/install.log"
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
bash benchmarks/gpu_check.sh --out "$OUT" "$@"
rc=$?
echo "gpu_session: $(($(date +%s) - start)) s in all, exit $rc"
exit $rc
