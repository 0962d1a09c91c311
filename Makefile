# The README's commands. Everything installs into ./.venv (and ./.venv-checkov for the
# manifest scanner, ./.venv-clients for the third-party V2 clients: their pins clash with ours).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
PORT ?= 3000
export BENTOML_DO_NOT_TRACK ?= true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install system-packages java lock protos audit serve train test test-fast lint format bench load-smoke load load-stress image image-full image-monitoring image-tools drift-screenshot clean

# Installed from uv.lock exactly (--frozen: a lock that disagrees with pyproject.toml is an
# error, not a silent re-resolve): serving, training (all extras) and the dev group.
# --compile-bytecode, as in the image (BentoML's Dockerfile sets UV_COMPILE_BYTECODE=1): every
# `bentoml serve` would otherwise compile its imports again (~2 s a process, with
# PYTHONDONTWRITEBYTECODE set or a read-only venv).
$(VENV)/.installed: pyproject.toml uv.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(UV) sync --quiet --frozen --all-extras --compile-bytecode --python $(PY)
	touch $@

## Re-resolve uv.lock after editing pyproject.toml, export the Bento's pinned requirements, re-resolve the V2 clients',
## and the Spark job's (requirements/spark.txt: what its driver and executors install, at the lock's versions).
## The Bento exports carry every file's SHA-256: the image installs exactly the locked artefacts
## (pip and uv refuse a file whose hash differs: a tampered or substituted upload).
lock: $(VENV)/.installed
	$(UV) lock
	$(UV) export --quiet --frozen --no-dev --no-emit-project --no-header -o requirements/serve.txt
	$(UV) export --quiet --frozen --no-dev --no-emit-project --no-header --extra sklearn -o requirements/full.txt
	$(UV) export --quiet --frozen --no-dev --no-emit-project --no-header --extra monitoring -o requirements/monitoring.txt
	$(UV) pip compile --quiet --python-version 3.11 requirements/clients.in -o requirements/clients.txt
	mkdir -p build
	$(UV) export --quiet --frozen --all-extras --no-emit-project --no-hashes --no-header -o build/lock-constraints.txt
	$(UV) pip compile --quiet --no-header --no-annotate --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  requirements/spark.in --constraint build/lock-constraints.txt -o requirements/spark.txt

