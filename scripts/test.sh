#!/usr/bin/env bash
# Quick start 2: set up (idempotent) and run the test suite (slow / gpu tests deselected by default;
# add -m slow to run them). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${QWT_VENV:-.venv}/bin/python" -m pytest "$@"
