#!/usr/bin/env bash
# Paper table: ImageNet top-1, W4A4 QwT* (DeiT-T, ViT-B, Swin-T on RepQ-ViT; ResNet-50 on
# Percentile). Extra Hydra overrides pass through to every run, e.g.
#   bash experiments/table_qwt_star.sh data.root=/path/to/imagenet
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m +exp=deit_w4a4 model=deit_t compensation=qwt_star "$@"
python run.py -m +exp=vit_w4a4 model=vit_b compensation=qwt_star "$@"
python run.py -m +exp=swin_w4a4 model=swin_t compensation=qwt_star "$@"
python run.py -m +exp=resnet_w4a4 model=resnet50 compensation=qwt_star "$@"

python tools/make_tables.py
