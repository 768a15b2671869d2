# The README's two commands: `make demo` and `make test`. Each installs exactly the locked,
# tested versions first (requirements/demo.txt: what the demo needs; requirements/dev.txt: models,
# servers, PostgreSQL, test tools), checks that the venv matches its lock, then runs.
# `make lock` refreshes both locks from pyproject.toml's ranges (see README, "Installing").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_LOCK := requirements/demo.txt
DEV_LOCK := requirements/dev.txt
# pip-tools, not uv: pip-compile resolves with pip itself and pip's configuration, so it sees
# the machine's local torch 2.13.0 CPU wheel (FACTS.md); uv does not look there and resolves a
# CUDA torch of several GB. The locks are plain requirements files: installing needs only pip.
PIP_TOOLS := pip-tools==7.6.2
COMPILE := $(VENV)-lock/bin/pip-compile --quiet --strip-extras --no-emit-index-url \
	--no-emit-trusted-host --no-emit-find-links --unsafe-package atelier

.PHONY: install install-dev demo test test-fast lint lock clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: $(DEMO_LOCK) pyproject.toml | $(VENV)/bin/python
	@echo "atelier: installing the demo's locked packages into $(VENV) (about 1 minute)"
	$(PIP) install --progress-bar on -r $(DEMO_LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev-installed: $(DEV_LOCK) pyproject.toml | $(VENV)/bin/python
	@echo "atelier: installing the tests' locked packages into $(VENV) (about 2 minutes)"
	$(PIP) install --progress-bar on -r $(DEV_LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.demo-installed
	$(PY) tools/check_lock.py $(DEMO_LOCK)

install-dev: $(VENV)/.dev-installed
	$(PY) tools/check_lock.py $(DEV_LOCK)

demo: install
	$(VENV)/bin/atelier demo

test: install-dev
	$(PY) -m pytest

# The developer's loop (a couple of minutes on 2 cores): no slow, PostgreSQL or model tests.
test-fast: install-dev
	$(PY) -m pytest -m "not slow and not postgres and not models"

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Refresh the locks: resolve pyproject.toml's ranges against today's package index, dev first,
# then the demo's subset at the same versions. Run the tests on the result before committing it.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install -q --disable-pip-version-check $(PIP_TOOLS)
	$(COMPILE) --upgrade --extra dev -o $(DEV_LOCK) pyproject.toml
	$(COMPILE) --upgrade -c $(DEV_LOCK) --extra ui -o $(DEMO_LOCK) pyproject.toml

clean:
	rm -rf $(VENV) $(VENV)-lock .pytest_cache .ruff_cache *.egg-info
