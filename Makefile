# Two commands a user needs: `make demo` and `make test`. Both build .venv/ first when needed.
VENV := .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-slow lint

venv:
	bash scripts/setup-venv.sh

demo: venv
	$(VENV)/bin/infinitevl-vllm demo

test: venv
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check .
