#!/usr/bin/env bash
# Here, with a registry: download onnxruntime-gpu 1.31.1 for the GPU machine's Python 3.12 and split it into parts
# that travel one per device call (each call carries .gpuw with one part; the GPU machine keeps .gpu-cache between
# back-to-back calls). See ../shared/GPU.md and the README's "GPU measurements".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx '/.gpuw/' .git/info/exclude 2>/dev/null || printf '/.gpuw/\n/.gpuw-parts/\n/.gpu-cache/\n' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpuw-parts onnxruntime-gpu==1.31.1
split -b 40M -d -a 1 .gpuw-parts/onnxruntime_gpu-*.whl .gpuw-parts/part.
ls -l .gpuw-parts/part.*
echo "for each part K: mkdir -p .gpuw && rm -f .gpuw/* && cp .gpuw-parts/part.K .gpuw/ ; run with carry [.gpuw]:"
echo "  mkdir -p .gpu-cache && cp .gpuw/part.* .gpu-cache/"
echo "then: bash benchmarks/gpu/run.sh \$OUT/gpu && tar czf \$OUT/gpu.tgz -C \$OUT gpu"
