"""Reinforcement throughput: the `qclip reinforce` job (batched, key/value-cached sampling, one image encoding per image)
against a straightforward loop that calls open_clip's `CoCa.generate` once per image and caption, on the same shards,
writing the same side-car records. Both include reading the tar, decoding and resizing the image and writing the output.

    .venv/bin/python experiments/bench_reinforce.py                          # CPU: tiny-coca, random init
    .venv/bin/python experiments/bench_reinforce.py --model tiny-coca --weights runs/reinforce/coca/model.safetensors
    python experiments/bench_reinforce.py --model coca_ViT-B-32 --device cuda --precision bf16 --images 512 \\
        --batch-size 128 --baseline-images 64                              # GPU (experiments/bench_reinforce_gpu.sh)

Random init (the default, no weights can be downloaded) is the hard case for the batched job: a random decoder's next
token distribution is nearly flat, so every caption runs to `--seq-len` and top-p keeps most of the vocabulary (sampled
from all 49,408 tokens, like `CoCa.generate`). A trained captioner ends captions early and keeps a few candidates.
Prints the median images/s of each over `--reps` repetitions, side by side, and their ratio.
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')
import argparse, hashlib, json, statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch, webdataset as wds

warnings.filterwarnings('ignore')


def baseline(shards, out_dir, model, n, seq_len, decoding, top_p, top_k, device, precision, limit=None):
    "One `CoCa.generate` call per image and caption: decode, resize, generate, write the same records. Images done."
    from qclip.data.augment import CropTransform, normalize_batch
    from qclip.data.shards import BadCounter, IMAGE_KEYS, read_tar
    from qclip.reinforce import decode_captions, sample_uid
    size = model.visual.image_size; size = size[0] if isinstance(size, (tuple, list)) else size
    tf, done = CropTransform(size, train=False), 0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for url in shards:
        with wds.TarWriter(str(Path(out_dir)/Path(url).name), mtime=0) as w:
            for s in read_tar(url, BadCounter()):
                if limit is not None and done >= limit: return done
                key = next(k for k in IMAGE_KEYS if k in s)
                x = normalize_batch(tf(s[key])[None]).to(device)
                caps = []
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
                    for _ in range(n):
                        t = model.generate(x, generation_type=decoding, top_p=top_p, top_k=top_k, seq_len=seq_len)
                        caps += decode_captions(t)
                w.write({'__key__': s['__key__'], 'json': json.dumps({'uid': sample_uid(s), 'sha256': hashlib.sha256(s[key]).hexdigest()}),
                         'syn.json': json.dumps({'syn_text': caps})})
                done += 1
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='tiny-coca'); ap.add_argument('--weights', default='')
    ap.add_argument('--images', type=int, default=64, help='images the batched job captions')
    ap.add_argument('--baseline-images', type=int, default=16, help='images the per-image loop captions (it is slow)')
    ap.add_argument('--n-captions', type=int, default=3); ap.add_argument('--seq-len', type=int, default=20)
    ap.add_argument('--decoding', default='top_p', choices=['top_p', 'top_k']); ap.add_argument('--top-p', type=float, default=0.9)
    ap.add_argument('--top-k', type=int, default=50); ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--device', default='cpu'); ap.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    ap.add_argument('--reps', type=int, default=3); ap.add_argument('--size', type=int, default=64, help='side of the stored images')
    ap.add_argument('--out', default='', help='write the figures as JSON here')
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    from qclip.data.synth import write_synth_shards
    from qclip.reinforce import create_coca, reinforce
    dev = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix='bench_reinforce_'))
    shards = [str(p) for p in write_synth_shards('synth-align', tmp/'img'/'train', a.images, shard_size=max(1, a.images // 2),
                                                 size=a.size)]
    model = create_coca(a.model, a.weights or None).to(dev)
    kw = dict(dataset='datacomp', data_root=str(tmp/'img'), coca=a.model, coca_weights=a.weights, coca_train_steps=0,
              n_captions=a.n_captions, decoding=a.decoding, top_p=a.top_p, top_k=a.top_k, seq_len=a.seq_len,
              batch_size=a.batch_size, device=a.device, precision=a.precision)
    print(f'{a.model} ({"weights " + a.weights if a.weights else "random init"}) on {a.device} {a.precision}, '
          f'{a.n_captions} captions x <= {a.seq_len} tokens by {a.decoding}; {torch.get_num_threads()} threads', flush=True)
    batched, loop = [], []
    for r in range(a.reps):
        t = time.perf_counter(); res = reinforce(**kw, out_dir=str(tmp/f'job{r}'))
        batched.append(res['written'] / (time.perf_counter() - t))
        t = time.perf_counter(); n = baseline(shards, tmp/f'loop{r}', model, a.n_captions, a.seq_len, a.decoding, a.top_p, a.top_k,
                                               dev, a.precision, limit=a.baseline_images)
        loop.append(n / (time.perf_counter() - t))
        print(f'rep {r}: batched job {batched[-1]:.2f} img/s ({res["written"]} images), per-image generate loop {loop[-1]:.2f} img/s '
              f'({n} images)', flush=True)
    mb, ml = statistics.median(batched), statistics.median(loop)
    print(f'\n{"":28s} {"median img/s":>14s}\n{"qclip reinforce (batched)":28s} {mb:14.2f}\n'
          f'{"per-image CoCa.generate loop":28s} {ml:14.2f}\nratio batched / loop: {mb / ml:.1f}x')
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(vars(a), batched=batched, loop=loop, median_batched=mb, median_loop=ml,
                                               ratio=mb / ml, torch=torch.__version__), indent=1))
    return 0


if __name__ == '__main__': sys.exit(main())
