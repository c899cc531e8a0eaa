#!/usr/bin/env bash
# F1 of the cheaper modes (fewer steps, fewer or adaptive members, int8) with the shipped model, on real-dev and
# the first 100 images of the synthetic test; one `diffiml eval --json` per mode into OUT/f1_MODE.json, then the
# table (python -m diffiml.benchmarks.modes OUT). BUNDLE must carry int8 graphs for the int8 rows:
#   diffiml export models/default --out out/bundles/mobile-int8 --precision int8 --calibration data/photo_forgeries/train.json
#   bash benchmarks/modes_accuracy.sh out/bundles/mobile-int8 benchmarks/results/issue11
set -euo pipefail
BUNDLE=${1:?usage: modes_accuracy.sh BUNDLE OUT}
OUT=${2:?usage: modes_accuracy.sh BUNDLE OUT}
REALDEV=${REALDEV:-../shared/data/real-dev/real-dev.json}
SYNTH=${SYNTH:-data/photo_forgeries/test_first100.json}
mkdir -p "$OUT"
run() {
  name=$1; shift
  [ -f "$OUT/f1_$name.json" ] && return
  diffiml eval --bundle "$BUNDLE" --data "$REALDEV" --name real-dev --data "$SYNTH" --name synth-test-100 --json "$@" \
    > "$OUT/f1_$name.json.tmp" && mv "$OUT/f1_$name.json.tmp" "$OUT/f1_$name.json"
}
run fp32_k8_n5 --steps 8 --ensemble 5
run fp32_k5_n5 --steps 5 --ensemble 5
run fp32_k4_n5 --steps 4 --ensemble 5
run fp32_k2_n5 --steps 2 --ensemble 5
run fp32_k8_n3 --steps 8 --ensemble 3
run fp32_k8_n2 --steps 8 --ensemble 2
run fp32_k8_n1 --steps 8 --ensemble 1
run fp32_k4_n3 --steps 4 --ensemble 3
run fp32_k4_n2 --steps 4 --ensemble 2
run fp32_k8_auto --steps 8 --ensemble auto
run fp32_k4_auto --steps 4 --ensemble auto
run fp32_k8_auto_t01 --steps 8 --ensemble auto --ensemble-tolerance 0.01
run fp32_k4_auto_t01 --steps 4 --ensemble auto --ensemble-tolerance 0.01
run int8_k8_n5 --precision int8 --steps 8 --ensemble 5
run int8_k4_auto --precision int8 --steps 4 --ensemble auto
python -m diffiml.benchmarks.modes "$OUT"
