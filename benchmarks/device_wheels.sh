#!/usr/bin/env bash
# Prepare .whl/ for a lent GPU machine (Python 3.12, its own CUDA torch, no registry): ckptd's own
# wheel plus the dependencies that machine's image lacks. Run here, in the repository root:
#
#   bash benchmarks/device_wheels.sh
#
# then on the device (carry .whl), from the repository root:
#
#   bash benchmarks/device_run.sh            # installs .whl into /tmp/site, runs gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# The image has numpy, fsspec, tqdm, packaging, typing-extensions, pytest(+timeout), hypothesis.
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "zarr==$("$PY" -c 'import zarr; print(zarr.__version__)')" \
  "numcodecs==$("$PY" -c 'import numcodecs; print(numcodecs.__version__)')" \
  "crc32c==$("$PY" -c 'import importlib.metadata as m; print(m.version("crc32c"))')" \
  "donfig==$("$PY" -c 'import importlib.metadata as m; print(m.version("donfig"))')"\
  "google-crc32c==$("$PY" -c 'import importlib.metadata as m; print(m.version("google-crc32c"))')"
"$PY" -m pip wheel -q --no-deps --no-build-isolation . -w .whl
ls -la .whl
du -sh .whl
