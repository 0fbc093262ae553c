"""Which patch features should the frozen dense probes read? Each design's pretrained-minus-random gain, paired by seed.

    python experiments/probe_features.py                          # the encoders of `make reproduce` (runs/table1-small)
    python experiments/probe_features.py --root runs/table1-sensitivity/pretrain --n 256 --val 256   # quicker

For every pretraining run under --root (0-step runs are the random-init floor), the depth, box and segmentation probes
of `qclip.probes` are fitted on four feature sets of the frozen tower: the last block's patch tokens (what the probes
stage reads), the last block with the pooled token appended to each patch, the last 4 blocks concatenated (DINOv2's
"lin. 4"), and the last 4 blocks with the pooled token. It prints, per design and read-out, the random-init and
pretrained means and the gain of the pretrained runs (mean over their datasets) over random init of the same seed,
with its 95% t-interval (`qclip.results.paired_ci`).

On the 12 encoders `make reproduce` trained before it moved to tiny-vit-p16 (tiny-vit, 120 steps x 128 samples; 1024 +
1024 images, 10 minutes on 2 cores) the richer designs helped random init more than the pretrained encoders: depth
gain +0.04 m [-0.03, +0.11] (last block), -0.04 [-0.09, +0.02] (last 4 + pooled); box AP -0.10 [-0.76, +0.56] and
-0.86 [-1.46, -0.26]; segmentation mIoU +0.27 [+0.23, +0.30] and -0.50 [-0.99, -0.01]. So the probes keep reading the
last block.
"""
import argparse, copy, time
from pathlib import Path
import pandas as pd, torch, yaml
from qclip.probes import _models, depth_probe, box_probe, seg_probe, PROBE_DEFAULTS
from qclip.finetune import synth_arrays, _norm
from qclip.heads import pooled_tower
from qclip.data.synth import CLASSES
from qclip.results import paired_ci

DESIGNS = ('last', 'last+pooled', 'last4', 'last4+pooled')

@torch.no_grad()
def features(tower, images, blocks=4, batch_size=256):
    "Pooled features [N, D] and the last `blocks` blocks' maps [N, blocks, C, h, w] of a frozen tower."
    t, _ = pooled_tower(copy.deepcopy(tower).eval()); norm = _norm(tower); P, M = [], []
    for i in range(0, len(images), batch_size):
        out = t.forward_intermediates(norm(images[i:i + batch_size]), indices=blocks, output_fmt='NCHW')
        P.append(out['image_features'].float())
        M.append(torch.stack([m.float() for m in out['image_intermediates']], 1))
    return torch.cat(P), torch.cat(M)

def design(P, M, name):
    "The NCHW feature map a probe reads under design `name`."
    N, k, C, h, w = M.shape
    maps = M.reshape(N, k * C, h, w) if name.startswith('last4') else M[:, -1]
    return torch.cat([maps, P[:, :, None, None].expand(-1, -1, h, w)], 1) if name.endswith('+pooled') else maps

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--root', default='runs/table1-small/pretrain', help='folder of 10_pretrain runs')
    ap.add_argument('--n', type=int, default=1024, help='training images of the dense probes')
    ap.add_argument('--val', type=int, default=1024, help='validation images')
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tr, va = synth_arrays('synth-datacompdr', 'train', a.n), synth_arrays('synth-datacompdr', 'val', a.val)
    rows = []
    for d in sorted(Path(a.root).iterdir()):
        if not (d/'params.yaml').is_file(): continue
        p = yaml.safe_load((d/'params.yaml').read_text())
        tower = _models({**PROBE_DEFAULTS, 'encoder': str(d)})[0]
        t0 = time.time(); (Ptr, Mtr), (Pva, Mva) = features(tower, tr['images']), features(tower, va['images'])
        for name in DESIGNS:
            A, B = design(Ptr, Mtr, name), design(Pva, Mva, name)
            rows.append(dict(row='random' if p['steps'] == 0 else p['dataset'], seed=p['seed'], design=name,
                             depth_rmse=depth_probe(A, tr['depth'], B, va['depth'])['rmse'],
                             box_AP=box_probe(A, tr['inst'], B, va['inst'])['AP'],
                             seg_mIoU=seg_probe(A, tr['seg'], B, va['seg'], len(CLASSES))['mIoU']))
        print(f'{d.name}: {time.time() - t0:.0f} s', flush=True)
    df = pd.DataFrame(rows)
    for name in DESIGNS:
        for metric, sign in (('depth_rmse', -1), ('box_AP', 1), ('seg_mIoU', 1)):
            w = df[df.design == name].pivot_table(index='seed', columns='row', values=metric)
            pre = w.drop(columns='random').mean(axis=1)
            m, lo, hi, n = paired_ci((sign * (pre - w['random'])).values)
            print(f'{name:13s} {metric:10s} random {w["random"].mean():.3f} pretrained {pre.mean():.3f} '
                  f'gain {m:+.3f} [{lo:+.3f}, {hi:+.3f}] ({n} seeds)')

if __name__ == '__main__': main()
