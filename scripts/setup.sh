#!/usr/bin/env bash
# Create .venv with CPU-usable torch and the project (editable) plus test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  # Pinned pair known to work together (and served from a local mirror on the project's machines).
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
if ! .venv/bin/python -c "import robustx, pytorch_lightning, hydra, wandb, safetensors, pytest, adv_lib, captum, skimage, gradio, pyautoattack, playwright, submitit, optuna" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.robustx-installed ]; then
  # adv-lib needs visdom, whose sdist still imports pkg_resources at build time: build it
  # against a setuptools that has it, without build isolation.
  if ! .venv/bin/python -c "import visdom" >/dev/null 2>&1; then
    .venv/bin/pip install -q "setuptools<81" wheel
    .venv/bin/pip install -q --no-build-isolation "visdom>=0.2.4"
  fi
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.robustx-installed
fi
# Fashion-MNIST for the demo: Debian ships it; otherwise torchvision downloads it at first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
   || echo "setup: could not apt-get install dataset-fashion-mnist; train.py will try a download" >&2
fi
# Chromium for the explorer's browser test (tests/e2e/test_explore.py skips without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 \
   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
   || echo "setup: could not apt-get install chromium; the explorer's browser test will be skipped" >&2
fi
