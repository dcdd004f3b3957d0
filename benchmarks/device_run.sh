#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, with .whl carried (see device_wheels.sh):
# install ckptd and its missing dependencies into /tmp/site, then run the GPU checks.
#   bash benchmarks/device_run.sh [tests|w2|train ...]
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
# the installed wheel, not this checkout, must provide ckptd (the checkout's src/ is not on the path)
python3 -c "import ckptd, ckptd.format, zarr; print('ckptd from', ckptd.__file__, 'zarr', zarr.__version__)" || exit 3
PY=python3 PYTEST="python3 -m pytest" OUT="${OUT:-benchmarks/results}" bash benchmarks/gpu_check.sh "$@"
