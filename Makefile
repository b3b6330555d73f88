# PyptoServing developer entry points. Two commands matter on a fresh machine: `make demo` and `make test`.
# Everything they need (venv, packages, Kubernetes binaries, helm) is installed idempotently.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Built Kubernetes binaries, helm, uv and generated models are cached outside the repo.
CACHE_DIR ?= $(HOME)/.cache/pypto-serving
export PYPTO_CACHE_DIR := $(CACHE_DIR)
PYTEST_ARGS ?=
# uv installs uv.lock, the one lock of every package of every extra. uv itself comes from PyPI, pinned with
# hashes by constraints/uv.txt (written by `make lock`), into its own venv in the cache.
UV_VERSION := $(shell sed -n 's/^uv==\([0-9.]*\).*/\1/p' constraints/uv.txt)
UV_DIR := $(CACHE_DIR)/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export PYPTO_UV := $(UV)
# The extras of the development and test environment, which `make install` syncs and CI tests.
DEV_EXTRAS := --extra engine --extra test

.PHONY: help
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

# The version is in the path, so a present binary is the pinned one (order-only: a fresh clone's newer
# constraints/uv.txt does not reinstall it).
$(UV): | constraints/uv.txt
	@echo "==> installing uv $(UV_VERSION) (hash-pinned by constraints/uv.txt) into $(UV_DIR)"
	$(PYTHON) -m venv --clear $(UV_DIR)
	$(UV_DIR)/bin/pip --isolated --disable-pip-version-check install --quiet --require-hashes --no-deps \
		-r constraints/uv.txt

.PHONY: uv
uv: $(UV) ## install the pinned uv into the cache

# checkov (Kubernetes misconfiguration scanner) in its own venv in the cache, hash-pinned by constraints/checkov.txt
# (`make checkov-lock`); not in uv.lock: it is a tool run on manifests, not a dependency of the code.
CHECKOV_VERSION := $(shell sed -n 's/^checkov==\([0-9.]*\).*/\1/p' constraints/checkov.txt)
CHECKOV_DIR := $(CACHE_DIR)/checkov-$(CHECKOV_VERSION)
CHECKOV := $(CHECKOV_DIR)/bin/checkov
export PYPTO_CHECKOV := $(CHECKOV)

# A tool venv in the cache from a hash-pinned requirements file: $(call tool-venv,DIR,REQUIREMENTS).
define tool-venv
	$(PYTHON) -m venv --clear $(1)
	$(1)/bin/pip --isolated --disable-pip-version-check install --quiet --require-hashes --no-deps -r $(2)
	@touch $@
endef

$(CHECKOV): constraints/checkov.txt
	@echo "==> installing checkov $(CHECKOV_VERSION) (hash-pinned by constraints/checkov.txt) into $(CHECKOV_DIR)"
	$(call tool-venv,$(CHECKOV_DIR),constraints/checkov.txt)

.PHONY: checkov
checkov: $(CHECKOV) ## install the pinned checkov into the cache (tests/helm/test_checkov.py runs it)

# The routers people pick instead of ours (smg, vllm-router, sglang-router), for the side-by-side routing benchmarks:
# their own venv in the cache, hash-pinned by constraints/peers.txt (`make peers-lock`); benchmarks only.
PEERS_DIR := $(CACHE_DIR)/peers
export PYPTO_PEERS_VENV := $(PEERS_DIR)

$(PEERS_DIR)/.installed: constraints/peers.txt
	@echo "==> installing the peer routers (hash-pinned by constraints/peers.txt) into $(PEERS_DIR)"
	$(call tool-venv,$(PEERS_DIR),constraints/peers.txt)

.PHONY: peers
peers: $(PEERS_DIR)/.installed ## install smg, vllm-router and sglang-router into the cache (routing benchmarks)

.PHONY: peers-lock
peers-lock: $(UV) ## re-pin the peer routers with hashes
	printf 'smg==1.13.0\nvllm-router==0.1.17\nsglang-router==0.3.2\n' | $(UV) pip compile - --generate-hashes \
		--universal --python-version 3.11 --no-header --quiet -o constraints/peers.txt

.PHONY: checkov-lock
checkov-lock: $(UV) ## re-pin checkov (CHECKOV_PIN=checkov==X.Y.Z, default: the current version) with hashes
	echo "$${CHECKOV_PIN:-checkov==$(CHECKOV_VERSION)}" | $(UV) pip compile - --generate-hashes --universal \
		--python-version 3.11 --no-header --quiet -o constraints/checkov.txt

$(VENV)/.installed: pyproject.toml setup.py uv.lock $(UV)
	@echo "==> syncing $(VENV) to exactly uv.lock: pypto-serving[engine,test], hash-checked"
	$(UV) sync --locked --python $(PYTHON) $(DEV_EXTRAS)
	$(PY) -m hack.lock_check --uv $(UV) $(DEV_EXTRAS)
	@touch $@

