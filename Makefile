# Two commands a user needs: `make demo` and `make test`. Both build .venv/ first when needed.
VENV := .venv
PY := $(VENV)/bin/python
# make test-gpu runs on a CUDA host's own Python (with CUDA vLLM), not .venv.
GPU_PY ?= python3
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-slow test-gpu lint

venv:
	bash scripts/setup-venv.sh

demo: venv
	$(VENV)/bin/infinitevl-vllm demo

test: venv
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .

test-slow: venv
	$(PY) -m pytest -q -m slow

# The GPU suite (tests/gpu, on a CUDA host with vllm==0.32.0); writes benchmarks/results/gpu_vllm_checks.json.
test-gpu:
	PYTHONPATH=$(CURDIR):$(CURDIR)/kernels$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

lint: venv
	$(VENV)/bin/ruff check .
