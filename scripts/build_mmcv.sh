#!/usr/bin/env bash
# mmcv 2.1.0 with its compiled ops (mmdet 3.3.0 imports mmcv.ops), built ONCE per machine against
# the venv's torch and cached OUTSIDE the clone, keyed by mmcv, torch and Python versions:
#   ${QWT_WHEEL_CACHE:-~/.cache/qwt/wheels}/mmcv-2.1.0_torch-<torch>_cp<py>_<cpu|cuda>/mmcv-2.1.0-*.whl
# PyPI ships only mmcv's source; pip's own wheel cache would reuse a wheel built for another torch
# (undefined symbol at import), hence our own key. Usage: scripts/build_mmcv.sh <venv python>
# Prints the wheel path on its last line.
set -euo pipefail
PYBIN=${1:?usage: build_mmcv.sh <venv python>}
MMCV_VERSION=2.1.0
# torch.__version__ (with its local part: +cu128 / +cpu builds differ in ABI), read without importing torch
read -r TORCH_V PY_V < <("$PYBIN" -c "import importlib.util as u, os, sys; g = {}; exec(open(os.path.join(os.path.dirname(u.find_spec('torch').origin), 'version.py')).read(), g); print(g['__version__'], f'cp{sys.version_info[0]}{sys.version_info[1]}')")
if [ "${FORCE_CUDA:-0}" = "1" ]; then FLAVOR=cuda; else FLAVOR=cpu; fi
CACHE=${QWT_WHEEL_CACHE:-$HOME/.cache/qwt/wheels}
DIR="$CACHE/mmcv-${MMCV_VERSION}_torch-${TORCH_V}_${PY_V}_${FLAVOR}"
find_wheel() { ls "$DIR"/mmcv-${MMCV_VERSION}-*.whl 2>/dev/null | head -1; }
WHL=$(find_wheel || true)
if [ -z "$WHL" ]; then
  mkdir -p "$DIR"
  # build requirements without isolation (the build must see the venv's torch)
  "$PYBIN" -m pip install -q "wheel>=0.40" "ninja>=1.11" "setuptools>=65,<70"
  echo "[build_mmcv] building mmcv ${MMCV_VERSION} ops against torch ${TORCH_V} (${PY_V}, ${FLAVOR}); once per machine, ~8-15 min on 2 cores" >&2
  T0=$(date +%s)
  TMP=$(mktemp -d "$DIR/.build.XXXXXX")
  MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} \
    "$PYBIN" -m pip wheel --no-build-isolation --no-deps --no-cache-dir "mmcv==${MMCV_VERSION}" -w "$TMP" >&2
  mv "$TMP"/mmcv-${MMCV_VERSION}-*.whl "$DIR"/ && rmdir "$TMP"
  echo "[build_mmcv] built in $(( $(date +%s) - T0 ))s -> $DIR" >&2
  WHL=$(find_wheel)
fi
echo "$WHL"
