# `make demo` and `make test` set everything up on a fresh machine (Python 3.11), then run.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(PY) run_recbole.py --model=LayerSelLLM --dataset=ml-100k

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q
