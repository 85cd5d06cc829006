# The two commands of the README: `make quickstart` and `make test`. Each sets up what it needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup setup-test quickstart test lint

# Controller + the CPU training stack (torch's CPU build first, so nothing pulls a CUDA build).
setup:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[train]"

setup-test: setup
	.ci/install-system-packages
	$(PIP) install -q -e ".[train,test,dev]"
	scripts/ensure-llama-cpp

quickstart: setup
	lt train --local --yes

lint:
	ruff check .
	ansible-lint --profile production playbooks roles

test: setup-test lint
	$(PYTHON) -m pytest -q -ra
