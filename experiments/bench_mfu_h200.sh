#!/usr/bin/env bash
# MFU of the ViT-B/16 CLIP step (eager, torch.compile, open_clip's own) and the pretrain job's CUDA path, on one GPU.
# Needs torch with CUDA, and qclip's pure-Python dependencies (open_clip_torch, timm, webdataset, braceexpand, fastcore,
# ftfy, wcwidth): installed, or as wheels in .whl/, which this script installs into /tmp/site. Writes into $OUT
# (default experiments/results).
OUT=${OUT:-experiments/results}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 QCLIP_CACHE=/tmp/qclip-cache
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# 1. ViT-B/16 CLIP step, bf16: eager at two batch sizes, then torch.compile; open_clip's own step beside each
timeout 200 python3 experiments/bench_mfu.py --model ViT-B-16 --batch 256 512 --variants eager --reps 20 --out "$OUT/mfu_eager.json"
timeout 330 python3 experiments/bench_mfu.py --model ViT-B-16 --batch 512 --variants compile --reps 20 --out "$OUT/mfu_compile.json"
# 2. the pretrain job itself on the GPU (tiny model, built-in data): the CUDA path runs end to end
timeout 120 python3 -c "
from qclip.train import pretrain
r = pretrain(device='cuda', precision='bf16', model='tiny-vit', steps=40, batch_size=256, synth_n=2048, synth_val=256,
             eval_every=40, ckpt_every=20, log_every=10, workers=4, out_dir='/tmp/pretrain_cuda')
print({k: r[k] for k in ('steps', 'loss', 'val_i2t_r1')})
import json; print(open('/tmp/pretrain_cuda/metrics.jsonl').read())
"
