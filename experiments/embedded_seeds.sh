#!/usr/bin/env bash
# The embedded benchmark's headline table over three calibration seeds (no paper numbers): the
# shipped embedded ViT on "digits in the wild", RepQ-ViT at W4A4 (the headline: the base loses
# > 3 points) and W6A6, every default compensation variant; then QwT-v2's target (global / local)
# and shrinkage, and the QwT+QwT-v2 chain, at W4A4; and the embedded ResNet (Percentile W4A4).
# Fills results/tables/embedded_seeds.md (mean ± std over seeds, paired difference to the base).
# Extra Hydra overrides pass through to every sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=seed=0,1,2

python run.py -m $SEEDS bits=w4a4,w6a6 "$@"
python run.py -m $SEEDS bits=w4a4 exp_name=embedded_qwt_v2_local "compensation.variants=[none,qwt_v2]" compensation.qwt_v2.target=local "$@"
python run.py -m $SEEDS bits=w4a4 exp_name=embedded_qwt_v2_shrink "compensation.variants=[none,qwt_v2]" compensation.qwt_v2.shrinkage=0.5 "$@"
python run.py -m $SEEDS bits=w4a4 exp_name=embedded_qwt_v2_local_shrink "compensation.variants=[none,qwt_v2]" compensation.qwt_v2.target=local compensation.qwt_v2.shrinkage=0.5 "$@"
python run.py -m $SEEDS bits=w4a4 exp_name=embedded_chain "compensation.variants=[none,qwt+qwt_v2]" "$@"
python run.py -m $SEEDS bits=w4a4 model=embedded_resnet ptq=percentile exp_name=embedded_resnet "compensation.variants=[none,qwt,qwt_v2,qft]" "$@"

python tools/make_tables.py
