#!/usr/bin/env bash
# Quick start 1: set up (idempotent) and run the embedded default experiment over three
# calibration seeds, then print its table (mean ± std over seeds, paired difference to the base).
# Extra arguments are Hydra overrides, e.g.  bash scripts/run_default.sh bits=w4a4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY="${QWT_VENV:-.venv}/bin/python"
# always computes (results/runs.jsonl ships with our rows; a plain `python run.py` would only print them)
"$PY" run.py -m seed=0,1,2 results.skip_finished=false "$@"
"$PY" tools/make_tables.py --print embedded_seeds
