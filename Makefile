# Two commands on a fresh machine (Python 3.10+, pip, make): `make quickstart` and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
WORKDIR ?= runs/quickstart

.PHONY: install quickstart test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

quickstart: $(STAMP)
	$(PY) -m jaxclf.train --config configs/quickstart.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
