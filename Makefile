# Two commands a newcomer needs: `make demo` and `make check`. Both set everything up first.
# `make test` is the fast suite of every change (minutes); `make check` is what CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vct-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1
# The demo and the tests run Prefect embedded, with a home of their own inside the checkout:
# never a team server's PREFECT_HOME (infra/README.md puts that outside the checkout), never a
# PREFECT_API_URL from the shell, so `make clean` can only ever remove this throwaway database.
export PREFECT_HOME := $(CURDIR)/.embedded-prefect
unexport PREFECT_API_URL
# The tiny test model is built here (workers set VCT_HOME / VCT_MODEL_CACHE themselves).
export VCT_HOME ?= $(CURDIR)/.models

.PHONY: setup demo check test test-slow test-fleet test-reliability lint browser bench bench-quick bench-gpu quality quality-quick clean

setup: $(STAMP)

# torch is pinned in the same pip command, otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

# The mini model restyling procedural shapes (manifests/mini.csv), at the mini preset
# (vct/mini/presets.py: fewer concept updates and fit iterations than the paper's schedule).
demo: $(STAMP)
	$(VENV)/bin/vct run manifests/mini.csv --output demo --model mini \
		$$($(PY) -m vct.mini.presets mini)

lint: $(STAMP)
	$(VENV)/bin/ruff check vct flows tests benchmarks

# The report test opens the pages in Debian's headless Chromium (installed when missing).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) lint browser
	$(PY) -m pytest -q -m "not fleet and not reliability and not slow"

# End-to-end tests of a minute or so together (a real deploy, a killed vct, ...): in make check.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every suite, as CI runs it (.ci/run): the fast one, the slow end-to-end tests, the
# kill-and-resume harness, the fleet.
check: test test-slow test-reliability test-fleet

# A Prefect server, a pool, two workers and moto as subprocesses (minutes): sharded runs for real.
test-fleet: $(STAMP)
	$(PY) -m pytest -q -m fleet

# The slow kill-and-resume harness (tests/test_kill_resume.py), outside `make test`.
test-reliability: $(STAMP)
	$(PY) -m pytest -q -m reliability

# Every benchmark figure side by side in one run (docs/performance.md): prints the table and
# writes benchmarks/results.json; under 15 minutes on 2 CPU cores. `make bench-quick` (or
# BENCH_ARGS=--quick) is a smoke run of every section at toy sizes (written to a temporary file).
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

# On a CUDA node (not part of `make test`): every stage at 512 px on the SD 1.5-architecture
# random model, fp32/fp16/bf16, SDPA on and off -> benchmarks/results-gpu.json (under 8 min).
# GPU_ARGS passes options, e.g. GPU_ARGS="--device cpu --size 64 --quick --model tiny".
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu $(GPU_ARGS)

# Restyling quality on the mini model (docs/quality.md): VCT against img2img at two strengths
# and text-to-image from the concept, on 24 held-out procedural pairs scored against their
# rendered ideal translation; writes benchmarks/quality.json, docs/quality-sheet.png and the
# table of docs/quality.md (under 30 minutes on 2 CPU cores). Not part of `make test`.
quality: $(STAMP)
	$(PY) benchmarks/quality.py $(QUALITY_ARGS)

quality-quick: $(STAMP)
	$(PY) benchmarks/quality.py --quick $(QUALITY_ARGS)

clean:
	rm -rf demo .models .embedded-prefect .pytest_cache
