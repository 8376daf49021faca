# cloudfed: `make run` sets everything up and runs the demo federation; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
STACK := cloudfed-local
WHEEL_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export ZENML_ANALYTICS_OPT_IN := false
export ZENML_ENABLE_RICH_TRACEBACK := false
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
# What `make run` prints: one progress line per round, the warnings to act on and the round
# table; `make run V=1` (or CLOUDFED_LOG=full) prints the full ZenML step log. ZenML stores the
# full step logs either way (cloudfed/console.py). Tests see the full log unless they ask.
V ?= 0
LOG_MODE := $(if $(filter 1,$(V)),full,$(or $(CLOUDFED_LOG),quiet))
QUIET := $(filter quiet,$(LOG_MODE))
# Quiet installs: pip's errors only (-qq; a pip.conf naming absent indexes warns once per
# package), no setuptools notice about editable installs, and `zenml init`'s banner only if it fails.
PIP_Q := $(if $(QUIET),-qq,--quiet)
QUIETLY = $(if $(QUIET),out=$$($(1) 2>&1) || { echo "$$out"; exit 1; },$(1))

.PHONY: run test setup browser azurite stack demo-data policies preflight lint ui bench bench-env clean status start-over unlock compare load50 bench-scale

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_Q) --upgrade pip

# torch first, pinned: the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_Q) $(WHEEL_LINKS) torch==2.13.0
	$(if $(QUIET),PYTHONWARNINGS=ignore::UserWarning )$(BIN)/pip install $(PIP_Q) $(WHEEL_LINKS) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

.zen: | setup
	@echo "$(BIN)/zenml init"
	@$(call QUIETLY,$(BIN)/zenml init)

stack: setup .zen
	@bash infra/register_local_stack.sh $(BIN) $(STACK)

demo-data: setup
	$(BIN)/python -m cloudfed.data.demo --out .cloudfed/clouds

# One policy per simulated cloud (kept once written: it is the party's, not the launcher's).
policies: setup
	$(BIN)/python -m cloudfed.party_policy provision $(CONFIG)

preflight: setup
	$(BIN)/python -m cloudfed.preflight $(CONFIG)

run: stack demo-data policies preflight
	CLOUDFED_LOG=$(LOG_MODE) $(BIN)/zenml pipeline run pipelines.federated_training.federated_training -c $(CONFIG)
	@echo "Results: MLflow (run 'make ui', then open http://127.0.0.1:5000), report files in .cloudfed/coordinator/<federation id>/last_run/"

# The paper's comparison table (README): every arm its own in-process federation, 3 seeds.
COMPARE_CONFIG ?= configs/compare.yaml
compare: stack demo-data
	CLOUDFED_LOG=$(LOG_MODE) $(BIN)/zenml pipeline run pipelines.comparison.comparison -c $(COMPARE_CONFIG)
	@echo "Table, CSV and chart in .cloudfed/comparison/; MLflow experiment cloudfed-comparison ('make ui')"

# Debian's chromium renders the GX Data Docs in the browser test; installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the Data Docs test"; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || \
	    echo "chromium could not be installed: run 'apt-get install chromium' (as root)"; }

# Azurite, Azure's storage emulator, for the storage tests (tests/storage_servers.py): an npm
# package, pinned, installed into the git-ignored .tools/ (node >= 18 and npm must be installed).
AZURITE_VERSION := 3.37.0
AZURITE_STAMP := .tools/azurite/.installed-$(AZURITE_VERSION)
$(AZURITE_STAMP):
	@command -v npm >/dev/null 2>&1 || { echo "Azurite needs node (>= 18) and npm: install them (apt-get install nodejs npm) and run make again"; exit 1; }
	mkdir -p .tools/azurite
	npm install --prefix .tools/azurite --no-audit --no-fund --save-exact $(if $(QUIET),--silent,) azurite@$(AZURITE_VERSION)
	touch $@

azurite: $(AZURITE_STAMP)

# Flower's venv too: a test runs its benchmark peer in tiny mode beside ours. The storage tests
# fail, not skip, when a server is missing (CLOUDFED_REQUIRE_STORAGE_SERVERS).
test: setup browser bench-env azurite
	CLOUDFED_REQUIRE_BROWSER=1 CLOUDFED_REQUIRE_FLOWER=1 CLOUDFED_REQUIRE_STORAGE_SERVERS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

ui: setup
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python infra/mlflow_uri.py)" --host 127.0.0.1 --port 5000

# Flower lives in its own venv: its pins conflict with ours, and it is only a benchmark peer.
.venv-flwr/bin/python:
	$(PYTHON) -m venv .venv-flwr
	.venv-flwr/bin/pip install --quiet flwr==1.42.0 numpy

bench-env: .venv-flwr/bin/python

bench: stack demo-data policies bench-env
	$(BIN)/python benchmarks/harmonize.py
	$(BIN)/python benchmarks/demo_run.py --config $(CONFIG)
	$(BIN)/python benchmarks/protection.py
	$(BIN)/python benchmarks/privacy_utility.py --config $(CONFIG)

# Scale (README "Scale"): 50 simulated parties, rank-2 adapters, secure aggregation, one round.
# A second `make load50` trains nothing (`rounds` is the federation's total): `make start-over
# CONFIG=configs/load50.yaml` runs it again from the base model.
LOAD_CONFIG := configs/load50.yaml
load50: stack
	$(BIN)/python -m cloudfed.data.demo --out .cloudfed/load50/clouds --parties 50 --train-rows 60 --eval-rows 12
	$(BIN)/python -m cloudfed.party_policy provision $(LOAD_CONFIG)
	$(BIN)/python -m cloudfed.preflight $(LOAD_CONFIG)
	CLOUDFED_LOG=$(LOG_MODE) $(BIN)/zenml pipeline run pipelines.federated_training.federated_training -c $(LOAD_CONFIG)

# The numbers behind README "Scale": in-process at 10-50 parties, then ZenML at 10 and 50 on an
# isolated ZenML config (never the user's), and ZenML's own cost per step. An hour on 2 cores.
bench-scale: setup
	$(BIN)/python benchmarks/scale.py --parties 10 20 30 50 --pipeline 10 50
	$(BIN)/python benchmarks/zenml_floor.py --parties 10 50 --stages 3

clean:
	rm -rf .cloudfed

# The federation continues across runs (`rounds` is its total). Where it stands, and the lock:
status: setup
	$(BIN)/python -m cloudfed.federation_state status $(CONFIG)

# One run from the base model in a new generation; later `make run`s continue that generation.
start-over: setup
	$(BIN)/python -m cloudfed.federation_state start-over-config $(CONFIG) --out .cloudfed/start-over.yaml
	$(MAKE) run CONFIG=.cloudfed/start-over.yaml

# Only for a lock left by a run that died on another machine (a local dead run's is taken over).
unlock: setup
	$(BIN)/python -m cloudfed.federation_state unlock $(CONFIG)
