#!/usr/bin/env bash
# LLaMA table: INT4 weights (GPTQ) -> +QwT, WikiText-2 / C4 perplexity and the 8 commonsense QA
# tasks, on LLaMA-3-8B and LLaMA-2-7B (one GPU each; see configs/exp/llama3_8b_w4.yaml).
#   bash experiments/table_llama.sh data.root=/data/llm
# (model.path=... if the checkpoints are not in the local Hugging Face cache: run the two
# commands by hand then). The embedded table runs here on a CPU:
#   python run.py +exp=llama_embedded
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py +exp=llama3_8b_w4 "compensation.variants=[none,qwt,qwt@local,qwt_v2]" "$@"
python run.py +exp=llama2_7b_w4 "compensation.variants=[none,qwt,qwt@local,qwt_v2]" "$@"

python tools/make_tables.py
