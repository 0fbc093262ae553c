#!/usr/bin/env bash
# Reinforcement throughput on one GPU: open_clip's coca_ViT-B-32 and coca_ViT-L-14 at random init (no weights are
# downloaded), bf16, the batched `qclip reinforce` job beside a per-image CoCa.generate loop.
# Needs the `reinforce` extra (transformers 4.56.2); where open_clip is not installed, put its wheels in .whl/ as
# experiments/bench_mfu_h200.sh does. Writes JSON into $OUT (default experiments/results).
OUT=${OUT:-experiments/results}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 QCLIP_CACHE=/tmp/qclip-cache OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 280 python3 experiments/bench_reinforce.py --model coca_ViT-B-32 --device cuda --precision bf16 --images 1024 \
    --baseline-images 32 --batch-size 256 --n-captions 5 --seq-len 30 --size 256 --reps 3 --out "$OUT/reinforce_coca_b32.json"
timeout 280 python3 experiments/bench_reinforce.py --model coca_ViT-L-14 --device cuda --precision bf16 --images 512 \
    --baseline-images 16 --batch-size 128 --n-captions 5 --seq-len 30 --size 256 --reps 2 --out "$OUT/reinforce_coca_l14.json"
