#!/usr/bin/env bash
# The job-speed figures on one GPU, in one run of about 7 minutes: experiments/bench_job.py for eager:256 and
# compile:512 x gt and gt+syn (qclip's job, its bare step, and open_clip_train on the same shards, gt), after a check
# that the CUDA path of qclip.data.shards.device_batches gives the CPU's batches bit for bit.
#
# Needs torch with CUDA; qclip's pure-Python dependencies (open_clip_torch, timm, webdataset 1.0.2 and 0.2.86 for
# open_clip_train, braceexpand, fastcore, ftfy, wcwidth) are installed from wheels in .whl/:
#   bash experiments/bench_job_h200.sh prepare      # on a machine with network: the wheels into .whl/ (git-ignored)
#   OUT=results bash experiments/bench_job_h200.sh  # on the GPU machine, with .whl/ beside it
# Results: $OUT/job.json (rewritten after every row) and $OUT/job.txt (the printed table), $OUT/device_batches.txt.
set -u
if [ "${1:-}" = prepare ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl/oc
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64"
  plat="$plat --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps $plat -d .whl open_clip_torch==3.3.0 webdataset==1.0.2 timm==1.0.31 \
      braceexpand fastcore==1.12.47 ftfy wcwidth || exit 1
  python3 -m pip download -q --no-deps $plat -d .whl/oc webdataset==0.2.86 || exit 1   # open_clip_train's, kept apart
  ls -la .whl .whl/oc; du -sh .whl; exit 0
fi
OUT=${OUT:-experiments/results}; mkdir -p "$OUT"
pipi="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
$pipi /tmp/site .whl/*.whl || exit 1
$pipi /tmp/oc_site .whl/oc/*.whl || exit 1   # webdataset 0.2.86, for open_clip_train's subprocess only
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QCLIP_CACHE=/tmp/qclip-cache
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
nproc
python3 -c "import torch, open_clip, webdataset as w; print(torch.__version__, open_clip.__version__, w.__version__)"
# 1. device_batches on CUDA (side stream, events, pinned memory): the same bits as the loader's float32 batches
timeout 90 python3 - <<'EOF' 2>&1 | tee "$OUT/device_batches.txt"
import io, tempfile, torch, numpy as np, webdataset as wds
from pathlib import Path
from PIL import Image
from open_clip import get_tokenizer
from qclip.data.shards import ShardStream, make_loader, device_batches, DATASETS, train_transform
d = Path(tempfile.mkdtemp())
with wds.TarWriter(str(d/'00000.tar')) as w:
    for i in range(256):
        a = np.random.default_rng(i).integers(0, 255, (300, 320, 3), np.uint8)
        b = io.BytesIO(); Image.fromarray(a).save(b, format='JPEG')
        w.write({'__key__': f'{i:05d}', 'jpg': b.getvalue(), 'txt': f'photo {i}', 'syn.json': {'syn_text': ['a', 'b']}})
kw = dict(shards=[str(d/'00000.tar')], spec=DATASETS['datacompdr'], caption_source='gt+syn',
          tokenizer=get_tokenizer('ViT-B-16'), transform=train_transform(224), batch_size=64, extras=True)
ref = list(make_loader(ShardStream(**kw), 6, 2))
got = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()}
       for b in device_batches(make_loader(ShardStream(**kw, normalize=False), 6, 2, pin_memory=True), 'cuda')]
assert len(got) == 6 and all(got[i]['images'].dtype == torch.float32 for i in range(6))
assert all(torch.equal(a['images'], b['images']) and torch.equal(a['texts'], b['texts']) for a, b in zip(ref, got))
print('device_batches on cuda: 6 batches, images and texts bit-identical to the float32 loader batches')
EOF
# 2. the job against its step and open_clip_train (--out is rewritten after every row: a cut run keeps what it measured)
timeout 470 python3 experiments/bench_job.py --device cuda --model ViT-B-16 --precision bf16 \
    --setups eager:256 compile:512 --captions gt gt+syn --workers 15 --side 320 --steps 30 --reps 10 --log-every 5 \
    --skip 2 --timeout 300 \
    --open-clip-site /tmp/oc_site --out "$OUT/job.json" 2>&1 | tee "$OUT/job.txt"
