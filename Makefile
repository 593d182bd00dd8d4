# medlm: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
RUN := .medlm/run
PORT ?= 4200

# Every Prefect process of ours: its own PREFECT_HOME, no telemetry, room for first migrations.
export PREFECT_HOME ?= $(CURDIR)/.medlm/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_LOGGING_EXTRA_LOGGERS := medlm
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW := ignore

.PHONY: venv demo test up down bench clean

venv: $(INSTALLED)

# torch first: the CPU wheel on local disk satisfies the project's torch range, so `-e .[dev]`
# adds nothing to it (a bare `torch` would pull a multi-GB CUDA build).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/medlm demo

test: venv
	$(PY) -m pytest -q

# A Prefect server on 127.0.0.1:$(PORT), the deployments, and a worker per work pool.
# `make down` stops exactly the processes recorded here.
up: venv
	@mkdir -p $(RUN)
	@if [ -f $(RUN)/server.pid ] && kill -0 $$(cat $(RUN)/server.pid) 2>/dev/null; then echo "already up (make down first)"; exit 1; fi
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PORT) \
		nohup $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PORT) > $(RUN)/server.log 2>&1 & echo $$! > $(RUN)/server.pid
	@echo "waiting for the Prefect server on 127.0.0.1:$(PORT) ..."
	@for i in $$(seq 1 120); do curl -sf http://127.0.0.1:$(PORT)/api/health >/dev/null && break; sleep 1; done; \
		curl -sf http://127.0.0.1:$(PORT)/api/health >/dev/null || { echo "server did not start; see $(RUN)/server.log"; exit 1; }
	PREFECT_API_URL=http://127.0.0.1:$(PORT)/api $(PY) -m deployments.deploy --store $(CURDIR)/.medlm/store
	for pool in cpu gpu; do \
		PREFECT_API_URL=http://127.0.0.1:$(PORT)/api nohup $(VENV)/bin/prefect worker start --pool $$pool --type process \
			> $(RUN)/worker-$$pool.log 2>&1 & echo $$! > $(RUN)/worker-$$pool.pid; \
	done
	@echo "UI: http://127.0.0.1:$(PORT)  (logs and PIDs in $(RUN)/)"

# Workers need a second signal to stop (measured): SIGINT, then SIGTERM after a grace period.
down:
	@for f in $(RUN)/worker-*.pid $(RUN)/server.pid; do \
		[ -f $$f ] || continue; pid=$$(cat $$f); \
		if kill -0 $$pid 2>/dev/null; then \
			kill -INT $$pid; for i in $$(seq 1 15); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
			kill -0 $$pid 2>/dev/null && kill -TERM $$pid; \
			echo "stopped $$f ($$pid)"; \
		fi; rm -f $$f; \
	done

bench: venv
	$(PY) benchmarks/parse.py
	$(PY) benchmarks/corpus.py

clean:
	rm -rf .medlm
