#!/usr/bin/env bash
# GPU check, at most ~8 minutes on one CUDA GPU: the CUDA tests, the layer table at batch 64 and 256
# in float32 and bf16 autocast, the training-step table, and a short MoNuSeg run of
# configs/segment_monuseg_gpu.yaml. Tables and logs go to OUT_DIR (default bench_out/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs lstainnorm's dependencies in $PYTHON (default python3) and the MoNuSeg images under
# $LSTAINNORM_SHARED_DATA/monuseg-train (default ../shared/data). Each part runs under its own
# time limit; the script exits non-zero if any part failed, after running the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
PY=${PYTHON:-python3}
export LSTAINNORM_SHARED_DATA=${LSTAINNORM_SHARED_DATA:-$(cd .. && pwd)/shared/data}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
failed=()

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} | tee "$OUT/device.txt"

echo "== CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_fusion.py tests/test_norm.py tests/test_backward.py -k cuda 2>&1 | tee "$OUT/cuda_tests.txt" || failed+=(cuda-tests)
grep -q "skipped" "$OUT/cuda_tests.txt" && grep -q "no CUDA" "$OUT/cuda_tests.txt" && failed+=(cuda-tests-skipped)

echo "== layer and training-step tables"
timeout 300 "$PY" benchmarks/bench_gpu.py --device cuda --batches 64 256 --compile-batches 64 --train-batch 64 --repeats 5 --out "$OUT" 2>"$OUT/bench_gpu.log" || failed+=(tables)
cat "$OUT/gpu_tables.md" 2>/dev/null

echo "== short MoNuSeg segmentation run (configs/segment_monuseg_gpu.yaml, 3 epochs)"
RUNS=$(mktemp -d)
timeout 150 "$PY" -m lstainnorm.cli train configs/segment_monuseg_gpu.yaml \
  "segmentation.root=$LSTAINNORM_SHARED_DATA/monuseg-train" "output_path=$RUNS" \
  trainer.max_epochs=3 trainer.progress=false segmentation.samples_per_image=16 > "$OUT/segment.log" 2>&1 || failed+=(segmentation)
tail -n 15 "$OUT/segment.log"
run=$(ls -d "$RUNS"/*/ 2>/dev/null | head -n 1)
[ -n "$run" ] && cp "$run/metrics.json" "$OUT/segment_metrics.json" 2>/dev/null
rm -rf "$RUNS"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED parts: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all parts ran; tables in $OUT"
