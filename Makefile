# Two commands: `make run` (set up, then run the whole pipeline) and `make test` (set up, then run the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# CPU build by default; a GPU machine installs a CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
export PATH := $(BIN):$(PATH)
# Offline and quiet by default (rlhf_core/runtime.py sets the same for Python entry points).
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_HOME ?= $(CURDIR)/.work/prefect
WORK := $(CURDIR)/.work
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
# Paths compileall leaves out (a regular expression searched in each file's path).
COMPILE_SKIP := /tests?/|/transformers/models/(?!(auto|llama|bloom|encoder_decoder)/|__init__\.py$$)

.PHONY: setup run test serve ui lint clean-work help

help:
	@echo "make run    - set up .venv and run the whole pipeline (Prefect flow over the DVC stages)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make serve  - start a local Prefect server and a worker for scheduled retraining"
	@echo "make ui     - start the MLflow UI and the Prefect UI on 127.0.0.1"
	@echo "make lint   - lint the Dockerfile"

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-compile -c requirements/constraints.txt -e '.[dev]'
	@# Byte-compile once on every core (pip compiles file by file on one: 89 s -> 63 s of setup on 2 cores), less what
	@# no process imports: the packages' own test suites and the ~400 model families of transformers other than
	@# those loaded here (62 s -> 33 s; a module left out still imports, compiled in memory). A few files written for
	@# newer Pythons fail to compile, as they do under pip; that is no error (leading '-').
	-$(BIN)/python -m compileall -qq -j 0 -x '$(COMPILE_SKIP)' $(VENV)/lib
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m flows.pipeline

test: setup
	$(BIN)/python -m pytest

# A local Prefect server plus the worker that executes scheduled retraining runs (Ctrl+C stops both).
serve: setup
	@mkdir -p $(WORK)/logs
	@prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > $(WORK)/logs/prefect-server.log 2>&1 & \
	server=$$!; trap "kill $$server" EXIT INT TERM; \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT) (log: $(WORK)/logs/prefect-server.log)"; \
	until curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null; do sleep 1; done; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api rlhf schedule

# The MLflow UI (job workers off: 0.3 GB instead of 2.4 GB) and the Prefect UI, both on 127.0.0.1.
ui: setup
	@mkdir -p $(WORK)/logs $(WORK)/mlartifacts
	@MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(WORK)/mlflow.db \
	    --default-artifact-root $(WORK)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) \
	    > $(WORK)/logs/mlflow-ui.log 2>&1 & \
	mlflow=$$!; trap "kill $$mlflow" EXIT INT TERM; \
	echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning  (model-training view)"; \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (Ctrl+C stops both)"; \
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

lint: setup
	$(BIN)/hadolint Dockerfile

clean-work:
	rm -rf .work
