# The interface of the project: every target sets up what it needs, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The stubs (propscope.v1, distribution propscope-api in protos/python): installed, not editable,
# again whenever the contract changes.
STUBS := $(VENV)/.stubs-installed
# Wheels of what ./protos/python, ./server and ./client declare (constrained by requirements.txt),
# of their build backends (pinned in their pyproject.toml) and of the `build` frontend:
# tests/integration/test_install.py installs ./server, and builds the SDK and its stubs as sdists
# and wheels and installs them, in clean venvs from these alone, with no network.
WHEELHOUSE := build/wheelhouse
WHEELHOUSE_BUILD_TOOLS := setuptools==84.2.1 grpcio-tools==1.81.1 build==1.6.1
# Tiny random diffusion pipelines for the CPU editors (generated, never committed).
PIPELINES := deploy/triton/pipelines
TINY_PIPELINES := $(PIPELINES)/tiny-ip2p/propscope_tiny.json $(PIPELINES)/tiny-sd/propscope_tiny.json
# The example team classifiers' files (examples/own-models; generated, never committed).
OWN_REPOSITORY := examples/own-models/repository
OWN_MODELS := $(OWN_REPOSITORY)/own_onnx/1/model.onnx $(OWN_REPOSITORY)/own_torchscript/1/model.pt \
	$(OWN_REPOSITORY)/own_state_dict/1/weights.pt $(OWN_REPOSITORY)/own_probabilities/1/model.pt \
	$(OWN_REPOSITORY)/own_probabilities_undeclared/1/model.onnx
RUN_DIR := .run
# The Node client: npm ci again only when the lock changes (it also fills npm's cache, from
# which tests/integration/test_node_client.py installs the packed client offline), the build
# again when a source or the contract does.
NODE_CLIENT := client/node
NODE_INSTALLED := $(NODE_CLIENT)/node_modules/.installed
NODE_BUILT := $(NODE_CLIENT)/dist/src/index.js
BUF := $(NODE_CLIENT)/node_modules/.bin/buf
NODE_SOURCES := $(NODE_CLIENT)/tsconfig.json $(NODE_CLIENT)/scripts/bundle-contract.mjs \
	$(shell find $(NODE_CLIENT)/src $(NODE_CLIENT)/examples $(NODE_CLIENT)/test -name '*.ts' -not -path '*/generated/*')
SAMPLE := docs/sample.png
# The same world with the colourful patch: where the patch-biased classifier looks.
PATCH_SAMPLE := docs/sample-patch.png
DEMO_PROPERTIES := \
	--property "object_hue=procedural:operation=hue,region=object" \
	--property "patch=procedural:operation=blend" \
	--property "background_brightness=procedural:operation=brightness,region=background,amount=0.2"

.PHONY: setup test lint contract demo explore up down bench soak validate weights fold-weights stubs pipelines own-models node-client clean

setup: $(INSTALLED) $(STUBS) $(TINY_PIPELINES) $(OWN_MODELS) node-client $(WHEELHOUSE)/.complete

# The client in compat mode (a path entry): its propscope package then extends its __path__
# to the stubs' namespace portion in site-packages.
$(INSTALLED): requirements.txt client/pyproject.toml server/pyproject.toml tools/pyproject.toml \
		deploy/scripts/install-system-deps.sh
	PYTHON=$(PYTHON) deploy/scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e client -e server -e tools
	touch $@

