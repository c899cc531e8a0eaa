#!/usr/bin/env bash
# Every GPU measurement in one command, on the GPU machine (../shared/GPU.md): Python 3.12 with its own torch and
# CUDA, no package registry, onnxruntime there CPU-only. It installs nothing from the network: onnxruntime-gpu comes
# from the wheel parts that benchmarks/gpu/prepare_wheel.sh makes here and that travel in .gpu-cache/.
#
#   bash benchmarks/gpu/run.sh OUT_DIR              # on the GPU machine, from the repository root
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR    # anywhere: the same steps, small, ort-cpu standing in for ort-cuda
#
# Writes into OUT_DIR: environment.json, export_mobile.json, check_mobile.json (ort-cuda vs ort-cpu, fp32 and fp16),
# table4_* folders (paper config with random weights, and the shipped model; batch 1 and a throughput batch), run.log.
set -euo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu/run.sh [--dry-run] OUT_DIR}
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

log "environment"
"$PY" -c "import json; from diffiml.benchmarks.gpu_check import environment; print(json.dumps(environment(), indent=2))" \
  > "$OUT/environment.json"

log "export the shipped model, fp32 + fp16 graphs"
diffiml export models/default --out "$CACHE/bundles/mobile" --precision fp32,fp16 > "$OUT/export_mobile.json"

log "$DEVICE against ort-cpu fp32 on the same inputs"
diffiml bench gpu-check --bundle "$CACHE/bundles/mobile" --backend "$DEVICE" --out "$OUT/check_mobile.json" \
  || log "check FAILED: see check_mobile.json"

for batch in $BATCHES; do
  log "table 4: $CONFIG config (random weights), batch $batch"
  diffiml bench table4 --config "$CONFIG" --backends "$BACKENDS" --precisions fp32,fp16 --ensemble "$ENSEMBLES" \
    --batch "$batch" --runs "$RUNS" --warmup "$WARMUP" --out "$OUT/table4_${CONFIG}_b${batch}" > /dev/null
  log "table 4: the shipped model, batch $batch"
  diffiml bench table4 --config mobile --bundle "$CACHE/bundles/mobile" --backends "$BACKENDS" \
    --precisions fp32,fp16 --ensemble "$ENSEMBLES" --batch "$batch" --runs "$RUNS" --warmup "$WARMUP" \
    --out "$OUT/table4_mobile_b${batch}" > /dev/null
done
log "done"
