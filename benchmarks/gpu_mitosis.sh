#!/usr/bin/env bash
# AMi-Br at the published scale on one CUDA GPU: configs/mitosis_amibr_gpu.yaml on the
# published split (P1), seed 0, for `none` and one other method (default `lstainnorm`; pass the
# best method of the CPU tables). Records, tables and the card go to OUT_DIR.
#
#   bash benchmarks/gpu_mitosis.sh [OUT_DIR] [METHOD] [SECONDS]  (default bench_out/gpu lstainnorm 540)
#
# `bench.py mitosis` is resumable: a run cut by the time limit (SIGTERM) keeps its last checkpoint in
# OUT_DIR/mitosis/runs and the same command continues it. Extra `--set KEY=VALUE` overrides may
# follow in $GPU_MITOSIS_SET (e.g. "trainer.max_epochs=30" where the device time is short).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
METHOD=${2:-lstainnorm}
LIMIT=${3:-540}
PY=${PYTHON:-python3}
DATA=${LSTAINNORM_SHARED_DATA:-$(cd .. && pwd)/shared/data}/ami-br
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
sets=()
for kv in ${GPU_MITOSIS_SET:-}; do sets+=(--set "$kv"); done

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} | tee "$OUT/device.txt"

echo "== AMi-Br P1, configs/mitosis_amibr_gpu.yaml, seed 0: none and $METHOD (limit ${LIMIT} s)"
timeout --signal=TERM --kill-after=60 "$LIMIT" "$PY" benchmarks/bench.py mitosis --data "$DATA" \
  --config configs/mitosis_amibr_gpu.yaml --protocols p1 --methods none "$METHOD" --seeds 0 \
  --set trainer.progress=false "${sets[@]}" --out "$OUT" 2>&1 | tee "$OUT/mitosis_gpu.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "gpu_mitosis: stopped with rc $rc (124: the time limit; rerun the same command to resume)"
  exit "$rc"
fi
echo "gpu_mitosis: done; tables in $OUT/mitosis/mitosis.md"
