#!/usr/bin/env bash
# Table 1, Fig. 2 and Fig. 3 at their `gpu` profiles on one H100/H200, timed from an empty runs folder and data cache
# (the budget is 10 minutes of wall time, data generation included). Run on a GPU node where `make install` and
# `make mm` have been done (the OpenMMLab stack must be built for that node's torch and CUDA: tools/install_mm.sh).
#
#   bash experiments/gpu_profile.sh      # runs into runs/table1-gpu, runs/fig2-gpu; the results page into runs/results-gpu
#
# Prints the wall time of each step and of the whole; the tables are runs/results-gpu/table1.md and its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin; JOBS=${JOBS:-4}
export QCLIP_CACHE=${QCLIP_CACHE:-$PWD/runs/.cache-gpu} PYTHONUNBUFFERED=1   # an empty cache: data generation is timed too
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
step() { local s=$(date +%s); echo "== $*"; "$@"; echo "== $(( $(date +%s) - s )) s: $*"; }
for spec in table1 fig2; do
  yq=experiments/$spec.yaml
  step $BIN/qclip run $yq --profile gpu --jobs "$JOBS"
done
step $BIN/qclip run experiments/fig3.yaml --profile gpu --only attention
mkdir -p runs/results-gpu
step $BIN/papermill nbs/50_results.ipynb runs/results-gpu/50_results.ipynb -p runs_root "$PWD/runs" \
     -p experiment table1-gpu -p out_dir "$PWD/runs/results-gpu"
echo "total wall time: $(( $(date +%s) - t0 )) s (budget: 600 s)"
