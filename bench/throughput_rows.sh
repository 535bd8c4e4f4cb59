#!/usr/bin/env bash
# The ttscale-against-vLLM rows of bench/RESULTS.md: one `ttscale bench throughput` run per row,
# its JSON and printout in $OUT (default bench/runs/<date>-cpu-vllm/).
#
#   make vllm-env bench-model          # once: vLLM's CPU build in .venv-vllm, the 21.7M model
#   bash bench/throughput_rows.sh      # every row; ROWS="p512-n16 beam-w4" picks some
#
# BACKENDS (default ttscale,vllm,ttscale:32,vllm:32: each engine at its default KV block size,
# then both at 32 tokens, the smallest block vLLM's CPU attention takes), REPEATS (default 2),
# SHARED (default ../shared, for GSM8K's questions). A row whose backend fails is reported and
# the next row runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/runs/$(date +%F)-cpu-vllm}"
mkdir -p "$out"
all="p512-n16 p512-n64 p512-8x16 p2048-n64 gsm8k-8x16 beam-w4"
common=(--model bench/models/qwen2-21m --backend "${BACKENDS:-ttscale,vllm,ttscale:32,vllm:32}"
        --output-len 64 --repeats "${REPEATS:-2}")

row() {
  local name=$1
  shift
  case " ${ROWS:-$all} " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/ttscale bench throughput "${common[@]}" "$@" --output-json "$out/$name.json" \
    2>&1 | tee "$out/$name.log" || echo "== $name: a backend failed (see $out/$name.log)"
}

row p512-n16 --dataset-name prefix-repeat --input-len 512 --num-prompts 1 --n 16
row p512-n64 --dataset-name prefix-repeat --input-len 512 --num-prompts 1 --n 64
row p512-8x16 --dataset-name prefix-repeat --input-len 512 --num-prompts 8 --n 16
row p2048-n64 --dataset-name prefix-repeat --input-len 2048 --num-prompts 1 --n 64
row gsm8k-8x16 --dataset-name gsm8k --dataset-path "${SHARED:-../shared}/data/gsm8k_test.jsonl" \
  --num-prompts 8 --n 16
row beam-w4 --dataset-name random --input-len 256 --num-prompts 8 --use-beam-search --beam-width 4
echo "== done: load average $(cut -d' ' -f1-3 /proc/loadavg); results in $out"
