#!/usr/bin/env bash
# Quick start 1: set up (idempotent) and run the embedded default experiment.
# Extra arguments are Hydra overrides, e.g.  bash scripts/run_default.sh bits=w6a6
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# always computes (results/runs.jsonl ships with our rows; a plain `python run.py` would only print them)
exec "${QWT_VENV:-.venv}/bin/python" run.py results.skip_finished=false "$@"
