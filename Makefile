# soulray: `make quickstart` runs the whole pipeline tiny on local Ray; `make test` runs the tests.
# Each target creates .venv and installs into it when needed (torch==2.13.0 first, so pip takes
# the CPU build already on disk instead of downloading a multi-GB CUDA build). Where pip's index
# serves the CUDA build, pick the CPU one with
#   make quickstart TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
TORCH_PIP_ARGS ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.soulray-installed

.PHONY: quickstart test lint format bench clean k8s-tools k8s-serve-config

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/soulray quickstart --config jobs/quickstart.yaml

test: $(STAMP) k8s-tools
	$(PY) -m pytest -q --durations=15

# kubectl >= 1.21 (its built-in kustomize v4+) renders the k8s/ overlays for tests/deploy; without
# it the tests validate k8s/base alone. Nothing is installed: Debian 12's kubernetes-client (1.20)
# is too old to render them.
k8s-tools:
	@command -v kubectl >/dev/null 2>&1 || echo "note: kubectl is not installed; tests/deploy validates k8s/base only"

# The RayServices' serveConfigV2 is generated from jobs/k8s-dev-cpu.yaml and jobs/h100-qwen7b.yaml.
k8s-serve-config: $(STAMP)
	$(PY) k8s/sync_serve_config.py

lint: $(STAMP)
	$(VENV)/bin/ruff check soulray tests bench k8s
	$(VENV)/bin/ruff format --check soulray tests bench k8s
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix soulray tests bench k8s
	$(VENV)/bin/ruff format soulray tests bench k8s

bench: $(STAMP)
	$(PY) bench/data_prep.py

clean:
	rm -rf runs .pytest_cache
