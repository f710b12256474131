# Every target does its own set-up on a fresh machine: a virtual environment with
# torch==2.13.0 (a CPU build installs from a local file here) and the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cosmic-installed

.PHONY: demo test test-slow lint docs setup bench-claims bench-perf bench-zoo zoo-vendor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,hf]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/cosmic-fx demo

# `make test`: everything but the tests marked `slow` (Inductor compiles, subprocess cache checks, many
# training steps), under 10 minutes on 2 cores. `make test-slow` runs those; CI (.ci/run) runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

# The docs site: mkdocs-material + mkdocstrings, built with --strict (a broken link, anchor or API
# reference fails the build) into site/ (not in git).
DOCS_STAMP := $(VENV)/.cosmic-docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-claims: $(STAMP)
	$(BIN)/cosmic-fx bench claims

bench-perf: $(STAMP)
	$(BIN)/cosmic-fx bench perf

# `cosmic-fx bench zoo`: torchvision and timm in a folder of their own, outside the environment (the
# registry's torchvision wheel is built against the CUDA torch; installed next to the CPU torch it breaks
# `import transformers` and `import timm`). The zoo imports its model files from there.
ZOO_VENDOR ?= .zoo-vendor
ZOO_PACKAGES ?= torchvision==0.28.0 timm==1.0.31

$(ZOO_VENDOR)/.installed: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(ZOO_VENDOR) $(ZOO_PACKAGES)
	touch $@

zoo-vendor: $(ZOO_VENDOR)/.installed

bench-zoo: $(STAMP) zoo-vendor
	$(BIN)/cosmic-fx bench zoo

clean:
	rm -rf $(VENV) build *.egg-info $(ZOO_VENDOR) site
