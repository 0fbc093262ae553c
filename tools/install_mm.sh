#!/usr/bin/env bash
# Install the OpenMMLab stack (mmcv 2.1.0 with CPU/CUDA ops, mmengine, mmsegmentation, mmdet,
# pycocotools) into the given Python environment.
#
# PyPI has only mmcv's sdist, and as published it does not build against torch 2.14: its setup.py
# asks for C++14/17 (torch's headers need C++20) and imports pkg_resources (setuptools < 81,
# --no-build-isolation). We patch that, build the wheel once (about 22 min on 2 cores) and keep it
# in a wheelhouse outside the repo ($QCLIP_WHEELS, default ~/.cache/qclip/wheels), keyed by the
# torch and Python versions, so every later install takes seconds.
#
# usage: tools/install_mm.sh [PYTHON]      (default: .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")";; esac
MMCV=2.1.0
WHEELS=${QCLIP_WHEELS:-$HOME/.cache/qclip/wheels}
TAG=$("$PY" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print("torch%s-py%d%d" % (v, *sys.version_info[:2]))')
DEST="$WHEELS/$TAG"
mkdir -p "$DEST"
PIP=("$PY" -m pip)

if ! ls "$DEST"/mmcv-$MMCV-*.whl >/dev/null 2>&1; then
  echo "install_mm: building mmcv $MMCV for $TAG (one time, about 22 min on 2 cores) into $DEST"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "${PIP[@]}" install -q 'setuptools<81' wheel ninja
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV" -d "$WORK"
  tar -xzf "$WORK"/mmcv-$MMCV.tar.gz -C "$WORK"
  SRC="$WORK/mmcv-$MMCV"
  sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$SRC/setup.py"
  grep -q 'c++20' "$SRC/setup.py" || { echo "install_mm: could not patch $SRC/setup.py for C++20"; exit 1; }
  (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" wheel -q --no-deps --no-build-isolation . -w "$WORK/out")
  # publish atomically: a killed build leaves no half wheel behind
  W=$(ls "$WORK"/out/mmcv-*.whl)
  cp "$W" "$DEST/.$(basename "$W").tmp" && mv "$DEST/.$(basename "$W").tmp" "$DEST/$(basename "$W")"
fi
"${PIP[@]}" install -q "$DEST"/mmcv-$MMCV-*.whl 'mmengine==0.10.7' 'mmsegmentation==1.2.2' 'mmdet==3.3.0' pycocotools ftfy regex
"$PY" -c 'import mmcv, mmcv.ops, mmseg, mmdet; print("install_mm: mmcv", mmcv.__version__, "mmseg", mmseg.__version__, "mmdet", mmdet.__version__)'
