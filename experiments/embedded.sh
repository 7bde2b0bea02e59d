#!/usr/bin/env bash
# Embedded digits runs (no paper numbers): two small models x three PTQ baselines x three
# bit-widths; fills results/tables/embedded.md and top1_vs_bits.png. Extra Hydra overrides
# pass through, e.g.
#   bash experiments/embedded.sh compensation=qwt
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m model=embedded_vit,embedded_resnet ptq=rtn,percentile,repq_vit bits=w4a4,w6a6,w4a8 "compensation.variants=[none,qwt,qwt_v2]" "$@"

python tools/make_tables.py
