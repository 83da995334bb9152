# Two commands on a fresh machine (Python 3.10+, pip, make): `make quickstart` and `make test`.
# Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Stamps keyed on pyproject.toml: the runtime install, and on top of it the test extra.
HASH := $(shell cksum pyproject.toml | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
STAMP := $(VENV)/.installed-test-$(HASH)
WORKDIR ?= runs/quickstart
# TFLite conversion (jaxclf.export --format tflite): litert-converter in an environment of its own, since its xdsl
# pins typing-extensions below the project's stack; jaxclf.deploy.litert finds it here (or at $$JAXCLF_LITERT_PYTHON).
LITERT_VENV := .venv-litert
LITERT_CONVERTER_VERSION := 0.5.0
LITERT_STAMP := $(LITERT_VENV)/.installed-litert-converter-$(LITERT_CONVERTER_VERSION)

.PHONY: install litert-venv quickstart test test-all test-slurm test-browser clean

install: $(STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	rm -f $(VENV)/.installed-* && touch $@

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e ".[test,serve,onnx,litert,timm,search,fastjpeg,wandb,mlflow]"
	touch $@

litert-venv: $(LITERT_STAMP)

$(LITERT_STAMP):
	test -x $(LITERT_VENV)/bin/python || $(PYTHON) -m venv $(LITERT_VENV)
	$(LITERT_VENV)/bin/python -m pip install --quiet "litert-converter==$(LITERT_CONVERTER_VERSION)"
	rm -f $(LITERT_VENV)/.installed-* && touch $@

quickstart: $(RUN_STAMP)
	$(PY) -m jaxclf.train --config configs/quickstart.py --workdir $(WORKDIR)

test: $(STAMP) $(LITERT_STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not slurm" tests

test-all: $(STAMP) $(LITERT_STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 -m "not slurm" tests

# A real one-node SLURM cluster on this machine (needs root for apt-get the first time).
test-slurm: $(STAMP)
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm)
	$(PY) -m pytest -q -m slurm tests/test_launch.py tests/test_search.py

# The demo page in headless Chromium (Debian's chromium + chromium-driver; needs root for apt-get the first time).
test-browser: $(STAMP)
	command -v chromedriver >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -q tests/test_serve_browser.py

clean:
	rm -rf runs .pytest_cache
