#!/usr/bin/env bash
# Every GPU measurement in one command, on the GPU machine (../shared/GPU.md): Python 3.12 with its own torch and
# CUDA, no package registry, onnxruntime there CPU-only. It installs nothing from the network: onnxruntime-gpu comes
# from the wheel parts that benchmarks/gpu/prepare_wheel.sh makes here and that travel in .gpu-cache/.
#
#   bash benchmarks/gpu/run.sh OUT_DIR [STEP...]            # on the GPU machine, from the repository root
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR [STEP...]  # anywhere: the same steps, small, ort-cpu for ort-cuda
#
# STEPs (default: all, in this order), each sized to fit one 10-minute device call, so a session can run them one call
# at a time and get back what each measured: `setup` (environment.json, export_mobile.json), `check`
# (check_mobile.json: ort-cuda vs ort-cpu, fp32 and fp16), and `table4:CONFIG:BATCH` for CONFIG in paper (random
# weights) / mobile (the shipped model) and BATCH 1 / 8 (table4_CONFIG_bBATCH folders). A step that fails is logged
# in run.log and the next step still runs; the exit status is the number of failed steps. Later steps reuse the
# bundle `setup` exported into the cache folder.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu/run.sh [--dry-run] OUT_DIR [STEP...]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=${DIFFIML_GPU_CACHE:-$REPO/.gpu-cache}
PY=${PYTHON:-python3}
mkdir -p "$CACHE"
log() { echo "[gpu/run.sh $(date +%T)] $*" | tee -a "$OUT/run.log" >&2; }

# 1. onnxruntime-gpu from the carried parts, installed from the local file only.
SITE=""
if ls "$CACHE"/part.* > /dev/null 2>&1; then
  if [ ! -d "$CACHE/site/onnxruntime" ]; then
    cat "$CACHE"/part.* > "$CACHE/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    "$PY" -m pip install -q --no-index --no-deps --target "$CACHE/site" "$CACHE"/onnxruntime_gpu-*.whl
  fi
  SITE="$CACHE/site"
  log "onnxruntime-gpu from $SITE"
fi

# 2. The project on PYTHONPATH, not installed: its subpackages live in top-level folders, so a package folder of links.
PKG="$CACHE/pkg/diffiml"
rm -rf "$CACHE/pkg"
mkdir -p "$PKG"
for f in "$REPO"/diffiml/*.py; do ln -s "$f" "$PKG/"; done
for sub in train export runtime benchmarks; do ln -s "$REPO/$sub" "$PKG/$sub"; done
export PYTHONPATH="$CACHE/pkg${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO"
diffiml() { "$PY" -m diffiml.cli "$@"; }

if [ "$DRY" = 1 ]; then
  DEVICE=ort-cpu; CONFIG=tiny; RUNS=1; WARMUP=0; ENSEMBLES=1; BATCHES="1"
  BACKENDS=torch,torch-authors,torch-fp16,torch-cudagraph,ort-cpu,ort-cuda
else
  DEVICE=ort-cuda; CONFIG=paper; RUNS=20; WARMUP=5; ENSEMBLES=1,5; BATCHES="1 8"
  BACKENDS=torch,torch-authors,torch-fp16,torch-bf16,torch-cudagraph,torch-compile,ort-cuda,tensorrt
fi

if [ "$#" -gt 0 ]; then STEPS=("$@"); else
  STEPS=(setup check)
  for batch in $BATCHES; do STEPS+=("table4:$CONFIG:$batch" "table4:mobile:$batch"); done
fi

step_setup() {
  "$PY" -c "import json; from diffiml.benchmarks.gpu_check import environment; print(json.dumps(environment(), indent=2))" \
    > "$OUT/environment.json" &&
  diffiml export models/default --out "$CACHE/bundles/mobile" --precision fp32,fp16 > "$OUT/export_mobile.json"
}

step_check() {
  diffiml bench gpu-check --bundle "$CACHE/bundles/mobile" --backend "$DEVICE" --out "$OUT/check_mobile.json"
}

step_table4() {  # CONFIG BATCH
  local config=$1 batch=$2 bundle=()
  [ "$config" = mobile ] && bundle=(--bundle "$CACHE/bundles/mobile")
  diffiml bench table4 --config "$config" "${bundle[@]}" --backends "$BACKENDS" --precisions fp32,fp16 \
    --ensemble "$ENSEMBLES" --batch "$batch" --runs "$RUNS" --warmup "$WARMUP" --out "$OUT/table4_${config}_b${batch}" \
    > /dev/null
}

failed=0
for step in "${STEPS[@]}"; do
  log "step $step"
  case "$step" in
    setup) step_setup ;;
    check) step_check ;;
    table4:*:*) IFS=: read -r _ config batch <<< "$step"; step_table4 "$config" "$batch" ;;
    *) log "unknown step $step"; false ;;
  esac
  status=$?
  if [ "$status" != 0 ]; then failed=$((failed + 1)); log "step $step FAILED (exit $status)"; fi
done
log "done: ${#STEPS[@]} step(s), $failed failed"
exit "$failed"
