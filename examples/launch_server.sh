#!/usr/bin/env bash
# Serve a model with SPARSESPEC (GPU host). Usage: examples/launch_server.sh MODEL_DIR [PORT] [extra sglang flags]
set -euo pipefail
model=${1:?usage: launch_server.sh MODEL_DIR [PORT] [flags...]}
port=${2:-30000}
shift $(( $# >= 2 ? 2 : 1 ))
exec python -m sglang.launch_server --model-path "$model" --port "$port" \
  --speculative-algorithm SPARSESPEC --speculative-num-steps 8 --sparsespec-sparsity 0.05 "$@"
