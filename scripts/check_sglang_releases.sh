#!/usr/bin/env bash
# Not CI: the CPU tests that touch SGLang, against releases CI does not install (CI runs the whole
# suite on the oldest and the newest supported release). Each release goes without deps into its
# own folder (with the `kernels` package it needs from 0.5.18), put first on PYTHONPATH over an
# environment that brings the other requirements: the 0.5.17 one for releases that pin
# transformers 5.12.1 (0.5.18 to 0.5.21), the 0.5.23 one for 0.5.22. Usage (from the repo root):
#   bash scripts/check_sglang_releases.sh .venv 0.5.18 0.5.19 0.5.20 0.5.21
#   bash scripts/check_sglang_releases.sh .venv-sglang-0.5.23 0.5.22
set -euo pipefail
venv=$1; shift
tests=(tests/test_compat.py tests/test_plugin.py tests/test_sglang_contract.py tests/test_kv_reserve_patch.py
       tests/test_retraction_patch.py tests/test_offload_timing.py tests/test_acceptance.py tests/test_lockstep.py
       tests/test_unified.py tests/test_deterministic.py tests/test_mixed_pass.py)
for release in "$@"; do
  dir=${TMPDIR:-/tmp}/sglang-overlay-$release
  [ -d "$dir/sglang" ] || "$venv/bin/pip" install -q --no-deps --target "$dir" "sglang==$release" "kernels>=0.14.1,<0.15"
  echo "== SGLang $release: $(PYTHONPATH=$dir "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("sglang"))')"
  PYTHONPATH=$dir "$venv/bin/python" -m pytest -q -p no:cacheprovider --continue-on-collection-errors "${tests[@]}" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" || true
done
