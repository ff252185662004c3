# `make demo` and `make test` set everything up themselves on a fresh machine (a .venv here).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint eval twin proto bench chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this disk (an open range would fetch a CUDA build).
	$(PY) -m pip install -q -c constraints-dev.txt torch
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[train,caption,ray,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m loradrop.demo

# ruff first: the format and the lint are part of the tests.
test: setup lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

# The learned twin's known-answer figures (a concept LoRA trained, resized, chopped, judged).
eval: setup
	$(PY) -m loradrop.engine.twin.evaluate

# Retrain the learned twin (about an hour on 2 cores; resumable: run it again after a stop).
TWIN_WORK ?= $(HOME)/.cache/loradrop/twin-work
twin: setup
	$(PY) -m loradrop.engine.twin.build --work $(TWIN_WORK) --out engine/models/data/twin/learned-twin.safetensors

proto: setup
	$(PY) proto/generate.py

bench: setup
	$(PY) -m bench

# Local workers, then Ray actors on a loopback test cluster (kills of actors, nodes and the daemon).
chaos: setup
	$(PY) bench/chaos.py --jobs 12 --kills 40 --steps 10 --seed 1
	$(PY) bench/chaos.py --ray --jobs 12 --kills 40 --steps 10 --seed 1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
