#!/usr/bin/env bash
# GPU checks of the snapshot engine (issue 3), a few minutes on one CUDA GPU:
# the `gpu`-marked tests, then the W2 benchmark. Results land in benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTEST=${PYTEST:-.venv/bin/pytest}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
nvidia-smi > "$OUT/gpu-$stamp-nvidia-smi.txt" 2>&1 || true
timeout 240 "$PYTEST" -m gpu tests/ckptd -q -p no:cacheprovider --junitxml="$OUT/gpu-tests-$stamp.xml" \
    2>&1 | tee "$OUT/gpu-tests-$stamp.txt"
tests_rc=${PIPESTATUS[0]}
timeout 480 "$PY" benchmarks/w2_gpu.py --out "$OUT" 2>&1 | tee "$OUT/w2-gpu-$stamp.log"
bench_rc=${PIPESTATUS[0]}
# Trainer throughput/MFU with and without a checkpoint every 10 steps (issue 4), ~355M GPT, < 8 min.
timeout 480 "$PY" benchmarks/train_gpu.py --out "$OUT" 2>&1 | tee "$OUT/train-gpu-$stamp.log"
train_rc=${PIPESTATUS[0]}; echo "train_gpu rc=$train_rc"; bench_rc=$(( bench_rc != 0 || train_rc != 0 ))
echo "gpu tests rc=$tests_rc, w2 rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
