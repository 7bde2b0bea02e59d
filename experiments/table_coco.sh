#!/usr/bin/env bash
# Paper table: COCO val2017 AP box / AP mask, RepQ-ViT baseline -> +QwT (W4A4 and W6A6; Mask R-CNN
# Swin-T/S, Cascade Mask R-CNN Swin-T/S/B). Each model needs its own checkpoint: set the folder that
# holds the reference checkpoints (Swin-Transformer-Object-Detection release names) and COCO's root:
#   COCO=/path/to/coco CKPT=/path/to/checkpoints bash experiments/table_coco.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COCO:?set COCO=/path/to/coco (annotations/, train2017/, val2017/)}"
: "${CKPT:?set CKPT=/folder/with/the/detector/checkpoints}"

run() {  # exp model checkpoint-file
  python run.py -m +exp="$1" model="$2" bits=w4a4,w6a6 data.root="$COCO" model.checkpoint="$CKPT/$3" "${@:4}"
}
run maskrcnn_swin_w4a4 mask_rcnn_swin_t mask_rcnn_swin_tiny_patch4_window7.pth "$@"
run maskrcnn_swin_w4a4 mask_rcnn_swin_s mask_rcnn_swin_small_patch4_window7.pth "$@"
run cascade_swin_w4a4 cascade_mask_rcnn_swin_t cascade_mask_rcnn_swin_tiny_patch4_window7.pth "$@"
run cascade_swin_w4a4 cascade_mask_rcnn_swin_s cascade_mask_rcnn_swin_small_patch4_window7.pth "$@"
run cascade_swin_w4a4 cascade_mask_rcnn_swin_b cascade_mask_rcnn_swin_base_patch4_window7.pth "$@"

python tools/make_tables.py
