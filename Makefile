# Quickstart: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# 8 fake CPU devices so meshes such as (data=2, fsdp=2, tensor=2) are real in tests (the demo: see below).
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu
# Python keeps the bytecode of what it imports (.venv and alignjax/__pycache__): with
# PYTHONDONTWRITEBYTECODE set (this machine's default), every process compiled jax, torch and
# transformers from source again: 16-20 s to import them against 7 s, in each of the suite's
# dozens of processes.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast install install-test clean distclean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

# One pip call per target (each call resolves every dependency again), and --no-compile: Python
# byte-compiles the modules it imports (see PYTHONDONTWRITEBYTECODE above), not all of torch, jax
# and transformers up front.
# A fresh test install: 1 min 7 s, against 2 min 1 s with a pip upgrade and two calls.
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.installed-demo: $(VENV)/.created pyproject.toml
	$(PIP) -e ".[demo]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.created pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The demo trains on 2 CPU devices, one per core of the 2-core machine: each runs its half of the
# batch on one thread, which beat one device using both cores (the tiny SFT step in `bench
# train`: 9,700 tokens/s against 7,250) and 8 fake devices (100 steps of the tiny SFT and reward
# presets: 198 s and 317 s on 1 device against 244 s and 350 s on 8, busy machine).
# DEMO_DEVICES=8 shows the sharded path; tests keep 8.
DEMO_DEVICES ?= 2
demo: export XLA_FLAGS = --xla_force_host_platform_device_count=$(DEMO_DEVICES)
demo: $(VENV)/.installed-demo
	$(PY) -m alignjax.demo --workdir runs/demo

# Tests run in TEST_WORKERS pytest-xdist processes (tests/conftest.py groups them): most of the
# suite compiles, which is single-threaded, so 2 workers help even on the 2-core machine (3 were
# slower on a fresh clone: 26:02 of pytest against 24:39 with 2). TEST_WORKERS=0: this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS))

# --durations: the slowest tests are listed at the end, so the suite's budget (25 minutes on a
# fresh 2-core clone) can be watched from any CI log.
test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(XDIST) --durations=25 $(PYTEST_ARGS)

# The development tier: everything but the tests marked slow (training runs, CLI end to end).
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# clean: training runs and caches; the virtual environment stays. distclean: .venv as well.
clean:
	rm -rf runs .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
