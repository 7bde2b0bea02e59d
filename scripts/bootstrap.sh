#!/usr/bin/env bash
# Idempotent setup: a virtual environment (.venv, or $QWT_VENV) with qwt and its pinned
# dependencies. Re-runs in a second when nothing changed (a stamp holds pyproject.toml's hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QWT_VENV:-.venv}
STAMP="$VENV/.qwt-installed"
HASH=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[bootstrap] installing qwt and pinned dependencies into $VENV (first time: a few minutes, ~6 GB for torch)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,zoo,deploy]"
  echo "$HASH" > "$STAMP"
fi
