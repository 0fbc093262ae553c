"""Throughput of CLIP pretraining at 1 and N processes (DDP, local_loss + gather_with_grad), and MFU on CUDA.

Two measurements, both through qclip's own launcher (`qclip.distributed.launch`, torch elastic):
  --mode step      the training step alone (`qclip.train.clip_step` under DDP) on random tensors: samples/s, and MFU from
                   the model's FLOPs per sample counted by torch's FlopCounterMode (forward + backward) and the device peak
  --mode pretrain  the whole loop (`qclip.train.pretrain`: data loading, augmentation, logging) on the built-in data:
                   samples/s from metrics.jsonl (median of the logged intervals, the first and the evaluating last dropped)
Scaling efficiency = samples/s at N processes / (samples/s at 1 process x hardware ratio), per-process batch fixed
(weak scaling). On CUDA the hardware ratio is N (a GPU per process). On a CPU it is the ratio of threads in use:
by default the cores are split between the processes (--threads default cores // N), so N processes use the same
hardware as 1 (ratio 1, efficiency = the cost of DDP + gathers); `--threads 1` gives 1 x 1 against N x 1 (ratio N).

    .venv/bin/python experiments/bench_scaling.py --quick                          # CPU: tiny-vit, 1 and 2 processes
    .venv/bin/python experiments/bench_scaling.py --mode both --nprocs 1 2 --steps 20
    python experiments/bench_scaling.py --model ViT-B-16 --precision bf16 --batch-size 256 --nprocs 1 8   # GPU node
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
import torch.distributed as dist

# dense bf16 peak per device, TFLOP/s (vendor datasheets); override with --peak-tflops
PEAK_BF16_TFLOPS = {'H200': 989., 'H100': 989., 'A100': 312., 'L40S': 362., 'A10G': 70., 'L4': 121., 'V100': 125.}

def device_peak_tflops(precision:str)->float|None:
    if not torch.cuda.is_available(): return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return peak if precision == 'bf16' or peak is None else peak / 2  # fp32 runs as tf32 at about half the bf16 rate

def _batch(model_name, batch, k, device):
    from qclip.models import create_clip
    m = create_clip(model_name)
    size = m.visual.image_size; size = size[0] if isinstance(size, (tuple, list)) else size
    ctx, vocab = m.context_length, m.vocab_size
    g = torch.Generator().manual_seed(0)
    return m, torch.randn(batch, 3, size, size, generator=g).to(device), torch.randint(1, vocab, (batch, k, ctx), generator=g).to(device)

def flops_per_sample(model_name:str, k:int=2)->float:
    "Forward + backward FLOPs of one training sample (image + k captions), counted by torch's FlopCounterMode."
    from torch.utils.flop_counter import FlopCounterMode
    from qclip.loss import ClipLoss
    m, x, t = _batch(model_name, 2, k, 'cpu')
    with FlopCounterMode(display=False) as fc:
        img, txt, scale = m(x, t.transpose(0, 1).reshape(-1, t.shape[-1]))[:3]
        ClipLoss()(img, txt.view(k, 2, -1), scale).backward()
    return fc.get_total_flops() / 2

def step_bench(model:str, batch_size:int, steps:int, warmup:int, precision:str, k:int=2)->dict:
    "Per rank: DDP training steps on random tensors; samples/s over all ranks."
    from torch.nn.parallel import DistributedDataParallel as DDP
    from qclip.distributed import rank_world
    from qclip.loss import ClipLoss
    from qclip.train import clip_step, param_groups
    rank, world = rank_world()
    dev = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')
    torch.manual_seed(0)
    m, x, t = _batch(model, batch_size, k, dev)
    m = m.to(dev)
    net = DDP(m, device_ids=[dev.index] if dev.type == 'cuda' else None) if world > 1 else m
    opt = torch.optim.AdamW(param_groups(m, 0.2), lr=1e-4, fused=True)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    for _ in range(warmup): clip_step(net, x, t, loss_fn, opt, precision, 1.)
    sync(); world > 1 and dist.barrier(); t0 = time.perf_counter()
    for _ in range(steps): clip_step(net, x, t, loss_fn, opt, precision, 1.)
    sync(); world > 1 and dist.barrier(); dt = time.perf_counter() - t0
    return dict(samples_per_s=batch_size * world * steps / dt, step_s=dt / steps, world_size=world,
                max_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None)

def run_step(args, n):
    from qclip.distributed import launch
    kw = dict(model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, precision=args.precision)
    return step_bench(**kw) if n == 1 else launch(step_bench, kw, nproc_per_node=n)

def run_pretrain(args, n):
    "The whole loop, via `qclip_pretrain` with the launch request `qclip launch` would set."
    out = Path(tempfile.mkdtemp(prefix='bench_scaling_'))/f'n{n}'
    params = dict(model=args.model, steps=args.steps + 2 * args.log_every, batch_size=args.batch_size, log_every=args.log_every,
                  eval_every=10**6, ckpt_every=10**6, warmup=1, synth_n=args.synth_n, synth_val=64, workers=args.workers,
                  precision=args.precision, out_dir=str(out))
    env = {**os.environ, 'QCLIP_NPROC_PER_NODE': str(n), 'OMP_NUM_THREADS': os.environ['OMP_NUM_THREADS']}
    subprocess.run([str(Path(sys.executable).with_name('qclip_pretrain')), *[f'{k}={v}' for k, v in params.items()]],
                   check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()][1:-1]
    return dict(samples_per_s=statistics.median(r['samples_per_s'] for r in rows), world_size=n, intervals=len(rows))

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--mode', choices=['step', 'pretrain', 'both'], default='both')
    ap.add_argument('--model', default='tiny-vit'); ap.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    ap.add_argument('--batch-size', type=int, default=32, help='per process (weak scaling)')
    ap.add_argument('--nprocs', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--steps', type=int, default=20); ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--log-every', type=int, default=5, help='pretrain mode: samples/s is measured per logged interval')
    ap.add_argument('--synth-n', type=int, default=1024); ap.add_argument('--workers', type=int, default=0)
    ap.add_argument('--threads', type=int, default=0, help='CPU threads per process (default: cores // processes)')
    ap.add_argument('--peak-tflops', type=float, default=0, help='device peak for MFU (default: from the GPU name)')
    ap.add_argument('--repeats', type=int, default=3, help='measurements per process count (median reported)')
    ap.add_argument('--json', default='', help='also write the results here')
    ap.add_argument('--quick', action='store_true', help='small CPU run: --steps 10 --batch-size 16')
    a = ap.parse_args()
    if a.quick: a.steps, a.batch_size, a.log_every, a.repeats = 10, 16, 3, 1
    cores = len(os.sched_getaffinity(0))
    fps = flops_per_sample(a.model) if a.mode != 'pretrain' else None
    peak = a.peak_tflops or device_peak_tflops(a.precision)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({cores} cores)'
    print(f'{a.model} {a.precision}, batch {a.batch_size} per process, {dev}' + (f', {fps / 1e9:.2f} GFLOP per training sample (fwd+bwd, image + 2 captions)' if fps else ''))
    results = []
    threads = lambda n: a.threads or max(1, cores // n)
    for mode in (['step', 'pretrain'] if a.mode == 'both' else [a.mode]):
        runs = {n: [] for n in a.nprocs}
        for rep in range(a.repeats):  # alternate the order: a shared machine's load drifts
            for n in (a.nprocs if rep % 2 == 0 else a.nprocs[::-1]):
                os.environ['OMP_NUM_THREADS'] = str(threads(n)); torch.set_num_threads(threads(n))
                runs[n].append((run_step if mode == 'step' else run_pretrain)(a, n)['samples_per_s'])
                print(f"  {mode} {n} proc x {threads(n)} threads, repeat {rep}: {runs[n][-1]:.1f} samples/s", flush=True)
        base = statistics.median(runs[1]) if 1 in runs else None
        for n in a.nprocs:
            sps = statistics.median(runs[n])
            hw = n if torch.cuda.is_available() else n * threads(n) / threads(1)
            eff = sps / (hw * base) if base else None
            mfu = sps * fps / (n * peak * 1e12) if (fps and peak and mode == 'step') else None
            results.append(dict(mode=mode, model=a.model, precision=a.precision, nproc=n, threads_per_proc=threads(n),
                                batch_per_proc=a.batch_size, samples_per_s=sps, all_samples_per_s=runs[n], hardware_ratio=hw, scaling_efficiency=eff,
                                mfu=mfu, flops_per_sample=fps, device=dev))
            print(f"{mode:8s} {n} proc x {threads(n)} threads: {sps:8.1f} samples/s (median of {a.repeats})"
                  + (f'  scaling efficiency {eff:.2f}' if eff is not None else '') + (f'  MFU {100 * mfu:.1f}%' if mfu is not None else ''), flush=True)
    if a.json: Path(a.json).write_text(json.dumps(results, indent=1))
