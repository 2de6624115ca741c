# hsmocsp: two commands for a newcomer on Debian.
#   make run   - install what is missing, build the dev PKI, serve on http://127.0.0.1:8080
#   make run-replicas - the same, plus Redis: a signer on :8080, two servers on :8081, :8082
#   make test  - install what is missing, run the whole test suite
# Both are idempotent: a second run installs and rebuilds nothing that exists.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVPKI := var/devpki
CONFIG ?= etc/hsmocsp-dev.yaml
LISTEN ?= tcp:8080:interface=127.0.0.1
REPLICAS_CONFIG ?= etc/hsmocsp-replicas.yaml
APT_PACKAGES := softhsm2 opensc libengine-pkcs11-openssl openssl gcc libc6-dev golang-cfssl postgresql prometheus \
	redis-server redis-sentinel
BENCH_PACKAGES := wrk nginx-light golang-cfssl redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)

.PHONY: run run-replicas test reliability fuzz deps venv devpki lint bench bench-slow bench-token \
	bench-replicas bench-deps stress clean distclean \
	deploy-check deploy-lock

deps: .deps.stamp
.deps.stamp: Makefile
	@missing=""; for p in $(APT_PACKAGES) python3-venv; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(VENV)/.stamp $(VENV)/.checkout-pth
$(VENV)/.stamp: pyproject.toml | .deps.stamp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

# The editable install does not expose twisted/plugins (not a package): a .pth puts the
# checkout on the venv's path, so `.venv/bin/twistd hsmocsp` works from any directory.
$(VENV)/.checkout-pth: | $(VENV)/.stamp
	$(BIN)/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "hsmocsp-checkout.pth").write_text("$(CURDIR)\n")'
	@touch $@

devpki: venv
	$(BIN)/hsmocsp-devpki --dir $(DEVPKI)

run: devpki
	$(BIN)/python -m hsmocsp.devpki.run --dir $(DEVPKI) --config $(CONFIG) --listen '$(LISTEN)'

# The signer + servers topology on one machine (issue 11): everything `make run` does, plus a
# redis-server (data and socket in var/redis/), the signer on :8080 and two servers on
# :8081 and :8082, from $(CONFIG) with $(REPLICAS_CONFIG) laid over it. Ctrl-C stops all.
run-replicas: devpki
	$(BIN)/python -m hsmocsp.devpki.run --dir $(DEVPKI) --config $(CONFIG) --listen '$(LISTEN)' \
	  --replicas $(REPLICAS_CONFIG)

# Lint first, so pytest's summary is the last line CI reads.
test: venv lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not reliability" tests

# The long fault runs (HSM gone for minutes, floods, soaks): not part of `make test`.
reliability: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m reliability tests

# The fuzz targets (request parser, HTTP layer) for 5,000 examples each instead of make
# test's 150: about 6 minutes. FUZZ_EXAMPLES=N to choose.
FUZZ_EXAMPLES ?= 5000
fuzz: venv
	HSMOCSP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_fuzz.py

lint: venv
	$(BIN)/ruff check hsmocsp twisted tests bench deploy/check
	$(BIN)/mypy hsmocsp twisted/plugins deploy/check

bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

bench: venv bench-deps
	$(BIN)/python -m bench.compare
	$(BIN)/python -m bench.replicas

# The signer + server replicas on a real redis-server (issue 11): pre-signing into Redis vs
# the raw token, server answers (hot-cache hit, store hit) vs the single process, a server's
# memory with 1M stored responses, a revocation seen by every replica: ~5 minutes.
bench-replicas: venv bench-deps
	$(BIN)/python -m bench.replicas

# The slow-signer pass (RSA-4096 key, 100k-serial index, pre-signing, restart): ~8 minutes.
bench-slow: bench
	$(BIN)/python -m bench.compare --only slow

# Builds and runs the images (buildah), renders and validates the Helm chart and kustomize
# trees for Kubernetes 1.29 and 1.33, checks skaffold.yaml and the systemd unit: 15-25 minutes,
# root, not part of `make test`. What it checks: docs/deploy.md. Tools are cached under
# $${XDG_CACHE_HOME:-~/.cache}/hsmocsp-deploy; `deploy/check/run.sh STEP...` runs single steps.
deploy-check:
	deploy/check/run.sh

# Re-pin the image's Python packages (deploy/container/constraints.txt) to the newest wheels.
deploy-lock:
	rm -rf var/deploy-lock && $(PYTHON) -m venv var/deploy-lock
	PIP_CONSTRAINT= var/deploy-lock/bin/pip install -q --only-binary=:all: --no-binary=hsmocsp \
	  '.[devpki,debug]' 'setuptools>=77' wheel
	{ sed -n '/^#/p' deploy/container/constraints.txt; \
	  var/deploy-lock/bin/pip freeze --all --exclude hsmocsp --exclude pip; } > var/deploy-lock/c.txt
	mv var/deploy-lock/c.txt deploy/container/constraints.txt && rm -rf var/deploy-lock
	git diff --stat deploy/container/constraints.txt

# The integration suite STRESS_RUNS times in a row while STRESS_BUSY busy loops load the
# cores (issue 8): races a quiet box hides. Stops at the first failing run; the report
# (one line a run, the failed tests) goes to var/stress/. Takes 10-15 min a run on 2 cores.
STRESS_RUNS ?= 5
STRESS_BUSY ?= 2
stress: venv
	$(BIN)/python -m bench.stress --runs $(STRESS_RUNS) --busy $(STRESS_BUSY)

# A smart-card HSM (bench/slowtoken.c: 5 signatures/s, one at a time) carrying a
# time-compressed 100k-serial, 7-day-validity CA: ~14 minutes. Results: docs/performance.md.
bench-token: venv
	$(BIN)/python -m bench.token

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

distclean: clean
	rm -rf $(VENV) var .deps.stamp
