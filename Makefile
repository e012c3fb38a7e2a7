# Two commands on a fresh machine (README, "Install and test"):
#   make quickstart   create .venv when missing, install, run the README quickstart
#   make test         create .venv when missing, install, run the test suite
# and `make lint` (ruff). The install step reruns only when pyproject.toml changes.
# Options: make test PYTEST_ARGS="-x -k contract"; make quickstart BENCH_ARGS="--device cpu";
# PYTHON=python3.12 for another interpreter.

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
BENCH_ARGS ?=

ACTIVATE := . $(VENV)/bin/activate
INSTALLED := $(VENV)/.medssl-bench-installed

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.PHONY: help install quickstart test lint

help:
	@echo "make quickstart   install into $(VENV) (created when missing) and run the quickstart"
	@echo "make test         install into $(VENV) (created when missing) and run the tests"
	@echo "make lint         ruff check benchmark plugins tests benchmarks examples"

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(ACTIVATE) && python -m pip install --upgrade pip

$(INSTALLED): pyproject.toml $(VENV)/bin/activate
	$(ACTIVATE) && pip install -e ".[dev]"
	touch $@

install: $(INSTALLED)

quickstart: $(INSTALLED)
	$(ACTIVATE) && bench run --protocol data-efficiency --task rotation3d $(BENCH_ARGS)
	$(ACTIVATE) && bench leaderboard

test: $(INSTALLED)
	$(ACTIVATE) && python -m pytest -q $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(ACTIVATE) && ruff check benchmark plugins tests benchmarks examples
