#!/usr/bin/env bash
# Paper table: ImageNet top-1, W8A8 histogram-percentile baseline -> +QwT (the paper's
# TensorRT latency table; we compare accuracy only). Extra Hydra overrides pass through, e.g.
#   bash experiments/table_w8a8_hist.sh data.root=/path/to/imagenet
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m +exp=w8a8_hist model=deit_t,deit_s,deit_b,vit_s,vit_b,swin_t,swin_s "$@"

python tools/make_tables.py
