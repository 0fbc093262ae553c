"""qclip's CLIP training step against open_clip's own, on the same tiny model and batch.

Reference step (what open_clip_train.train.train_one_epoch does per batch): `model(images, texts)`,
`open_clip.loss.ClipLoss`, backward, `torch.optim.AdamW` with open_clip's weight-decay groups, clamp of the
logit scale. qclip's step: `qclip.train.clip_step` (same model, `qclip.loss.ClipLoss`, fused AdamW), with the
captions run on their own tokens as qclip's trainer runs them (`qclip.models.unpad_text`). `--captions random` fills
the whole context (nothing to skip: the step alone); `gt` / `syn` are the built-in DataCompDR scenes' captions.
Timings interleave the two in one process; peak memory is the peak RSS of one fresh subprocess per variant
(same model, batch and imports, so the difference is the step's own).

    python experiments/bench_train_step.py [--model tiny-vit] [--batch 128] [--precision fp32] [--reps 15]
                                           [--captions random|gt|syn]
"""
import argparse, json, resource, statistics, subprocess, sys, time
import torch, open_clip
from open_clip.loss import ClipLoss as OpenClipLoss
from qclip.models import create_clip, get_tokenizer, unpad_text
from qclip.data.synth import synth_sample
from qclip.loss import ClipLoss
from qclip.train import clip_step, param_groups, autocast

def openclip_groups(model, wd):  # open_clip_train/main.py's rule
    exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
    named = list(model.named_parameters())
    return [{'params': [p for n, p in named if exclude(n, p) and p.requires_grad], 'weight_decay': 0.},
            {'params': [p for n, p in named if not exclude(n, p) and p.requires_grad], 'weight_decay': wd}]

def make(variant, args):
    torch.manual_seed(0)
    model = create_clip(args.model)
    if variant == 'open_clip':
        opt = torch.optim.AdamW(openclip_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
        loss_fn = OpenClipLoss()
        def step(x, t):
            with autocast(x.device, args.precision):
                img, txt, scale = model(x, t[:, 0])
                loss = loss_fn(img, txt, scale)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            with torch.no_grad(): model.logit_scale.clamp_(0, 4.6052)
            return loss.detach()
    else:
        unpad_text(model)
        opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.95), eps=1e-6, fused=True)
        loss_fn = ClipLoss()
        step = lambda x, t: clip_step(model, x, t, loss_fn, opt, args.precision)
    return step

def batch(args):
    g = torch.Generator().manual_seed(1)
    size = open_clip.get_model_config(args.model)['vision_cfg']['image_size']
    tok = get_tokenizer(args.model)
    if args.captions == 'random':  # ending at the last position: the whole context is the caption
        t = torch.randint(1, 49000, (args.batch, 1, tok.context_length), generator=g); t[..., -1] = tok.eot_token_id
    else:
        s = [synth_sample('synth-datacompdr', i) for i in range(args.batch)]
        t = tok([x['txt'].decode() if args.captions == 'gt' else json.loads(x['syn.json'])['syn_text'][0]
                 for x in s])[:, None]
    return torch.randn(args.batch, 3, size, size, generator=g), t

def peak_mem(variant, args):
    step, (x, t) = make(variant, args), batch(args)
    for _ in range(3): step(x, t)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of a process doing only this, MB

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default='tiny-vit'); ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--precision', default='fp32'); ap.add_argument('--reps', type=int, default=15)
    ap.add_argument('--captions', default='random', choices=['random', 'gt', 'syn'])
    ap.add_argument('--mem-only', default=None)
    args = ap.parse_args()
    if args.mem_only: print(json.dumps(peak_mem(args.mem_only, args))); return
    steps = {v: make(v, args) for v in ['open_clip', 'qclip']}
    x, t = batch(args)
    for s in steps.values(): s(x, t); s(x, t)  # warm-up
    times = {v: [] for v in steps}
    for _ in range(args.reps):
        for v, s in steps.items():
            t0 = time.perf_counter(); s(x, t); times[v].append(time.perf_counter() - t0)
    mem = {v: json.loads(subprocess.run([sys.executable, __file__, '--mem-only', v, '--model', args.model, '--batch',
                                         str(args.batch), '--precision', args.precision, '--captions', args.captions],
                                        capture_output=True, text=True, check=True).stdout) for v in steps}
    print(f"{args.model}, batch {args.batch}, {args.precision}, {args.captions} captions, {args.reps} interleaved "
          f"reps, {torch.get_num_threads()} threads")
    print(f"{'step':<10}{'median s':>10}{'samples/s':>12}{'peak MB':>10}")
    for v in steps:
        med = statistics.median(times[v])
        print(f"{v:<10}{med:>10.3f}{args.batch / med:>12.1f}{mem[v]:>10.0f}")
    ratio = statistics.median(times['open_clip']) / statistics.median(times['qclip'])
    print(f"ratio qclip/open_clip samples/s: {ratio:.3f}")

if __name__ == '__main__': main()
