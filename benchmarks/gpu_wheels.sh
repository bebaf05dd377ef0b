#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, fetched here into the ignored .whl/, one version of each, for its
# Python (CPython 3.12, manylinux x86_64); the machine reaches no package registry.
#
#   bash benchmarks/gpu_wheels.sh           # fetch (DeepSpeed is an sdist: built here with pip wheel --no-deps)
#   bash benchmarks/gpu_wheels.sh --check   # only check what .whl/ holds
#
# The check (benchmarks/gpu_wheels_check.py): one version per package; each wheel installable on CPython 3.12
# manylinux x86_64 (a pip dry run with --no-index --no-deps into an empty target); every requirement of every
# wheel met by another wheel or by the image's packages (benchmarks/gpu_image_packages.txt, versions compared
# where known); the wheels plus the repository's tracked files under the 64 MiB a device call carries. The GPU machine then installs them with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (benchmarks/gpu_session.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# deepspeed as tested here; pydantic 2.11 with the parts that need only typing-extensions >= 4.12 (the image's
# own typing-extensions is not replaced)
WHEELS=(hjson==3.1.0 pydantic==2.11.10 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.0)
DEEPSPEED=deepspeed==0.19.8
PLATFORMS=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
LIMIT_MIB=64

if [ "${1:-}" != --check ]; then
    [ $# -eq 0 ] || { echo "error: gpu_wheels.sh: unknown argument $1 (expected --check or nothing)" >&2; exit 2; }
    rm -rf .whl.tmp && mkdir -p .whl.tmp/sdist
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl.tmp "${WHEELS[@]}"
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl.tmp/sdist "$DEEPSPEED"
    # no build isolation: DeepSpeed's setup imports torch, and an isolated build would fetch a CUDA torch (GBs);
    # DS_BUILD_OPS=0: no op is compiled ahead (the training path uses none; they JIT-build if ever asked for)
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl.tmp .whl.tmp/sdist/*.tar.gz
    rm -rf .whl.tmp/sdist .whl && mv .whl.tmp .whl
fi

"$PY" benchmarks/gpu_wheels_check.py --limit-mib "$LIMIT_MIB"