## The gRPC modules of serving/v2 from its .proto (committed; tests/test_v2_grpc.py checks they are up to date).
PROTOC := $(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=.
protos: $(VENV)/.installed
	$(PROTOC) serving/v2/grpc_predict_v2.proto

.venv-checkov/.installed:
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
	.venv-checkov/bin/uv pip install --quiet --python .venv-checkov/bin/python checkov==3.3.30
	touch $@

# tritonclient and kserve, the Open Inference Protocol clients the tests drive, at the exact
# versions of requirements/clients.txt (resolved from requirements/clients.in).
.venv-clients/.installed: requirements/clients.txt $(VENV)/.installed
	test -x .venv-clients/bin/python || $(PYTHON) -m venv .venv-clients
	$(UV) pip sync --quiet --python .venv-clients/bin/python requirements/clients.txt
	touch $@

install: $(VENV)/.installed .venv-checkov/.installed .venv-clients/.installed

## Debian packages the tests and benchmarks run for real: a Redis server and a load balancer
## for the fleet tests, wrk for the benchmarks, buildah + debootstrap + curl to build and run
## the image (no Docker engine), openssl for the TLS test's certificates, prometheus (its promtool
## checks and unit-tests the alerts) and prometheus-pushgateway (the monitoring jobs push to it).
## Installed only when missing (needs root or sudo; each name is also the command checked for).
SYSTEM_PACKAGES ?= redis-server haproxy wrk buildah debootstrap curl openssl prometheus prometheus-pushgateway
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	    { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq $$missing >/dev/null; }; \
	fi

## The Spark test (tests/test_spark.py) runs a local Spark: pyspark comes with the venv (its jars
## included, nothing downloads), the JVM is the machine's (Java 17 or 21), else Debian's
## openjdk-17-jre-headless is installed, as the other system packages are.
java:
	@java -version >/dev/null 2>&1 || { \
	  echo "installing Debian packages: openjdk-17-jre-headless (a JVM for the Spark test)"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get install -y -qq openjdk-17-jre-headless >/dev/null 2>&1 || \
	    { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }; \
	  java -version >/dev/null 2>&1 || { echo "need Java 17 or 21 on PATH for the Spark test (or set JAVA_HOME)"; exit 1; }; }

## First README command: install, train if the store has no model, serve on :3000.
serve: $(VENV)/.installed
	$(PY) -m training --if-missing
	$(VENV)/bin/bentoml serve service:BankChurn --port $(PORT)

train: $(VENV)/.installed
	$(PY) -m training

## Known vulnerabilities in every locked dependency (serving, extras, dev tools), by pip-audit
## against PyPI's advisory data (pypi.org/pypi/NAME/VERSION/json). --strict: a package that could
## not be audited fails the audit too (an audit that checked nothing must not pass).
## AUDIT=on: always that. AUDIT=auto (the default, what CI runs): the same when that advisory
## data answers, else a loud NOT AUDITED line and no failure (a sandbox whose proxy passes the
## package index but not the per-version JSON API). AUDIT=off: skipped, loudly.
## A finding accepted after review goes into AUDIT_IGNORE as `--ignore-vuln ID`, with the reason
## in SECURITY.md.
AUDIT ?= auto
AUDIT_IGNORE ?=
AUDIT_PROBE := https://pypi.org/pypi/pip/24.0/json
audit: $(VENV)/.installed
	@if [ "$(AUDIT)" = off ]; then echo "*** make audit SKIPPED (AUDIT=off): the dependencies were NOT checked for vulnerabilities"; exit 0; fi; \
	if [ "$(AUDIT)" = auto ] && ! $(PY) -c "import urllib.request as u; u.urlopen('$(AUDIT_PROBE)', timeout=10)" 2>/dev/null; then \
	  echo "*** make audit: NOT AUDITED: PyPI's advisory data ($(AUDIT_PROBE)) is unreachable from here;"; \
	  echo "*** the dependencies were NOT checked for vulnerabilities (AUDIT=on makes this an error)"; exit 0; fi; \
	mkdir -p build && \
	$(UV) export --quiet --frozen --all-extras --all-groups --no-emit-project --no-header -o build/audit-requirements.txt && \
	$(VENV)/bin/pip-audit --requirement build/audit-requirements.txt --require-hashes --disable-pip \
	  --vulnerability-service pypi --strict --progress-spinner off --desc on $(AUDIT_IGNORE)

## Second README command: install and run the test suite (what CI runs), the container image
## test included (tests/test_container.py: needs root; the base image is cached by its recipe
## in $$BANK_CHURN_IMAGE_CACHE, default ~/.cache/bank-churn/images).
test: $(VENV)/.installed .venv-checkov/.installed .venv-clients/.installed system-packages java lint audit
	$(VENV)/bin/pytest

## The fast tier, for every edit: lint, the import contracts, and the unit and in-process tests
## (no root, no server beyond the test process; `-m integration` and `-m container` are the rest).
test-fast: lint
	$(VENV)/bin/pytest -m "not integration and not container"

## What building and running the image needs here (kept as a name for the image targets).
image-tools: system-packages

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .venv-checkov .venv-clients .pytest_cache .ruff_cache build

## Benchmarks (figures, not tests; each runs even if one before it printed a FAIL): in-process, HTTP (bare vs seeds' pattern vs ours, V2), the request path's profile, start-up (cold start and RSS vs a bare endpoint), scoring jobs, hostile uploads (memory), Redis faults, Spark, the prediction log's cost and the drift report's (needs a model trained with a drift reference), the cost of API keys and header limits and header attacks.
bench: $(VENV)/.installed system-packages java
	$(PY) -m training --if-missing
	@failed=""; for b in inprocess http profile startup jobs uploads redis_faults spark monitoring security; do \
	  echo "== python -m benchmarks.$$b"; $(PY) -m benchmarks.$$b || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks with a FAIL verdict or an error:$$failed"; exit 1; fi

## Locust profiles against a running service (make serve first); HOST=http://... to target another.
HOST ?= http://localhost:3000
load-smoke load load-stress: $(VENV)/.installed
	$(PY) -m tests.load.run $(patsubst load-%,%,$@) --host $(HOST)

## Build the Bento and a real container image here (no Docker: debootstrap + buildah), smoke-test it.
image: $(VENV)/.installed image-tools
	$(PY) -m training --if-missing
	$(VENV)/bin/bentoml build
	deploy/image/build.sh

## The same for the fallback Bento (bentofile.full.yaml: + scikit-learn, XGBoost, LightGBM, pandas).
image-full: $(VENV)/.installed image-tools
	$(PY) -m training --if-missing
	$(VENV)/bin/bentoml build -f bentofile.full.yaml
	deploy/image/build.sh --bento bank_churn_full:latest

## The monitoring Bento and its image (bentofile.monitoring.yaml: + the monitoring jobs and Evidently), for the drift CronJob.
image-monitoring: $(VENV)/.installed image-tools
	$(PY) -m training --if-missing
	$(VENV)/bin/bentoml build -f bentofile.monitoring.yaml
	deploy/image/build.sh --bento bank_churn_monitoring:latest

## A drift report as headless Chromium renders it (the README's picture): make drift-screenshot REPORT=path/to/drift.html
REPORT ?= reports/monitoring/drift/drift.html
SCREENSHOT ?= docs/drift-report.png
drift-screenshot:
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
	  --disable-component-update --disable-sync --user-data-dir=$$(mktemp -d) --hide-scrollbars \
	  --virtual-time-budget=20000 --window-size=1400,1700 --screenshot=$(abspath $(SCREENSHOT)) file://$(abspath $(REPORT))
