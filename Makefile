# medlm: `make demo` and `make test` do all set-up on a fresh machine.
# Prefect's environment (PREFECT_HOME, no telemetry, start-up timeout) is set in one place,
# flows/settings.py, by every command of ours that starts Prefect.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PORT ?= 4200
HOST ?= 127.0.0.1
WORKERS ?= yes
CONFIG ?=
DB ?= postgres
DEPLOY_ARGS ?=
WHEELS ?= $(HOME)/.cache/medlm-wheels
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: venv demo test test-fast bench up down clean llama-cpp-wheel

venv: $(INSTALLED)

# torch first: the CPU wheel on local disk satisfies the project's torch range, so `-e .[dev]`
# adds nothing to it (a bare `torch` would pull a multi-GB CUDA build).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --find-links $(WHEELS) --only-binary llama-cpp-python '$(LLAMA_CPP)' 2>/dev/null \
		|| echo "no $(LLAMA_CPP) wheel in $(WHEELS): the test that runs GGUF files in llama.cpp is skipped (make llama-cpp-wheel builds one, 4-7 min)"
	touch $@

# llama-cpp-python has no wheel for this Python on the registry: build one from its sdist (4-7 min
# measured on 2 cores), cached outside the repository, where `make venv` finds it.
llama-cpp-wheel: venv
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl 2>/dev/null || $(PY) -m pip wheel -q --no-deps -w $(WHEELS) '$(LLAMA_CPP)'
	$(PY) -m pip install -q --find-links $(WHEELS) --only-binary llama-cpp-python '$(LLAMA_CPP)'

demo: venv
	$(VENV)/bin/medlm demo

# Two worker processes (pytest-xdist), one per core of the machine we measure on; each starts
# its own Prefect server when a test needs one.
test: venv
	$(PY) -m pytest -q -n 2

# The inner loop: every test but those marked slow (servers, stacks, clusters, long training).
test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow"

# Every benchmark, small (results under benchmarks/results/quick/; the recorded figures come from full runs).
bench: venv
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
