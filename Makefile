# Fresh machine: only python3, pip and make are needed. Targets are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DATA := data/demo
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
NPROC ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
# DeepSpeed's JIT op cache, one per venv (a cache shared between venvs is rebuilt and locked by each).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv test test-fast demo bench lint format clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 tests

test-fast: venv  # unit tests without the multi-process ones (under two minutes)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

$(DEMO_DATA)/train/info.json: | venv
	$(BIN)/python -m dissect_ds.prepare synthetic --num-samples 3000 --noise-rate 0.3 --seed 0 --val-samples 1000 --output $(DEMO_DATA)

demo: venv $(DEMO_DATA)/train/info.json
	rm -rf runs/demo
	$(BIN)/deepspeed --num_gpus $(NPROC) --master_port $$($(BIN)/python -c 'from dissect_ds.distributed import free_port; print(free_port())') \
		--module dissect_ds.train --config configs/demo.yaml
	$(BIN)/python -m dissect_ds.summary runs/demo

bench: venv
	$(BIN)/python -m benchmarks.run_all

lint: venv
	$(BIN)/ruff check dissect_ds tests benchmarks
	$(BIN)/ruff format --check dissect_ds tests benchmarks

format: venv
	$(BIN)/ruff format dissect_ds tests benchmarks
	$(BIN)/ruff check --fix dissect_ds tests benchmarks

clean:
	rm -rf runs data/demo data/debug
