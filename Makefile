# `make demo` and `make test` set everything up themselves on a fresh machine (a .venv here).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test proto bench chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this disk (an open range would fetch a CUDA build).
	$(PY) -m pip install -q -c constraints-dev.txt torch
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[train,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m loradrop.demo

test: setup
	$(PY) -m pytest

proto: setup
	$(PY) proto/generate.py

bench: setup
	$(PY) -m bench

chaos: setup
	$(PY) bench/chaos.py --jobs 12 --kills 40 --steps 10 --seed 1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
