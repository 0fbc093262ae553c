"""Samples/s and model-FLOPs utilisation (MFU) of CLIP pretraining steps on one GPU.

For each variant and batch size, one process times `qclip.train.clip_step` (the step `pretrain` runs: model forward,
qclip's ClipLoss, backward, fused AdamW, logit-scale clamp) and, side by side, open_clip's own step (what
`open_clip_train.train.train_one_epoch` does per batch: autocast forward, open_clip.loss.ClipLoss, AdamW with
open_clip's groups) on the same model and batch. Inputs are random tensors already on the GPU, so the figure is the
model step alone (the input pipeline is `bench_input_pipeline.py`).

Model FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward at
the benchmarked batch (matmuls, convolutions and attention; no recomputation, so gradient checkpointing would lower
MFU). MFU = FLOPs per step / median step time / peak. Peak defaults to the H100/H200 SXM datasheet's dense bf16
rate (989.4 TFLOP/s); the run also measures an 8192^3 bf16 matmul and reports MFU against that ceiling.

    python experiments/bench_mfu.py --model ViT-B-16 --batch 256 512 --variants eager compile --out mfu.json
    python experiments/bench_mfu.py --model tiny-vit --batch 32 --variants eager --device cpu --precision fp32  # smoke

Measured on one H200 (torch 2.11, open_clip 3.3.0, ViT-B-16, bf16 autocast; model step only; MFU against 989.4):

    batch  variant  open_clip samples/s   qclip samples/s   qclip TFLOP/s   qclip MFU   ratio
      256  eager          1850                1869              231          23.4%     1.01
      512  eager          1976                1987              246          24.9%     1.01
      512  compile        2769                2795              346          35.0%     1.01
     1024  compile           -                2858              354          35.8%       -

(123.8 GFLOPs per sample counted; the 8192^3 bf16 matmul ran at 776 TFLOP/s, so 35.8% of the datasheet peak is 46% of
what a plain matmul reaches on that chip.)
`compile-max` (inductor's max-autotune without CUDA graphs) was still autotuning after 8.5 minutes there: unmeasured.
"""
import argparse, json, os, statistics, sys, time
from pathlib import Path
import torch, open_clip
from torch.utils.flop_counter import FlopCounterMode
from open_clip.loss import ClipLoss as OpenClipLoss
from qclip.models import create_clip, get_tokenizer
from qclip.loss import ClipLoss
from qclip.train import clip_step, param_groups, autocast
sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import openclip_groups  # open_clip_train's weight-decay rule, shared with the CPU bench

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def make_step(impl, variant, args, dev):
    torch.manual_seed(0)
    model = create_clip(args.model).to(dev).train()
    net = (torch.compile(model) if variant == 'compile' else
           torch.compile(model, mode='max-autotune-no-cudagraphs') if variant == 'compile-max' else model)
    if impl == 'open_clip':
        opt = torch.optim.AdamW(openclip_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.95), eps=1e-6)
        loss_fn = OpenClipLoss()
        def step(x, t):
            with autocast(dev, args.precision):
                img, txt, scale = net(x, t[:, 0])[:3]
                loss = loss_fn(img, txt, scale)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            with torch.no_grad(): model.logit_scale.clamp_(0, 4.6052)
            return loss.detach()
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.95), eps=1e-6, fused=True)
        loss_fn = ClipLoss()
        step = lambda x, t: clip_step(net, x, t, loss_fn, opt, args.precision, grad_clip=1.0)
    return model, step

def batch(args, n, dev):
    g = torch.Generator().manual_seed(1)
    size = open_clip.get_model_config(args.model)['vision_cfg']['image_size']
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx = get_tokenizer(args.model).context_length
    return (torch.randn(n, 3, size, size, generator=g).to(dev), torch.randint(1, 49000, (n, 1, ctx), generator=g).to(dev))

def count_flops(model, x, t, args, dev)->int:
    "Model FLOPs of one training step: forward + backward of the CLIP loss, counted by torch's FlopCounterMode."
    with FlopCounterMode(display=False) as fc:
        with autocast(dev, args.precision):
            img, txt, scale = model(x, t[:, 0])[:3]
            loss = OpenClipLoss()(img.float(), txt.float(), scale)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()

