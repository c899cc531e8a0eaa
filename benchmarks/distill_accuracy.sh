#!/usr/bin/env bash
# The distilled students against their teacher, model alone (--no-copy-move), on real-dev with its untouched originals
# and on the synthetic test: one `diffiml eval --json --rows` per mode into OUT/, then the table
# (python -m diffiml.benchmarks.distill_table OUT). BUNDLE carries the teacher and its students:
#   diffiml export models/default --out out/bundles/distilled --student runs/distill/steps-4/checkpoint \
#       --student runs/distill/steps-2/checkpoint
#   bash benchmarks/distill_accuracy.sh out/bundles/distilled benchmarks/results/distill
set -euo pipefail
BUNDLE=${1:?usage: distill_accuracy.sh BUNDLE OUT}
OUT=${2:?usage: distill_accuracy.sh BUNDLE OUT}
REALDEV=${REALDEV:-../shared/data/real-dev/real-dev-with-authentic.json}
SYNTH=${SYNTH:-data/synth_test.json}
ROWS=${ROWS:-out/distill_rows}  # per-image rows name this machine's files: kept out of the repository
mkdir -p "$OUT" "$ROWS"
run() {
  name=$1; shift
  [ -f "$OUT/$name.json" ] && return
  diffiml eval --bundle "$BUNDLE" --data "$REALDEV" --name real-dev --data "$SYNTH" --name synth-test --json \
    --no-copy-move --backend ort-cpu --rows "$ROWS/rows_$name.jsonl" "$@" > "$OUT/$name.json.tmp"
  mv "$OUT/$name.json.tmp" "$OUT/$name.json"
}
run teacher_k8_n5 --steps 8 --ensemble 5
run student_k2_n3 --steps 2 --ensemble 3
run student_k2_n5 --steps 2 --ensemble 5
run student_k4_n3 --steps 4 --ensemble 3
run student_k2_auto --steps 2 --ensemble auto
python -m diffiml.benchmarks.distill_table "$OUT"
