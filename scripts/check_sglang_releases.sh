#!/usr/bin/env bash
# Not CI: the CPU tests that touch SGLang, against releases CI does not install (CI runs the whole
# suite on the oldest and the newest supported release). Each release goes without deps into its
# own folder, put first on PYTHONPATH over an environment of the newest supported release, which
# brings the other requirements. Usage (from the repo root):
#   bash scripts/check_sglang_releases.sh .venv-sglang-0.5.23 0.5.18 0.5.19 0.5.20 0.5.21 0.5.22
set -euo pipefail
venv=$1; shift
tests=(tests/test_compat.py tests/test_plugin.py tests/test_sglang_contract.py tests/test_kv_reserve_patch.py
       tests/test_retraction_patch.py tests/test_offload_timing.py tests/test_sampling.py tests/test_lockstep.py
       tests/test_unified.py tests/test_deterministic.py tests/test_mixed_pass.py)
for release in "$@"; do
  dir=${TMPDIR:-/tmp}/sglang-release-$release
  [ -d "$dir/sglang" ] || "$venv/bin/pip" install -q --no-deps --target "$dir" "sglang==$release"
  echo "== SGLang $release: $(PYTHONPATH=$dir "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("sglang"))')"
  PYTHONPATH=$dir "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" || true
done
