# Two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vct-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1
# Embedded Prefect and the tiny model live inside the checkout, not in $HOME.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export VCT_HOME ?= $(CURDIR)/.models

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch is pinned in the same pip command, otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vct run manifests/example.csv --output demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vct flows tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf demo .models .prefect .pytest_cache
