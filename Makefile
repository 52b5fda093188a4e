# The two commands the README gives: `make demo` (arrives with the chart) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test setup system-packages lint unit integration bench clean demo images e2e schema

## A kind cluster with Istio, Prometheus, podinfo and Perch: a canary promoted, another rolled back.
demo:
	bash scripts/demo.sh

## The two images (needs a Docker engine).
images:
	bash scripts/build-images.sh

## The end-to-end suite on kind (needs Docker); make test runs it too and skips it without Docker.
e2e: setup
	$(BIN)/python -m pytest -q tests/e2e

## Install what the tests need (Debian packages, a venv, the project), then run every check.
test: setup lint
	$(BIN)/python -m pytest -q --durations=15

## Debian packages: Prometheus (analyzer tests), openssl (certificate checks), wrk (benchmarks).
system-packages:
	@missing=""; \
	for pair in prometheus:prometheus openssl:openssl wrk:wrk; do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: system-packages $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

## Static checks: ruff, mypy (strict), import-linter's layer contracts.
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## docs/spec.schema.json, the JSON Schema of perch.dev/spec, exported from the spec's models (a
## unit test fails when the checked-in file differs from what they export).
schema:
	$(BIN)/python -m perch.spec.schema > docs/spec.schema.json.new
	mv docs/spec.schema.json.new docs/spec.schema.json

unit:
	$(BIN)/python -m pytest -q tests/unit

integration:
	$(BIN)/python -m pytest -q tests/integration

bench:
	$(BIN)/python benchmarks/admission_latency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
