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
  "$VENV/bin/python" -m pip install -q -e ".[test,zoo,deploy,det]"
  echo "$HASH" > "$STAMP"
fi
# Detection family: mmcv 2.1.0 with its compiled ops (PyPI has only its source). Built once per
# machine against the venv's torch by scripts/build_mmcv.sh and cached outside the clone under
# ~/.cache/qwt/wheels/mmcv-2.1.0_torch-<torch>_cp<py>_<cpu|cuda>/ (first time ~10-15 min on 2 cores;
# FORCE_CUDA=1 builds the CUDA ops on a machine with nvcc). A stamp makes re-runs instant.
DET_STAMP="$VENV/.qwt-det-installed"
DET_KEY="mmcv-2.1.0 mmdet-3.3.0 mmengine-0.10.7 $("$VENV/bin/python" -c "import importlib.util as u, os, sys; g = {}; exec(open(os.path.join(os.path.dirname(u.find_spec('torch').origin), 'version.py')).read(), g); print(g['__version__'], sys.version_info[:2])") cuda=${FORCE_CUDA:-0}"
if [ "${QWT_SKIP_DET:-0}" != "1" ] && { [ ! -f "$DET_STAMP" ] || [ "$(cat "$DET_STAMP")" != "$DET_KEY" ]; }; then
  T0=$(date +%s)
  WHL=$(scripts/build_mmcv.sh "$VENV/bin/python" | tail -1)
  echo "[bootstrap] installing $(basename "$WHL") + mmdet 3.3.0 + mmengine 0.10.7"
  "$VENV/bin/python" -m pip install -q "$WHL" "mmengine==0.10.7" "mmdet==3.3.0"
  "$VENV/bin/python" -c "import mmcv.ops, mmdet.apis" || { echo "[bootstrap] mmcv ops do not import: remove $(dirname "$WHL") and re-run" >&2; exit 1; }
  echo "$DET_KEY" > "$DET_STAMP"
  echo "[bootstrap] detection family ready in $(( $(date +%s) - T0 ))s"
fi
