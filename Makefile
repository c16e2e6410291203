# `make repro`, `make lint` and `make test` each set everything up first (idempotent), then run;
# the test targets run the quality gates (`make lint`: ruff and mypy) before the tests.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export DPO_PIPELINE_CACHE ?= $(CURDIR)/.cache/dpo-pipeline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro lint test test-all test-slow

setup:
	bash scripts/setup.sh

# dvc repro, then the pages generated from its figures (docs/results.md, reports/bench/README.md).
repro: setup
	bash scripts/ensure_dvc.sh
	dvc repro
	python -m pipeline.pages

# Lint and format check (ruff) and type check (mypy), configured in pyproject.toml.
lint: setup
	ruff check pipeline stages tests
	ruff format --check pipeline stages tests
	mypy

# Two workers (pytest-xdist), one test file each at a time: the suite is mostly stage and DVC
# subprocesses, and module fixtures (the e2e repo, the vLLM engine) stay on one worker.
# Random order (pytest-randomly): `make test SEED=<n>` repeats the order a run printed.
ifndef SEED
SEED := $(shell python3 -c 'import random; print(random.randrange(10**9))')
endif

test: setup lint
	@echo "test order: --randomly-seed=$(SEED)"
	python -m pytest -m "not slow" -q -n 2 --dist loadfile --no-loadscope-reorder -p randomly --randomly-seed=$(SEED)

test-all: setup lint
	@echo "test order: --randomly-seed=$(SEED)"
	python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -p randomly --randomly-seed=$(SEED)

test-slow: setup lint
	@echo "test order: --randomly-seed=$(SEED)"
	python -m pytest -m slow -q -n 2 --dist loadfile --no-loadscope-reorder -p randomly --randomly-seed=$(SEED)
