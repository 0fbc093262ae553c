"""Cost of `qclip.attention.attention_distance` against a plain forward pass of the same ViT on the same images.

Both run in this process under `torch.inference_mode()` in eval mode, interleaved (alternating which goes first),
after one warm-up each; we print per-repetition times, the medians and their ratio (goal: <= 1.5x).

    .venv/bin/python experiments/bench_attention.py --quick
    .venv/bin/python experiments/bench_attention.py --images 64 --batch-size 32 --renormalize 1 0
"""
import argparse, os, statistics, time
import torch, timm, open_clip
from qclip.attention import attention_distance, vit_parts

def build(spec:str, image_size:int):
    "Random-init model from 'timm:NAME' or 'open_clip:NAME'."
    lib, name = spec.split(':', 1)
    if lib == 'timm': return timm.create_model(name, pretrained=False, img_size=image_size)
    if lib == 'open_clip': return open_clip.create_model(name, force_image_size=image_size)
    raise ValueError(f'--models: {spec!r} must start with timm: or open_clip:')

def forward(model, batches):
    "The plain forward the analysis wraps: the image encoder only, eval, inference mode."
    fwd = vit_parts(model)['forward']
    model.eval()
    with torch.inference_mode():
        for x in batches: fwd(x)

def timed(f):
    "Wall and process CPU seconds of `f()` (CPU time is less sensitive to other jobs on a shared machine)."
    t, c = time.perf_counter(), time.process_time(); f(); return time.perf_counter() - t, time.process_time() - c

def bench(spec, images, batch_size, image_size, reps, renormalize):
    torch.manual_seed(0)
    model = build(spec, image_size).eval()
    vp = vit_parts(model)
    batches = list(torch.randn(images, 3, image_size, image_size).split(batch_size))
    run_fwd = lambda: forward(model, batches)
    run_ana = lambda: attention_distance(model, batches, renormalize=renormalize, progress=False)
    run_fwd(); run_ana()  # warm-up: allocator, oneDNN kernels
    tf, ta = [], []
    for r in range(reps):
        for f, ts in ((run_fwd, tf), (run_ana, ta))[::1 if r % 2 == 0 else -1]: ts.append(timed(f))
        print(f'  rep {r}: forward {tf[-1][0]:.3f} s  analysis {ta[-1][0]:.3f} s  ratio {ta[-1][0] / tf[-1][0]:.2f} '
              f'(CPU {tf[-1][1]:.2f} s / {ta[-1][1]:.2f} s)')
    (mf, cf), (ma, ca) = [[statistics.median(t[i] for t in ts) for i in (0, 1)] for ts in (tf, ta)]
    print(f'{spec} @ {image_size}px ({len(vp["attns"])} layers x {vp["attns"][0].num_heads} heads), {images} images, '
          f'batch {batch_size}, renormalize={renormalize}: forward median {mf:.3f} s ({images / mf:.1f} img/s), '
          f'analysis median {ma:.3f} s ({images / ma:.1f} img/s), ratio {ma / mf:.2f}x (CPU time ratio {ca / cf:.2f}x)')
    return ma / mf

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=['timm:vit_small_patch16_224', 'open_clip:ViT-S-16'])
    ap.add_argument('--images', type=int, default=32)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--image-size', type=int, default=224)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--renormalize', type=int, choices=[0, 1], nargs='+', default=[1])
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    ap.add_argument('--quick', action='store_true', help='16 images, batch 8, 3 reps, renormalize=True only')
    a = ap.parse_args()
    if a.quick: a.images, a.batch_size, a.reps, a.renormalize = 16, 8, 3, [1]
    if a.threads: torch.set_num_threads(a.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}')
    ratios = [bench(m, a.images, a.batch_size, a.image_size, a.reps, bool(r)) for m in a.models for r in a.renormalize]
    print(f'worst ratio {max(ratios):.2f}x (goal <= 1.5x)')
