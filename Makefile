# The two commands of the README. Both set up .venv (once) from setup.py, then run.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: setup
	$(PY) -m seal_fast.train --amp --channels-last

test: setup
	$(PY) -m pytest -q tests
