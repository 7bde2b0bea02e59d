#!/usr/bin/env bash
# Paper table: ImageNet top-1, ResNet-18/50/101, Percentile baseline -> +QwT (W4A4, W6A6,
# W4A8). Extra Hydra overrides pass through, e.g.
#   bash experiments/table_resnet_percentile.sh data.root=/path/to/imagenet
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m +exp=resnet_w4a4 model=resnet18,resnet50,resnet101 bits=w4a4,w6a6,w4a8 "$@"

python tools/make_tables.py
