# Optic: `make serve` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model_repo
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
SERVE_ARGS ?=

.PHONY: serve test lint protos models clean

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

serve: $(VENV)/.installed-serve
	$(BIN)/optic serve --model-repo $(MODEL_REPO) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(SERVE_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# Regenerate server/proto from protos/ (tests/test_protos.py fails when it is stale).
protos: $(VENV)/.installed-dev
	$(BIN)/python -m server.codegen

# Rebuild the default model repository from nothing (deterministic).
models: $(VENV)/.installed-dev
	$(BIN)/optic export all --out $(MODEL_REPO)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