def time_step(step, x, t, reps, dev)->list[float]:
    out = []
    for _ in range(reps):
        sync(dev); t0 = time.perf_counter(); step(x, t); sync(dev); out.append(time.perf_counter() - t0)
    return out

def matmul_tflops(dev)->float|None:
    if dev.type != 'cuda': return None
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3): a @ b
    sync(dev); t0 = time.perf_counter()
    for _ in range(10): a @ b
    sync(dev)
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='ViT-B-16'); ap.add_argument('--batch', type=int, nargs='+', default=[256])
    ap.add_argument('--variants', nargs='+', default=['eager', 'compile'], choices=['eager', 'compile', 'compile-max'])
    ap.add_argument('--precision', default='bf16'); ap.add_argument('--reps', type=int, default=20)
    ap.add_argument('--warmup', type=int, default=5); ap.add_argument('--device', default='cuda')
    ap.add_argument('--peak-tflops', type=float, default=989.4, help='dense bf16 peak of the GPU (H100/H200 SXM: 989.4)')
    ap.add_argument('--no-reference', action='store_true', help="skip open_clip's own step")
    ap.add_argument('--out', default=None, help='write the results as JSON here (rewritten after every row)')
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    env = dict(torch=torch.__version__, open_clip=open_clip.__version__, device=torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu',
               model=args.model, precision=args.precision, peak_tflops=args.peak_tflops, matmul_tflops=matmul_tflops(dev))
    print(json.dumps(env), flush=True)
    rows = []
    for B in args.batch:
        x, t = batch(args, B, dev)
        for variant in args.variants:
            impls = ['qclip'] if args.no_reference else ['open_clip', 'qclip']
            res = {}
            for impl in impls:
                try:
                    model, step = make_step(impl, variant, args, dev)
                    if impl == impls[0]: flops = count_flops(model, x, t, args, dev)
                    t0 = time.perf_counter()
                    for _ in range(args.warmup): step(x, t)
                    sync(dev); warm = time.perf_counter() - t0
                    times = time_step(step, x, t, args.reps, dev)
                    med = statistics.median(times)
                    res[impl] = dict(median_s=med, samples_per_s=B / med, warmup_s=warm,
                                     tflops=flops / med / 1e12, mfu=flops / med / 1e12 / args.peak_tflops,
                                     mfu_vs_matmul=(flops / med / 1e12 / env['matmul_tflops']) if env['matmul_tflops'] else None,
                                     peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None)
                except torch.OutOfMemoryError as e:
                    res[impl] = dict(error=f'OOM: {str(e)[:120]}')
                del model, step
                if dev.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            row = dict(batch=B, variant=variant, gflops_per_sample=flops / B / 1e9, **res)
            if 'qclip' in res and 'open_clip' in res and 'median_s' in res['qclip'] and 'median_s' in res['open_clip']:
                row['ratio_qclip_over_open_clip'] = res['qclip']['samples_per_s'] / res['open_clip']['samples_per_s']
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                tmp = Path(args.out).with_suffix('.tmp'); tmp.write_text(json.dumps(dict(env=env, rows=rows), indent=1)); os.replace(tmp, args.out)
    print(f"\n{args.model} {args.precision} on {env['device']}; peak {args.peak_tflops} TFLOP/s (measured matmul: {env['matmul_tflops'] and round(env['matmul_tflops'])})")
    print(f"{'batch':>6} {'variant':<8} {'impl':<10} {'median s':>9} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        for impl in ('open_clip', 'qclip'):
            if impl in r and 'median_s' in r[impl]:
                m = r[impl]
                print(f"{r['batch']:>6} {r['variant']:<8} {impl:<10} {m['median_s']:>9.4f} {m['samples_per_s']:>10.1f} {m['tflops']:>8.1f} {m['mfu']:>6.1%}")
        if 'ratio_qclip_over_open_clip' in r: print(f"{'':>6} {'':<8} ratio qclip/open_clip samples/s: {r['ratio_qclip_over_open_clip']:.3f}")

if __name__ == '__main__': main()
