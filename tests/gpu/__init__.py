"""GPU tests (CUDA vLLM): `make test-gpu`. Skipped where torch.cuda.is_available() is false.

This folder is a package so that its conftest imports as ``gpu.conftest``: a second plain
``conftest`` module would replace tests/conftest.py in ``sys.modules``, and the CPU tests that
run after this folder is collected do ``from conftest import ...``.
"""
