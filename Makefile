# protoserve: the two commands README promises do all set-up themselves.
#   make serve   create .venv, install, build the kernels, start the server
#   make test    same set-up, then lint, type-check and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# AUTO builds the CUDA kernels when nvcc is found; CI sets ON.
PROTOSERVE_CUDA ?= AUTO
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
ifneq ($(NVCC),)
export CUDACXX ?= $(NVCC)
endif
export PROTOSERVE_CUDA
# One environment for serving, tests and benchmarks (the serving path itself
# never imports torch: tests check that in a subprocess).
EXTRAS ?= dev,train
SOURCES := $(shell find csrc server training -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name 'CMakeLists.txt' \) 2>/dev/null)
STAMP := $(VENV)/.protoserve-$(EXTRAS)-$(PROTOSERVE_CUDA)

.PHONY: model-validate setup data bench-tools serve test lint typecheck pytest bench model clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Build dependencies are installed first so the editable build runs without
# isolation (fast incremental rebuilds in build/).
$(STAMP): $(VENV)/bin/python pyproject.toml $(SOURCES)
	$(PIP) install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.24" ninja
	$(PIP) install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.protoserve-*
	@touch $@

# Fashion-MNIST for the training tests and docs/results.md: Debian's package (as root or via sudo).
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# h2load (nghttp2), the native load generator of bench/serving.py (Debian's package).
bench-tools:
	@command -v h2load >/dev/null || $(SUDO) apt-get install -y -q nghttp2-client || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nghttp2-client; }

serve: setup
	@echo "protoserve: gRPC on 127.0.0.1:50051, Prometheus metrics on :9090, models from ./models, state in ./data"
	@echo "Try, in another shell (docs/api.md):"
	@echo "  .venv/bin/protoserve collections create demo --model omniglot-protonet"
	@echo "  .venv/bin/protoserve register --collection demo --class alpha examples/greek-char01-support.png"
	@echo "  .venv/bin/protoserve register --collection demo --class beta examples/greek-char02-support.png"
	@echo "  .venv/bin/protoserve classify --collection demo examples/greek-char01-query.png --json"
	$(VENV)/bin/protoserve serve --host 127.0.0.1 --port 50051 --data-dir data --model-repo models --metrics-port 9090

lint: setup
	$(VENV)/bin/ruff check server training tests bench
	$(VENV)/bin/ruff format --check server training tests bench

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup data bench-tools
	$(PY) -m pytest -q -p no:cacheprovider

test: lint typecheck pytest

bench: setup
	$(PY) bench/kernels.py
	$(PY) bench/backbones.py

# The bundled default model (docs/omniglot-model.md): retrains from the two
# Omniglot background zips only (all 242 characters), exports with test-time
# view averaging (9 shifts x 3 small turns) and the ink crop, and scores sample_run. About 47
# minutes on 2 cores (a GPU, if torch sees one, trains it in a few minutes).
# `make model-validate` runs the same recipe with two whole alphabets held out
# (Greek, Korean) and scores 20-way within-alphabet one-shot episodes on them,
# with and without view averaging: the evidence the recipe was chosen on.
MODEL_RUN ?= runs/omniglot-protonet
MODEL_DIR ?= models/omniglot-protonet
MODEL_EPISODES ?= 9000
MODEL_SHIFT ?= 3
MODEL_ROTATE ?= 10
# Trained with the ink crop (the square around each drawing), and with mirrored characters as
# extra classes (docs/omniglot-model.md, "The ink crop" and "Mirrored characters"). The
# checkpoint carries its crop, and export serves what it trained with.
MODEL_CROP ?= --crop ink --ink-margin 0.15
# torch threads for training (1 when another job shares the machine's 2 cores)
MODEL_THREADS ?= 2
# bf16: the backbone trains under bfloat16 autocast (fast on CPUs with AVX512-BF16 or AMX and on
# GPUs; elsewhere fp32 is faster); distances and losses stay float32 either way
MODEL_PRECISION ?= bf16
MODEL_RECIPE = --backbone conv4 --method protonet --distance l2 --size 32 --way 60 --shot 1 \
  --query 5 --lr 1e-3 --schedule cosine --warmup 100 --degrees 10 --translate 0.08 \
  --scale 0.9 1.1 --shear 8 --stroke 0.4 --mirror $(MODEL_CROP) --aux-weight 0.5 \
  --checkpoint-every 250 --seed 0 --threads $(MODEL_THREADS) --precision $(MODEL_PRECISION)
HELD_OUT = --split-by superclasses --val-fraction 0.2
PROXY = --way 20 --within-alphabet --split-drawers --query 5 --episodes 1000 --seed 1
model: setup
	$(VENV)/bin/protoserve train metatrain --out $(MODEL_RUN) --restart $(MODEL_RECIPE) \
	  --episodes $(MODEL_EPISODES) --val-fraction 0 --val-every 0
	$(VENV)/bin/protoserve train export --checkpoint $(MODEL_RUN)/checkpoint.pt --out $(MODEL_DIR) \
	  --overwrite --shift-average $(MODEL_SHIFT) --rotate-average $(MODEL_ROTATE)
	$(VENV)/bin/protoserve train eval-runs --model $(MODEL_DIR)

model-validate: setup
	$(VENV)/bin/protoserve train metatrain --out $(MODEL_RUN)-heldout --restart $(MODEL_RECIPE) \
	  --episodes $(MODEL_EPISODES) $(HELD_OUT) --val-every 1000 --val-way 20 \
	  --val-within-alphabet --val-split-drawers --val-episodes 500
	$(VENV)/bin/protoserve train export --checkpoint $(MODEL_RUN)-heldout/checkpoint.pt \
	  --out $(MODEL_RUN)-heldout/plain --overwrite
	$(VENV)/bin/protoserve train export --checkpoint $(MODEL_RUN)-heldout/checkpoint.pt \
	  --out $(MODEL_RUN)-heldout/shifted --overwrite --shift-average $(MODEL_SHIFT) \
	  --rotate-average $(MODEL_ROTATE)
	$(VENV)/bin/protoserve train evaluate --model $(MODEL_RUN)-heldout/plain $(HELD_OUT) $(PROXY)
	$(VENV)/bin/protoserve train evaluate --model $(MODEL_RUN)-heldout/shifted $(HELD_OUT) $(PROXY)
	for T in "" --transductive; do $(VENV)/bin/protoserve train evaluate \
	  --model $(MODEL_RUN)-heldout/shifted $(HELD_OUT) $(PROXY) --query 1 $$T || exit 1; done
	$(VENV)/bin/protoserve train evaluate --model $(MODEL_RUN)-heldout/shifted $(HELD_OUT) \
	  --way 5 --episodes 1000 --seed 1
	$(VENV)/bin/protoserve train evaluate --model $(MODEL_RUN)-heldout/shifted $(HELD_OUT) \
	  --way 20 --episodes 1000 --seed 1

clean:
	rm -rf build $(VENV)
