#!/usr/bin/env bash
# The README's command-line walkthrough on the real SmolLM2-135M-Instruct: every command it shows, run in
# order, their output written to outputs/cli_walkthrough.txt (the README quotes it, trimmed where marked).
#
#     bash scripts/cli_walkthrough.sh            # about 15 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: "${HF_PRUNE_DATA_DIR:=$(pwd)/../shared/data}"
export HF_PRUNE_DATA_DIR
mkdir -p outputs
transcript=outputs/cli_walkthrough.txt
out=outputs/smollm2-20pct
rm -rf "$out"
: > "$transcript"

run() {  # the command, then its stdout (progress bars and log lines go to stderr, not into the transcript)
  printf '$ %s\n' "$*" | tee -a "$transcript"
  "$@" | tee -a "$transcript"
  echo | tee -a "$transcript"
}

run hf-prune inspect pypi:smollm2-135m-instruct
run hf-prune prune --model pypi:smollm2-135m-instruct --recipe recipes/llama-zero-shot-20pct.yaml --dry-run
run hf-prune prune --model pypi:smollm2-135m-instruct --recipe recipes/llama-zero-shot-20pct.yaml \
  --output "$out" --eval-windows 20 --latency
run hf-prune eval pypi:smollm2-135m-instruct
run hf-prune eval "$out"
run hf-prune push "$out" my-user/smollm2-135m-20pct --dry-run
echo "transcript: $transcript"
