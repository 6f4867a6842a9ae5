# ssl_lib: make help lists the targets.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python

.PHONY: help install test bench kernel clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: ## install the package with its dev/notebook extras into the current environment
	$(PYTHON) -m pip install -e ".[dev]"

test: ## run the test suite (CPU, < 10 minutes on 2 cores)
	$(PYTHON) -m pytest

bench: ## speed and memory benchmark (writes bench/bench.json)
	$(PYTHON) -m ssl_lib bench $(if $(CONFIG),--config $(CONFIG))

kernel: ## register this environment as the Jupyter kernel "ssl-lib"
	$(PYTHON) -m ipykernel install --user --name ssl-lib --display-name "Python (ssl-lib)"

clean: ## remove generated reports, runs and benchmarks (not the data cache)
	rm -rf reports/*/ runs/ bench/
