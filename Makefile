# sdxl-ablate: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# The tiny model's ops are microseconds long: one thread per op is fastest, and OpenMP's
# spinning threads slow a busy 2-core machine down many times over.
CPU_ENV := OMP_NUM_THREADS=1

.PHONY: install test test-fast test-gpu demo study mlflow-ui ui-check report plan bench fidelity clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The whole test suite on the CPU (GPU tests are skipped without CUDA).
test: install
	$(CPU_ENV) $(BIN)/python -m pytest -q

test-fast: install
	$(CPU_ENV) $(BIN)/python -m pytest -q -m "not slow"

## Only the tests that need a CUDA GPU (the memory cap, graphs, bench, resume on the GPU).
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

## The study's six variants on the tiny model and the sample data (CPU, offline), then its report.
## SEEDS=0,1,2 runs every variant with each seed (mean and spread in the report).
demo: install
	$(CPU_ENV) $(BIN)/python -m sdxl_ablate -m sweep=naruto_study experiment=demo $(if $(SEEDS),trainer.seed=$(SEEDS))
	$(BIN)/python -m sdxl_ablate.report --study demo

## The real study: SDXL base on the Naruto dataset (needs the hub or local copies, and a GPU).
study: install
	$(BIN)/python -m sdxl_ablate -m sweep=naruto_study
	$(BIN)/python -m sdxl_ablate.report --study naruto_study

report: install
	$(BIN)/python -m sdxl_ablate.report --study $(or $(STUDY),demo)

## The MLflow UI over the same store, on http://127.0.0.1:5000
mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

## The study in the real MLflow UI (headless chromium: apt-get update && apt-get install -y chromium):
## screenshots into reports/<study>/ui/, non-zero exit if a run is RUNNING, headline metrics or the report view are missing.
ui-check: install
	$(BIN)/python -m tests.e2e.ui_check --study $(or $(STUDY),demo)

## Dry run: parameter counts and the memory prediction, e.g. make plan ARGS="model=sdxl_random lora.targets=all"
plan: install
	$(BIN)/python -m sdxl_ablate.plan $(ARGS)

## GPU benchmark on the full-size SDXL architecture (random weights); results as JSON under results/
bench: install
	$(BIN)/python -m sdxl_ablate.bench $(ARGS)

## README's fidelity tables (recipes and study vs their write-ups), regenerated from the composed configs.
fidelity: install
	$(BIN)/python -m sdxl_ablate.config.fidelity --write

clean:
	rm -rf outputs multirun mlflow.db mlflow.db.lock mlartifacts reports checkpoints
