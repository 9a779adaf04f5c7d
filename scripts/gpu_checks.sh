#!/usr/bin/env bash
# GPU-host checks in stages of a few minutes each, on a CUDA host with SGLang and the plugin installed
# (README "Install"). Results go to $OUT (or ./gpu-results). Run from the root of the clone:
#   bash scripts/gpu_checks.sh tests     # kernel GPU tests + join/leave/retract + deterministic exact equality
#   bash scripts/gpu_checks.sh lossless  # the original end-to-end lossless test (overlap, no-overlap, dense)
#   bash scripts/gpu_checks.sh kernels   # kernel table at B 1/32/128 x 4K/16K/32K
#   bash scripts/gpu_checks.sh plain4k   # plain SGLang, B 128, 512 in / 4096 out (the baseline of spec4k)
#   bash scripts/gpu_checks.sh spec4k    # SPARSESPEC exact + draft-normalised, same workload
#   bash scripts/gpu_checks.sh batches   # plain vs SPARSESPEC at B 32/64/128, 512 in / 2048 out
#   bash scripts/gpu_checks.sh accept    # break-even: forced acceptance 5..9 at B 64, 512 in / 2048 out (1, 3: docs/results.md)
#   bash scripts/gpu_checks.sh offload   # retraction with the KV kept in HiCache: lossless test + B 128 / 4K run
#   bash scripts/gpu_checks.sh sampling  # temperature / top-p / top-k: SPARSESPEC keeps plain's distribution
#   bash scripts/gpu_checks.sh tp2       # --tp 2 (two GPUs), deterministic greedy equality
#   bash scripts/gpu_checks.sh unified   # unified passes (the default): join/leave + logprob-switch, no-CUDA-graph and adaptive (both dense backends) lossless tests
#   bash scripts/gpu_checks.sh unified2k # lockstep vs unified vs unified without delayed verification, B 128 512/2048 (pass timing)
#   bash scripts/gpu_checks.sh unified4k # lockstep vs unified at B 128 512/4096 (full-batch pass sizes, pass timing)
#   bash scripts/gpu_checks.sh ngram4k   # plain vs NGRAM at B 128 512/4096 (the spec4k workload)
#   bash scripts/gpu_checks.sh pool50    # KV pool at 50% of the final KV, B 128 512/4096: plain retract vs plain + HiCache
#   bash scripts/gpu_checks.sh pool50spec # the same for SPARSESPEC + HiCache (with the host-copy timing lines)
#   bash scripts/gpu_checks.sh long16k   # plain vs SPARSESPEC at B 16, 512/16384 (speedup vs context from the log)
#   bash scripts/gpu_checks.sh shape14b  # plain vs SPARSESPEC, Qwen3-14B shape, B 32/64, 512/2048
#   bash scripts/gpu_checks.sh everytoken # every-token lossless check (plain teacher-forces each output), random weights
#   bash scripts/gpu_checks.sh adaptive1k  # plain FlashInfer vs adaptive (dense steps on Triton, on FlashInfer), B 128, 512/1024
#   bash scripts/gpu_checks.sh adaptive16k # the B 16, 512/16384 ramp (speedup vs context from the log); RUNS= picks
#                                          # the configurations (one or two per command: each takes ~3-4 min)
#   bash scripts/gpu_checks.sh adaptivemix # a mixed batch: B 128, half 512-token and half 8192-token prompts, 1024 out
#   bash scripts/gpu_checks.sh adaptiveprofile # the adaptive server of adaptive1k (dense passes on FlashInfer) with
#                                          # --profile: per-cycle host/GPU split and a torch.profiler trace (~3 min)
#   bash scripts/gpu_checks.sh splits    # equal vs length-proportional KV splits (split_by_length), B 8/40 x 8K/16K,
#                                        # equal and unequal contexts (--spread 0.75), all kernels (~3 min)
#   bash scripts/gpu_checks.sh satprofile # the paper's saturated workload, one SPARSESPEC server (CONFIG=, default
#                                          # sparsespec) with --sparsespec-profile: per-cycle phases and the top CUDA
#                                          # kernels of a few cycles at ~8K contexts (syncs: its tok/s is not a result)
#   bash scripts/gpu_checks.sh prefix    # radix-cache hits: plain (Triton, FlashInfer) vs SPARSESPEC on bench_serving's
#                                        # generated-shared-prefix dataset, 8B shape, 32 x 16 requests (~8 min)
#   bash scripts/gpu_checks.sh constrained # regex / JSON-schema requests: SPARSESPEC equals plain, outputs obey (~3 min)
# Real weights (SmolLM2-135M): scripts/gpu_real_weights.sh.
# then, on any machine: python scripts/plot_results.py $OUT/*.json --out-dir plots/
set -euo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
bench4k="python scripts/bench_throughput.py --batch 128 --input-len 512 --output-len 4096 --forced-accept 7"
case "${1:-}" in
  tests)
    python -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
      tests/test_e2e_gpu.py::test_join_leave_and_retract_stay_lossless \
      tests/test_e2e_gpu.py::test_deterministic_inference_output_is_exactly_plain \
      2>&1 | tail -30 | tee "$out/gpu_tests.txt" ;;
  lossless)
    python -m pytest -q -p no:cacheprovider -m gpu tests/test_e2e_gpu.py::test_greedy_output_equals_plain_decoding \
      2>&1 | tail -30 | tee "$out/gpu_lossless.txt" ;;
  kernels)
    python scripts/bench_kernels.py --out "$out/bench_kernels.json" 2>&1 | grep -E "^B=|wrote" ;;
  plain4k)
    $bench4k --runs plain --out "$out/bench_b128_4k_plain.json" > "$out/bench_b128_4k_plain.log" 2>&1
    grep -E "^plain|Traceback" "$out/bench_b128_4k_plain.log" ;;
  spec4k)
    $bench4k --runs sparsespec,sparsespec-draftnorm --out "$out/bench_b128_4k_spec.json" \
      > "$out/bench_b128_4k_spec.log" 2>&1 || true
    grep -E "^sparsespec|Traceback|Retract" "$out/bench_b128_4k_spec.log" | head -20 ;;
  batches)
    python scripts/bench_throughput.py --batch 32,64,128 --input-len 512 --output-len 2048 --forced-accept 7 \
      --runs plain,sparsespec-draftnorm --out "$out/bench_batches.json" > "$out/bench_batches.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_batches.log" ;;
  accept)
    python scripts/bench_throughput.py --batch 64 --input-len 512 --output-len 2048 --forced-accept 5,6,7,8,9 \
      --runs plain,sparsespec-draftnorm --out "$out/bench_accept.json" > "$out/bench_accept.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_accept.log" ;;
  offload)
    python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_e2e_gpu.py::test_retracted_requests_come_back_from_the_host_cache_losslessly \
      2>&1 | tail -30 | tee "$out/gpu_offload_test.txt" || true
    $bench4k --runs sparsespec-draftnorm-hicache --log-level info --out "$out/bench_b128_4k_hicache.json" \
      > "$out/bench_b128_4k_hicache.log" 2>&1 || true
    grep -E "^sparsespec|Traceback" "$out/bench_b128_4k_hicache.log" ;;
  sampling)
    python scripts/check_sampling.py --out "$out/sampling.json" 2>&1 | grep -E "min p-value|DISTRIBUTION|Traceback" ;;
  tp2)
    python scripts/check_lossless.py --out "$out/lossless_tp2_det.json" --tp 2 --dtype bfloat16 --num-prompts 8 \
      --max-new-tokens 128 --prompt-len 64 256 --deterministic --modes overlap 2>&1 \
      | grep -E "^sparsespec|EQUAL|DIVERGED-AT-NEAR-TIES|MISMATCH|Traceback" ;;
  adaptive1k)
    python scripts/bench_throughput.py --batch 128 --input-len 512 --output-len 1024 --forced-accept 7 \
      --runs "${RUNS:-plain-flashinfer,sparsespec-unified-adaptive,sparsespec-unified-adaptive-flashinfer}" --log-level info \
      --quiet --out "$out/bench_adaptive_b128_1k.json" > "$out/bench_adaptive_b128_1k.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_adaptive_b128_1k.log" ;;
  adaptive16k)
    runs=${RUNS:-plain-flashinfer,sparsespec-unified-adaptive}
    python scripts/bench_throughput.py --batch 16 --input-len 512 --output-len 16384 --forced-accept 7 \
      --runs "$runs" --log-level info --quiet --out "$out/bench_adaptive_b16_16k_${runs//,/_}.json" \
      > "$out/bench_adaptive_b16_16k_${runs//,/_}.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_adaptive_b16_16k_${runs//,/_}.log" ;;
  adaptivemix)
    python scripts/bench_throughput.py --batch 128 --input-len 512 --long-input-len 8192 --long-share 0.5 \
      --output-len 1024 --forced-accept 7 \
      --runs "${RUNS:-plain-flashinfer,sparsespec-unified,sparsespec-unified-adaptive}" --log-level info --quiet \
      --out "$out/bench_adaptive_mixed_b128.json" > "$out/bench_adaptive_mixed_b128.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_adaptive_mixed_b128.log" ;;
  adaptiveprofile)
    python scripts/bench_throughput.py --batch 128 --input-len 512 --output-len 1024 --forced-accept 7 \
      --runs sparsespec-unified-adaptive-flashinfer --profile --log-level info --quiet \
      --out "$out/bench_adaptive_b128_1k_profile.json" > "$out/bench_adaptive_b128_1k_profile.log" 2>&1 || true
    grep -E "^sparsespec|SPARSESPEC cycles|Traceback" "$out/bench_adaptive_b128_1k_profile.log" | tail -5 ;;
  splits)
    python -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py -k split_by_length 2>&1 | tail -2
    for sp in 0 0.75; do
      python scripts/bench_kernels.py --batches 8,40 --contexts 8192,16384 --spread $sp --quiet \
        --out "$out/bench_kernels_split_by_length_spread$sp.json" 2>&1 | grep -E "^B=|Traceback"
    done ;;
  satprofile)
    cfg=${CONFIG:-sparsespec}
    python scripts/bench_saturated.py --config "$cfg" --mode steady-state --window 10 --saturation-timeout 90 \
      --server-args="--sparsespec-profile $out/satprofile_$cfg.json" \
      --out "$out/satprofile_$cfg.run.json" > "$out/satprofile_$cfg.log" 2>&1 || true
    tail -3 "$out/satprofile_$cfg.log"
    gzip -f "$out/satprofile_$cfg.json.trace.json" 2>/dev/null || true
    head -40 "$out/satprofile_$cfg.json.ops.txt" 2>/dev/null || echo "no ops table" ;;
  unified)
    python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_e2e_gpu.py::test_unified_schedule_stays_lossless_as_requests_join_and_leave \
      tests/test_e2e_gpu.py::test_unified_schedule_without_cuda_graphs_stays_lossless \
      tests/test_e2e_gpu.py::test_adaptive_speculation_stays_lossless_as_requests_join_and_leave \
      2>&1 | tail -5 | tee "$out/gpu_unified_test.txt" ;;
  unified2k)
    python scripts/bench_throughput.py --batch 128 --input-len 512 --output-len 2048 --forced-accept 7 \
      --runs sparsespec-draftnorm,sparsespec-draftnorm-unified,sparsespec-draftnorm-unified-nodelay \
      --log-level info --out "$out/bench_unified.json" > "$out/bench_unified.log" 2>&1 || true
    grep -E "^sparsespec|SPARSESPEC unified:|Traceback" "$out/bench_unified.log" ;;
  unified4k)
    $bench4k --runs sparsespec-draftnorm,sparsespec-draftnorm-unified --log-level info \
      --out "$out/bench_b128_4k_unified.json" > "$out/bench_b128_4k_unified.log" 2>&1 || true
    grep -E "^sparsespec|SPARSESPEC unified:|Traceback" "$out/bench_b128_4k_unified.log" ;;
  ngram4k)
    $bench4k --runs plain,ngram --log-level info --out "$out/bench_b128_4k_ngram.json" \
      > "$out/bench_b128_4k_ngram.log" 2>&1 || true
    grep -E "^plain|^ngram|Traceback" "$out/bench_b128_4k_ngram.log" ;;
  pool50)
    $bench4k --max-total-tokens 295000 --runs plain,plain-hicache --log-level info \
      --out "$out/bench_pool50_plain.json" > "$out/bench_pool50_plain.log" 2>&1 || true
    gzip -kf "$out/bench_pool50_plain.log"
    grep -E "^plain|SPARSESPEC KV offload|Traceback" "$out/bench_pool50_plain.log" | tail -8 ;;
  pool50spec)
    $bench4k --max-total-tokens 295000 --runs sparsespec-draftnorm-hicache --log-level info \
      --out "$out/bench_pool50_spec.json" > "$out/bench_pool50_spec.log" 2>&1 || true
    gzip -kf "$out/bench_pool50_spec.log"
    grep -E "^sparsespec|SPARSESPEC KV offload|Traceback" "$out/bench_pool50_spec.log" | tail -8 ;;
  long16k)
    python scripts/bench_throughput.py --batch 16 --input-len 512 --output-len 16384 --forced-accept 7 \
      --runs plain,sparsespec-draftnorm --log-level info --out "$out/bench_b16_16k.json" > "$out/bench_b16_16k.log" 2>&1 || true
    gzip -kf "$out/bench_b16_16k.log"
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_b16_16k.log" ;;
  shape14b)
    python scripts/bench_throughput.py --shape qwen3-14b --batch 32,64 --input-len 512 --output-len 2048 --forced-accept 7 \
      --runs plain,sparsespec-draftnorm --log-level info --out "$out/bench_14b.json" > "$out/bench_14b.log" 2>&1 || true
    grep -E "^plain|^sparsespec|^speedup|Traceback" "$out/bench_14b.log" ;;
  everytoken)
    python scripts/check_every_token.py --shape small --num-prompts 16 --max-new-tokens 512 --stagger-s 0.05 \
      --ragged-max-new-tokens --quiet --out "$out/every_token_small.json" > "$out/every_token_small.txt" 2>&1 || true
    grep -E "^every-token|Traceback" -A12 "$out/every_token_small.txt" | tail -20 ;;  # the whole output stays in the .txt
  prefix)
    python scripts/bench_prefix_reuse.py --shape qwen3-8b --forced-accept 7 --gsp-num-groups 32 \
      --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256 \
      --out "$out/prefix_reuse.json" > "$out/prefix_reuse.log" 2>&1 || true
    grep -E "tok/s|FAILED|Traceback" "$out/prefix_reuse.log" | tail -12 ;;
  constrained)
    python scripts/check_constrained.py --num-prompts 16 --max-new-tokens 128 --out "$out/constrained.json" \
      > "$out/constrained.log" 2>&1 || true
    grep -E "^CONSTRAINED|^\[.* #|Traceback" "$out/constrained.log" | tail -20 ;;
  *)
    echo "usage: $0 {tests|lossless|kernels|plain4k|spec4k|batches|accept|offload|sampling|tp2|unified|unified4k|ngram4k|pool50|pool50spec|long16k|shape14b|everytoken|adaptive1k|adaptive16k|adaptivemix|adaptiveprofile|prefix|constrained}" >&2; exit 2 ;;
esac
