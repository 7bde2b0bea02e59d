#!/usr/bin/env bash
# Paper table: ImageNet top-1, RepQ-ViT baseline -> +QwT (W4A4 and W6A6; DeiT, DeiT-dist,
# ViT, Swin). Extra Hydra overrides pass through to every sweep, e.g.
#   bash experiments/table_repq_vit_qwt.sh data.root=/path/to/imagenet
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m +exp=deit_w4a4 model=deit_t,deit_s,deit_b bits=w4a4,w6a6 "$@"
python run.py -m +exp=deit_dist_w4a4 model=deit_t_dist,deit_s_dist,deit_b_dist bits=w4a4,w6a6 "$@"
python run.py -m +exp=vit_w4a4 model=vit_s,vit_b bits=w4a4,w6a6 "$@"
python run.py -m +exp=swin_w4a4 model=swin_t,swin_s bits=w4a4,w6a6 "$@"

python tools/make_tables.py
