#!/usr/bin/env bash
# DiT generation table: Q-DiT W4A8 -> +QwT / +QwT-v2 (FID, IS, precision/recall).
#   bash experiments/table_dit.sh                 # the embedded DiT (runs here, ~20 min on one CPU thread)
#   bash experiments/table_dit.sh real data.root=/path/to/imagenet model.checkpoint=/path/to/DiT-XL-2-256 \
#       generation.reference=/path/to/VIRTUAL_imagenet256_labeled.npz \
#       generation.feature_extractor_weights_path=/path/to/weights-inception-2015-12-05-6726825d.pth
# The real run samples 10k images per variant (4 variants incl. FP, DDIM 50, cfg 1.5): shard it over GPUs with
#   torchrun --nproc_per_node=8 run.py +exp=dit_w4a8 ...   (sampling resumes from results/samples after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "real" ]]; then
  shift
  python run.py +exp=dit_w4a8 "$@"
  # the timestep option of QwT's calibration (t = 0 is the reference; a list or 'sampled' are ours),
  # in its own results file so that the table's +QwT column stays the reference setting
  python run.py +exp=dit_w4a8 compensation.variants=[qwt] 'generation.calib_t=[0,250,500,750]' results.path=results/dit_calib_t.jsonl "$@"
else
  python run.py +exp=dit_embedded "$@"
  python run.py +exp=dit_embedded compensation.variants=[qwt] 'generation.calib_t=[0,250,500,750]' results.path=results/dit_calib_t.jsonl "$@"
  python run.py +exp=dit_embedded compensation.variants=[qwt] generation.calib_t=sampled results.path=results/dit_calib_t.jsonl "$@"
fi
python tools/make_tables.py
