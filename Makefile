# Two commands: `make run` (set up, then run the whole pipeline) and `make test` (set up, then run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# CPU build by default; a GPU machine installs a CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
export PATH := $(BIN):$(PATH)

.PHONY: setup run test serve ui lint clean-work help

help:
	@echo "make run    - set up .venv and run the whole pipeline (Prefect flow over the DVC stages)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make serve  - start a local Prefect server and a worker for scheduled retraining"
	@echo "make ui     - start the MLflow UI and the Prefect UI on 127.0.0.1"
	@echo "make lint   - lint the Dockerfile"

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m flows.pipeline

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/hadolint Dockerfile

clean-work:
	rm -rf .work
