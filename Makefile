# Every target does its own set-up on a fresh machine: a virtual environment with
# torch==2.13.0 (a CPU build installs from a local file here) and the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cosmic-installed

.PHONY: demo test setup bench-claims bench-perf clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/cosmic-fx demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-claims: $(STAMP)
	$(BIN)/cosmic-fx bench claims

bench-perf: $(STAMP)
	$(BIN)/cosmic-fx bench perf

clean:
	rm -rf $(VENV) build *.egg-info
