#!/usr/bin/env bash
# Set up kedavra in ./.venv on a fresh machine.  Usage: bash scripts/setup.sh [--test]
#   --test also installs the test-only dependencies (pytest, hypothesis, and diffusers +
#   transformers as reference oracles).
# torch 2.13.0 (CPU build) is installed first where the package index has it, so that the range
# declared in pyproject.toml is met without pulling a multi-GB CUDA build; elsewhere pip resolves
# the declared range as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $pip install -q torch==2.13.0 2>/dev/null || echo "torch 2.13.0 not available here; pip will pick a release in the declared range"
fi
$pip install -q -e ".${extras}"
if [ -n "$extras" ]; then
    # open_clip's tokenizer is the SD 2.x tokenizer oracle; its package would pull torchvision and a CUDA
    # torch, so it comes without dependencies (the test loads only its tokenizer module).
    $pip install -q --no-deps open-clip-torch ftfy wcwidth
fi
