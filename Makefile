# soulray: `make quickstart` runs the whole pipeline tiny on local Ray; `make test` runs the tests.
# Each target creates .venv and installs into it when needed (torch==2.13.0 first, so pip takes
# the CPU build already on disk instead of downloading a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.soulray-installed

.PHONY: quickstart test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/soulray quickstart --config jobs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check soulray tests bench
	$(VENV)/bin/ruff format --check soulray tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix soulray tests bench
	$(VENV)/bin/ruff format soulray tests bench

bench: $(STAMP)
	$(PY) bench/data_prep.py

clean:
	rm -rf runs .pytest_cache
