# The project's front door. `make run` and `make test` build the environment from uv.lock
# first (once: a second call finds it up to date and installs nothing).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
# `make run GPU=1` (or env/test) adds the CUDA libraries: the `gpu` extra of pyproject.toml.
GPU ?=
SYNC_FLAGS := --frozen --python 3.11 $(if $(GPU),--extra gpu)
SYNCED := $(VENV)/.synced$(if $(GPU),-gpu)
MIRROR_DIR := /usr/share/datasets/fashion-mnist

# Every recipe (and every DVC stage it starts) uses the project's environment.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# Compiled bytecode at install: this environment may forbid writing .pyc at run time, and
# importing TensorFlow from source costs ~15 s per process.
export UV_COMPILE_BYTECODE := 1
export UV_PYTHON_DOWNLOADS := automatic
export TF_CPP_MIN_LOG_LEVEL := 2
# No analytics from any tool (Prefect and DVC also say so in prefect.toml and .dvc/config).
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

# The Prefect server of `make ui`, which `make serve` serves the deployment against.
PREFECT_HOST := 127.0.0.1
PREFECT_PORT ?= 4200
PREFECT_URL := http://$(PREFECT_HOST):$(PREFECT_PORT)/api

.PHONY: help env mirror run ui serve test bench lint clean-env

help:
	@echo "make run    - run the pipeline: the Prefect flow dcgan-pipeline, embedded (no server needed)"
	@echo "make ui     - the Prefect server and UI on http://$(PREFECT_HOST):$(PREFECT_PORT)"
	@echo "make serve  - serve the scheduled deployment dcgan-pipeline/nightly (needs make ui running)"
	@echo "make test   - run the test suite"
	@echo "make bench  - run the benchmarks (~30 min; ingests the data and trains the classifier first if needed)"
	@echo "make lint   - ruff check and format check"
	@echo "make env    - only build the environment (.venv) from uv.lock"
	@echo "add GPU=1 to any of them to install TensorFlow's CUDA libraries too"

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(SYNCED): uv.lock pyproject.toml | $(UV)
	$(UV) sync $(SYNC_FLAGS)
	@rm -f $(VENV)/.synced*
	@touch $@

env: $(SYNCED)

mirror:
	@scripts/ensure_mirror.sh $(MIRROR_DIR)

# The flow with Prefect's embedded defaults: a temporary local API for this run (or the
# server of `make ui` on 127.0.0.1:4200 when it is up), its record kept in ~/.prefect.
# Every DVC stage in DAG order, then the run saved as a DVC experiment.
# Options: `make run ARGS="--set train.epochs=1 --experiment quick"`.
run: env mirror
	python -m flows.pipeline $(ARGS)

ui: env
	prefect server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

serve: env mirror
	PREFECT_API_URL=$(PREFECT_URL) python -m flows.serve

test: env mirror
	pytest

bench: env mirror
	dvc repro ingest validate classifier
	python benchmarks/validate_speed.py
	python benchmarks/train_throughput.py --profile
	python benchmarks/evaluate_speed.py
	python benchmarks/quality_vs_tutorial.py

lint: env
	ruff check . && ruff format --check .

clean-env:
	rm -rf $(VENV) $(TOOLS)
