# medlm: `make demo` and `make test` do all set-up on a fresh machine.
# Prefect's environment (PREFECT_HOME, no telemetry, start-up timeout) is set in one place,
# flows/prefect_env.py, by every command of ours that starts Prefect.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per extra installed: `make test` after `make demo` only adds the test extra.
DEMO_INSTALLED := $(VENV)/.installed-demo
TEST_INSTALLED := $(VENV)/.installed-test
PORT ?= 4200
HOST ?= 127.0.0.1
WORKERS ?= yes
CONFIG ?=
DB ?= postgres
DEPLOY_ARGS ?=
WHEELS ?= $(HOME)/.cache/medlm-wheels
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP := llama-cpp-python==$(LLAMA_CPP_VERSION)
# Built once per machine, outside the clone and keyed by version: every clone, worktree and
# `make clean` after the first reuses it.
LLAMA_CPP_WHEELS := $(WHEELS)/llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_CPP_INSTALLED := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)
# Left out of its build (benchmarks/llama_cpp_wheel.py measures the difference): llava/mtmd, the
# multimodal library the bindings load only for images, and llama.cpp's common library, which they
# never load (.ci/llama_cpp_wheel.cmake says how).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/.ci/llama_cpp_wheel.cmake

.PHONY: venv demo test test-fast bench up down clean llama-cpp-wheel

venv: $(DEMO_INSTALLED)

# What the demo runs, nothing more. torch first: the CPU wheel on local disk satisfies the
# project's torch range, so `-e .` adds nothing to it (a bare `torch` would pull a multi-GB CUDA build).
$(DEMO_INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# pyproject's `test` extra: the test runner and the peers and servers the tests compare us with.
$(TEST_INSTALLED): $(DEMO_INSTALLED)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# llama.cpp itself, which the tests run our GGUF files in: llama-cpp-python has no wheel for this
# Python on the registry, so its sdist is built (a C++ compiler; cmake and ninja come from the
# registry when missing), once, into LLAMA_CPP_WHEELS.
$(LLAMA_CPP_INSTALLED): $(DEMO_INSTALLED)
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 \
		|| CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps -w $(LLAMA_CPP_WHEELS) '$(LLAMA_CPP)'
	$(PY) -m pip install -q --find-links $(LLAMA_CPP_WHEELS) --only-binary llama-cpp-python '$(LLAMA_CPP)'
	touch $@

llama-cpp-wheel: $(LLAMA_CPP_INSTALLED)

demo: venv
	$(VENV)/bin/medlm demo

# Two worker processes (pytest-xdist), one per core of the machine we measure on; each starts
# its own Prefect server when a test needs one. The slowest tests are listed at the end.
test: $(TEST_INSTALLED) $(LLAMA_CPP_INSTALLED)
	$(PY) -m pytest -q -n 2 --durations=20

# The inner loop: every test but those marked slow (servers, stacks, clusters, long training).
test-fast: $(TEST_INSTALLED) $(LLAMA_CPP_INSTALLED)
	$(PY) -m pytest -q -n 2 -m "not slow"

# Every benchmark, small (results under benchmarks/results/quick/; the recorded figures come from full runs).
bench: $(TEST_INSTALLED)
	$(PY) -m benchmarks

# A Prefect server on $(HOST):$(PORT) (127.0.0.1 unless told; credentials required, UI origin only, CSRF on) on PostgreSQL (a cluster of
# our own in .medlm/postgres; DB=sqlite for the embedded SQLite), the deployments (default
# parameters from CONFIG, a run configuration, if given; DEPLOY_ARGS for the rest of
# `python -m deployments.deploy --help`), and a worker per work pool.
up: venv
	$(PY) -m deployments.serve up --host $(HOST) --port $(PORT) $(if $(filter no,$(WORKERS)),--no-workers) --database $(DB) $(if $(CONFIG),--config $(CONFIG)) $(DEPLOY_ARGS)

# Stops exactly the processes `make up` started (recorded in .medlm/run/), and the PostgreSQL cluster.
down:
	$(PY) -m deployments.serve down

# Everything `make up` and the runs made: the stack stopped, its PostgreSQL cluster and .medlm deleted.
clean:
	if [ -x $(PY) ]; then $(PY) -m deployments.serve clean; fi
	rm -rf .medlm