$(STUBS): protos/propscope/v1/*.proto protos/python/pyproject.toml protos/python/setup.py \
		protos/python/generate_stubs.py | $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		--force-reinstall ./protos/python
	touch $@

stubs: $(STUBS)

$(WHEELHOUSE)/.complete: requirements.txt protos/python/pyproject.toml server/pyproject.toml \
		client/pyproject.toml | $(INSTALLED)
	rm -rf $(WHEELHOUSE)
	$(PY) -m pip download --quiet --disable-pip-version-check --dest $(WHEELHOUSE) \
		--constraint requirements.txt $(WHEELHOUSE_BUILD_TOOLS) ./protos/python ./server ./client
	touch $@

$(TINY_PIPELINES) &: | $(INSTALLED)
	$(PY) -m propscope_server.triton_models.editors.diffusion.tiny_pipelines $(PIPELINES)

pipelines: $(TINY_PIPELINES)

$(OWN_MODELS) &: examples/own-models/build.py $(OWN_REPOSITORY)/own_state_dict/own_network.py \
		deploy/triton/weights/hue_biased.pt | $(INSTALLED)
	$(PY) examples/own-models/build.py

own-models: $(OWN_MODELS)

$(NODE_INSTALLED): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json | $(INSTALLED)
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund
	touch $@

$(NODE_BUILT): $(NODE_INSTALLED) $(NODE_SOURCES) protos/propscope/v1/*.proto
	cd $(NODE_CLIENT) && npm run build

node-client: $(NODE_BUILT)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The contract alone (`make test` runs the same in tests/unit/test_contract.py): buf lint, and
# buf breaking against the released contract in protos/released/ (buf.yaml says why each setting).
contract: $(NODE_INSTALLED)
	$(BUF) lint
	$(BUF) breaking --against . --against-config protos/released/buf.yaml

# Reuses a healthy stack already running from $(RUN_DIR) with the same settings;
# `make up UP_FLAGS=--restart` starts it again.
UP_FLAGS ?=
up: setup
	$(VENV)/bin/propscope-dev up --run-dir $(RUN_DIR) $(UP_FLAGS)

down:
	@if [ -x $(VENV)/bin/propscope-dev ]; then $(VENV)/bin/propscope-dev down --run-dir $(RUN_DIR); fi

demo: up
	$(VENV)/bin/propscope explain $(SAMPLE) --model synth_unbiased --model synth_hue --model synth_patch \
		$(DEMO_PROPERTIES) --steps 10 --seed 0
	$(VENV)/bin/propscope attribute $(PATCH_SAMPLE) --model synth_patch --out $(RUN_DIR)/demo

# The class explorer on http://127.0.0.1:8765/ over the stack `make up` starts (Ctrl-C stops the
# page, `make down` the stack); EXPLORE_FLAGS adds options (`propscope explore --help`).
EXPLORE_FLAGS ?=
explore: up
	$(VENV)/bin/propscope explore --images examples/concepts/manifest.csv $(EXPLORE_FLAGS)

bench: setup
	$(PY) bench/permutation_test.py
	$(PY) bench/explain_cold_warm.py
	$(PY) bench/curve_statistics.py
	$(PY) bench/editors.py
	$(PY) bench/attribution.py
	$(PY) bench/graph.py
	$(PY) bench/concepts.py
	$(PY) bench/maco.py
	$(PY) bench/eva.py
	$(PY) bench/scale_out.py
	$(PY) bench/interactions.py

# Load: 32 concurrent Explain streams for 150 s against a stack of its own, then the hostile
# clients at full size; writes docs/results/soak.md (and image_fuzz.md: 200,000 damaged
# images) and fails on an unexpected error or a stream rejected once accepted.
soak: setup
	$(PY) bench/soak.py
	PROPSCOPE_FUZZ_IMAGES=200000 PROPSCOPE_FUZZ_RESULTS=docs/results/image_fuzz.md \
		$(PY) -m pytest tests/unit/test_image_decoding_fuzz.py -q -s -k every_mutated

# The paper's Tables 1 and 2 and the test's calibration, through the stack that `make up`
# starts; writes docs/results/ and fails when an expected pattern does not hold.
validate: up
	$(PY) bench/validate_bias.py
	$(PY) bench/validate_downstream.py
	$(PY) bench/validate_honesty.py
	$(PY) bench/validate_attribution.py
	$(PY) bench/validate_causal_graph.py
	$(PY) bench/validate_concepts.py
	$(PY) bench/validate_eva.py --run-dir $(RUN_DIR)
	$(PY) bench/validate_interactions.py --run-dir $(RUN_DIR)

# Retrain the synthetic classifiers (deterministic; the committed weights came from this).
weights: setup fold-weights
	$(PY) -m propscope_dev.train --out deploy/triton/weights
	$(PY) -m propscope_dev.train --conjunction --out deploy/triton/weights

# The K = 4 fold models of MeGe/ReCo (synth_patch_folds versions 1..4; docs/consistency.md).
fold-weights: setup
	$(PY) -m propscope_dev.train --folds --out deploy/triton/weights

clean: down
	rm -rf $(VENV) $(RUN_DIR) $(WHEELHOUSE) .pytest_cache .ruff_cache
	rm -rf $(NODE_CLIENT)/node_modules $(NODE_CLIENT)/dist $(NODE_CLIENT)/src/generated
