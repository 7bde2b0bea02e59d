#!/usr/bin/env bash
# Paper table: CLIP ViT-B/32 (OpenAI, open_clip) zero-shot ImageNet top-1, RepQ-ViT -> +QwT
# (+ QwT-v2), vision-only and vision+text quantization at W6A6 and W8A8. Needs ImageNet val and
# CC3M WebDataset shards, and the weights in the HF cache or as a local file:
#   bash experiments/table_clip.sh data.root=/path/to/imagenet data.cc3m_root=/path/to/cc3m \
#        [model.checkpoint=/path/to/open_clip_pytorch_model.bin]
# The reference's vision+text loop consumes 640 CC3M pairs: add compensation.qwt.num_samples=640.
set -euo pipefail
cd "$(dirname "$0")/.."

for exp in clip_vision_w6a6 clip_vision_w8a8 clip_vt_w6a6 clip_vt_w8a8; do
  python run.py +exp=$exp "$@"
done
# the embedded counterpart (both modes, every compensation), runs anywhere:
python run.py +exp=clip_embedded

python tools/make_tables.py
