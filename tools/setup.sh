#!/usr/bin/env bash
# One set-up command for a fresh clone: a virtual environment in .venv holding saev_nb (editable),
# torch/torchvision/open_clip from the package registry, the pinned nbdev 2 stack and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/python -m pip check
echo "set-up done: $(.venv/bin/python -c 'import torch, open_clip, nbdev; print("torch", torch.__version__, "open_clip", open_clip.__version__, "nbdev", nbdev.__version__)')"
