# `make repro` and `make test` each set everything up first (idempotent), then run.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export DPO_PIPELINE_CACHE ?= $(CURDIR)/.cache/dpo-pipeline
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test test-all

setup:
	bash scripts/setup.sh

repro: setup
	bash scripts/ensure_dvc.sh
	dvc repro

test: setup
	python -m pytest -m "not slow" -q

test-all: setup
	python -m pytest -q