.PHONY: install
install: $(VENV)/.installed ## create .venv with exactly uv.lock's pypto-serving[engine,test] (hash-checked)

.PHONY: lock
lock: $(UV) ## re-resolve uv.lock after editing dependencies in pyproject.toml, then regenerate the image pins
	$(UV) lock
	echo "uv==$(UV_VERSION)" | $(UV) pip compile - --generate-hashes --universal --no-header --quiet -o constraints/uv.txt
	$(MAKE) install
	$(PY) -m hack.image_constraints

.PHONY: tools
tools: ## build or reuse the Kubernetes 1.20 binaries and helm (cached in ~/.cache/pypto-serving)
	bash hack/install-tools.sh

CLUSTER_DIR ?= .work/cluster
CLUSTER_ARGS ?=
.PHONY: cluster-up
cluster-up: install tools ## start (or find running) a persistent local cluster in .work/cluster
	$(PY) -m hack.localkube up --dir $(CLUSTER_DIR) $(CLUSTER_ARGS)

.PHONY: cluster-down
cluster-down: ## stop the local cluster in .work/cluster (every pod process too) and delete its state
	@if [ -x $(PY) ]; then $(PY) -m hack.localkube down --dir $(CLUSTER_DIR) --purge; else rm -rf $(CLUSTER_DIR); fi

.PHONY: lint
lint: install ## ruff
	$(VENV)/bin/ruff check .

.PHONY: test
test: install tools checkov ## everything CI runs: lint, unit, checkov, real-cluster integration and end-to-end tests
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install checkov ## tests that need no cluster
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

.PHONY: crds
crds: install ## regenerate crds/ from the operator's pydantic models (operator/types.py)
	$(PY) -m pypto_serving.operator.crd > crds/pyptoservings.serving.pypto.io.yaml
	cp crds/pyptoservings.serving.pypto.io.yaml helm/pypto-serving/crds/

DEMO_DIR ?= .work/demo
.PHONY: demo
demo: install tools ## the main job: local cluster, helm chart, tiny model served, queried and scaled end to end
	$(PY) -m hack.demo up --dir $(DEMO_DIR)

.PHONY: demo-down
demo-down: ## stop the demo cluster (operator, engines, gateway, control plane) and delete its state
	@if [ -x $(PY) ]; then $(PY) -m hack.demo down --dir $(DEMO_DIR); else rm -rf $(DEMO_DIR); fi

.PHONY: chart-sync
chart-sync: ## copy crds/ and operator/rbac.yaml into the helm chart (tests fail while they differ)
	cp crds/pyptoservings.serving.pypto.io.yaml helm/pypto-serving/crds/
	cp operator/rbac.yaml helm/pypto-serving/files/operator-rbac.yaml

.PHONY: chart-lint
chart-lint: tools ## helm lint the chart
	$(CACHE_DIR)/bin/helm lint --strict helm/pypto-serving

.PHONY: chart-test
chart-test: install tools ## the chart's tests: lint, schema, template + server dry-run, install/upgrade/uninstall
	$(PY) -m pytest tests/helm tests/e2e $(PYTEST_ARGS)

.PHONY: docs
docs: install ## regenerate docs/crd-reference.md from the pydantic models (a test fails when stale)
	$(PY) -m hack.crd_reference

.PHONY: image-constraints
image-constraints: install ## regenerate constraints/image.txt (the images' pins) from uv.lock
	$(PY) -m hack.image_constraints

.PHONY: kind-e2e
kind-e2e: ## for users with Docker: kind cluster, images, helm install, smoke test (hack/kind-e2e.sh)
	bash hack/kind-e2e.sh

# ------------------------------------------------------------------------------------------- system proof
$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(UV) sync --locked --python $(PYTHON) $(DEV_EXTRAS) --extra bench
	@touch $@

CHAOS_ARGS ?=
.PHONY: chaos
chaos: install tools ## fault matrix under load on a fresh local cluster + bad input at full size -> docs/reliability.md
	@status=0; \
	$(PY) benchmarks/chaos.py --no-report $(CHAOS_ARGS) || status=1; \
	rm -f docs/benchmarks/badinput.json; \
	PYPTO_FUZZ_EXAMPLES=150 PYPTO_ABORTED_STREAMS=3000 PYPTO_BADINPUT_JSON=docs/benchmarks/badinput.json \
		$(PY) -m pytest -q -p no:cacheprovider tests/system/test_bad_input.py || status=1; \
	$(PY) benchmarks/reliability_report.py || status=1; \
	exit $$status

BENCH_ARGS ?=
.PHONY: bench
bench: $(VENV)/.installed-bench tools peers ## every benchmark side by side, then docs/benchmarks.md with plots
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)
