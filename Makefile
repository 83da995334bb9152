# Two commands on a fresh machine (Python 3.10+, pip, make): `make quickstart` and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
WORKDIR ?= runs/quickstart

.PHONY: install quickstart test test-all test-slurm clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

quickstart: $(STAMP)
	$(PY) -m jaxclf.train --config configs/quickstart.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not slurm" tests

# A real one-node SLURM cluster on this machine (needs root for apt-get the first time).
test-slurm: $(STAMP)
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm)
	$(PY) -m pytest -q -m slurm tests/test_launch.py

clean:
	rm -rf runs .pytest_cache
