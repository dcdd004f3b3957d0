#!/usr/bin/env bash
# The GPU checks of ckptd in one script, sized for one lent CUDA machine (about 15 minutes of
# device time per session, at most 10 minutes per command): run it as
#
#   bash benchmarks/gpu_check.sh            # everything, ~9 minutes
#   bash benchmarks/gpu_check.sh tests w2   # a subset: tests | w2 | train
#
# 1. the `gpu`-marked tests (CUDA streams, events, pinned pool, per-optimizer waits),
# 2. W2 (BENCHMARKS.md): checkpoint stall of the snapshot engine vs torch.save / DCP / idealised copy,
# 3. the trainer's tokens/s and MFU with and without a checkpoint every 10 steps (~355M GPT).
# Results and logs land in benchmarks/results/ (or $OUT). On a lent machine without ckptd's
# dependencies: `bash benchmarks/device_wheels.sh` here, then carry .whl and run
# `bash benchmarks/device_run.sh` there (rehearsed on CPU with a venv holding only the image's packages).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTEST=${PYTEST:-.venv/bin/pytest}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests w2 train)
nvidia-smi > "$OUT/gpu-$stamp-nvidia-smi.txt" 2>&1 || true
rc=0
for part in "${parts[@]}"; do
  case "$part" in
    tests)
      timeout 150 $PYTEST -m gpu tests/engine/test_engine_gpu.py -q -p no:cacheprovider --junitxml="$OUT/gpu-tests-$stamp.xml" \
        2>&1 | tee "$OUT/gpu-tests-$stamp.txt"
      r=${PIPESTATUS[0]} ;;
    w2)
      timeout 240 $PY benchmarks/w2_gpu.py --out "$OUT" 2>&1 | tee "$OUT/w2-gpu-$stamp.log"
      r=${PIPESTATUS[0]} ;;
    train)
      timeout 180 $PY benchmarks/train_gpu.py --steps 30 --out "$OUT" 2>&1 | tee "$OUT/train-gpu-$stamp.log"
      r=${PIPESTATUS[0]} ;;
    *) echo "unknown part $part (tests, w2, train)"; r=2 ;;
  esac
  echo "gpu_check: $part rc=$r"
  [ "$r" -ne 0 ] && rc=1
done
exit $rc
