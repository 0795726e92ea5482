#!/usr/bin/env bash
# The long comparisons behind the README's advice, with the steady recipe and five seeds, through
# `lstainnorm compare` (resumable: rerun the same line to continue; records in OUT/results.jsonl).
# About 5 minutes per AMi-Br run and 10-15 per MoNuSeg run on 2 CPU cores: run one block per session
# and copy OUT/results.jsonl (and OUT/failures.jsonl) into benchmarks/results/evidence/<name>/.
#   bash benchmarks/evidence.sh amibr-p1 | amibr-p2 | monuseg   [OUT]
# METHODS="none template" SEEDS="0 1" narrow a session's share; a later call with the full lists adds the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
LSN=${LSN:-.venv/bin/lstainnorm}
MIDOG=midog21-hamamatsu-xr,midog21-hamamatsu-s360,midog21-aperio-cs2
# The best augmentation was chosen on validation per protocol before (randstainna on P1, hed-jitter on one P2
# direction): both run.
METHODS=${METHODS:-"none template template@centre lstainnorm lstainnorm@centre macenko hed-jitter randstainna"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
case "${1:-}" in
  amibr-p1)
    $LSN compare configs/mitosis_amibr_cpu.yaml \
      --methods $METHODS --seeds $SEEDS --protocol split -o "${2:-evidence_out/amibr-p1}" ;;
  amibr-p2)
    $LSN compare configs/mitosis_amibr_cpu.yaml \
      --methods $METHODS --seeds $SEEDS --protocol "$MIDOG->tupac16" "tupac16->$MIDOG" -o "${2:-evidence_out/amibr-p2}" ;;
  monuseg)
    $LSN compare configs/segment_monuseg_cpu.yaml --methods ${METHODS_SEG:-none template lstainnorm macenko hed-jitter randstainna} --seeds $SEEDS \
      -o "${2:-evidence_out/monuseg}" ;;
  *) echo "usage: bash benchmarks/evidence.sh amibr-p1|amibr-p2|monuseg [OUT]" >&2; exit 2 ;;
esac
