"""Input pipeline throughput per CPU core: qclip's `ShardStream` against the bare PIL decode of the same JPEGs and
against open_clip's own webdataset pipeline (`open_clip_train.data.get_wds_dataset`), on the same shards.

Everything runs in this one process with one thread (no loader workers), so images per second of *process CPU
time* is images/s per core; wall-clock figures are printed beside them (they suffer from other jobs on a shared
machine). Each pipeline does what a training step needs from it:

- `pil`: `Image.open(...).convert('RGB')` of each JPEG (tar bytes already in memory): the floor.
- `open_clip`: tar read, shuffle, decode (PIL, `pilrgb`), open_clip's train transform (RandomResizedCrop scale (0.9, 1) bicubic,
  ToTensor, Normalize), tokenize the caption, batch.
- `qclip gt`: tar read, shuffle, fused decode + Table 11 crop + resize, tokenize, batch, normalise per batch.
- `qclip gt uint8`: the same, the batch left uint8 as the training job takes it (normalised on the GPU there).
- `qclip gt+syn`: the same plus `syn.json` parsing and a second (synthetic) caption per image (the paper's G+S).
- `qclip ... bicubic`: with open_clip's interpolation, for a like-for-like comparison.

    .venv/bin/python experiments/bench_input_pipeline.py                # 1536 images of 256 px, 3 repetitions
    .venv/bin/python experiments/bench_input_pipeline.py --images 512 --reps 1 --quick
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')
import argparse, io, json, random, statistics, tarfile, tempfile, time, warnings
from argparse import Namespace
from pathlib import Path
import numpy as np, torch
import webdataset as wds
from PIL import Image

torch.set_num_threads(1)
WORDS = 'a photo of the small large red blue green dog cat car tree house on in with near beside street park'.split()

def make_shards(root:Path, images:int, side:int, per_shard:int=256, seed:int=0)->list[str]:
    "256-px JPEGs with natural-image-like statistics (smooth colour fields + texture), caption and 5 synthetic captions."
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for k in range(0, images, per_shard):
        p = root/f'{k // per_shard:05d}.tar'
        with wds.TarWriter(str(p)) as w:
            for i in range(k, min(images, k + per_shard)):
                low = rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)
                a = np.asarray(Image.fromarray(low).resize((side, side), Image.BICUBIC)).astype(np.int16)
                a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
                b = io.BytesIO(); Image.fromarray(a).save(b, format='JPEG', quality=90)
                cap = lambda n: ' '.join(rng.choice(WORDS, n))
                w.write({'__key__': f'{i:09d}', 'jpg': b.getvalue(), 'txt': cap(12), 'json': {'uid': f'{i:09d}'},
                         'syn.json': {'syn_text': [cap(15) for _ in range(5)]}})
        urls.append(str(p))
    return urls

def timed(f):
    "(wall s, process CPU s, result) of `f()`."
    t, c = time.perf_counter(), time.process_time(); r = f(); return time.perf_counter() - t, time.process_time() - c, r

def run_pil(urls, n):
    "Bare decode of every JPEG, bytes read from the tars beforehand."
    blobs = []
    for u in urls:
        with tarfile.open(u) as tf: blobs += [tf.extractfile(m).read() for m in tf if m.name.endswith('.jpg')]
    blobs = blobs[:n]
    def go():
        for b in blobs: Image.open(io.BytesIO(b)).convert('RGB').load()
        return len(blobs)
    return go

def run_open_clip(urls, n, batch_size, size, interpolation='bicubic'):
    from open_clip import image_transform, get_tokenizer
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander
    # open_clip_train's `group_by_keys_nothrow` predates webdataset 1.0's end-of-shard marker (an empty dict) and
    # fails on it with KeyError('fname'): drop the marker, as webdataset < 1.0 did (no cost either way)
    ocd.tar_file_expander = lambda *a, **k: tar_file_expander(*a, **{**k, 'eof_value': None})
    get_wds_dataset = ocd.get_wds_dataset
    pre = image_transform(size, is_train=True, interpolation=interpolation)
    tok = get_tokenizer('ViT-B-16')
    args = Namespace(train_data='::'.join(urls), val_data=None, dataset_resampled=True, train_num_samples=n,
                     train_data_upsampling_factors=None, batch_size=batch_size, workers=0, world_size=1, seed=0,
                     val_num_samples=None)
    def go():
        data = get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tok)
        seen = 0
        for x, t in data.dataloader:
            seen += len(x)
            if seen >= n: break
        return seen
    return go

def run_qclip(urls, n, batch_size, size, caption_source, resample=Image.BILINEAR, normalize=True):
    from open_clip import get_tokenizer
    from qclip.data.shards import DATASETS, ShardStream, make_loader
    from qclip.data.augment import CropTransform
    tok = get_tokenizer('ViT-B-16')
    def go():
        s = ShardStream(urls, DATASETS['datacompdr'], caption_source, tok, CropTransform(size, resample=resample), batch_size,
                        extras=True, normalize=normalize)
        seen = 0
        for b in make_loader(s, -(-n // batch_size)):
            seen += len(b['images'])
        return seen
    return go

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--images', type=int, default=1536, help='images per pass')
    ap.add_argument('--side', type=int, default=256, help='stored JPEG side (px)')
    ap.add_argument('--size', type=int, default=224, help='model input side (px)')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--reps', type=int, default=3, help='repetitions, interleaved; the best is reported')
    ap.add_argument('--quick', action='store_true', help='skip the bicubic variant of qclip')
    ap.add_argument('--out', default='', help='write the figures to this JSON file')
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp())/'shards'
    urls = make_shards(root, a.images, a.side)
    print(f'{a.images} JPEGs of {a.side} px in {len(urls)} shards ({sum(Path(u).stat().st_size for u in urls) / a.images / 1024:.1f} KiB/sample) '
          f'-> {a.size} px, batch {a.batch_size}, 1 thread, no workers')
    pipes = {'pil decode only': run_pil(urls, a.images),
             'open_clip (get_wds_dataset)': run_open_clip(urls, a.images, a.batch_size, a.size),
             'qclip gt': run_qclip(urls, a.images, a.batch_size, a.size, 'gt'),
             'qclip gt+syn': run_qclip(urls, a.images, a.batch_size, a.size, 'gt+syn'),
             'qclip gt uint8': run_qclip(urls, a.images, a.batch_size, a.size, 'gt', normalize=False)}
    if not a.quick:
        pipes['qclip gt bicubic'] = run_qclip(urls, a.images, a.batch_size, a.size, 'gt', Image.BICUBIC)
    for f in pipes.values(): f()  # warm-up: imports, tokenizer caches, page cache
    res = {k: [] for k in pipes}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for r in range(a.reps):
            for k in (list(pipes) if r % 2 == 0 else list(pipes)[::-1]):
                wall, cpu, n = timed(pipes[k])
                res[k].append(dict(n=n, wall_s=wall, cpu_s=cpu, per_core=n / cpu, wall_rate=n / wall))
    best = {k: max(v, key=lambda d: d['per_core']) for k, v in res.items()}
    oc = best['open_clip (get_wds_dataset)']['per_core']
    pil = best['pil decode only']['per_core']
    print(f"\n{'pipeline':32s} {'img/s per core':>15s} {'(median)':>9s} {'img/s wall':>11s} {'vs open_clip':>13s} {'vs PIL':>7s}")
    for k, d in best.items():
        med = statistics.median(x['per_core'] for x in res[k])
        print(f"{k:32s} {d['per_core']:15.0f} {med:9.0f} {d['wall_rate']:11.0f} {d['per_core'] / oc:12.2f}x {d['per_core'] / pil:6.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(args=vars(a), runs=res, best=best), indent=1))

if __name__ == '__main__':
    main()
