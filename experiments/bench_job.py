"""The pretraining *job* against its own bare step and against open_clip's trainer, on the same data.

One invocation generates DataCompDR-layout JPEG shards (`jpg`, `txt`, `json`, `syn.json` with 5 synthetic captions)
and, for each setup (eager / torch.compile at a batch size) and caption source, runs in fresh subprocesses:

- `step`: qclip's bare training step (`qclip.train.clip_step`: model, loss, backward, clipping, fused AdamW) on random
  images and captions of the shards' lengths already on the device (their padding skipped as the trainer does),
  `--reps` steps back to back between two synchronisations: the ceiling of the job.
- `job`: the real job, `qclip.train.pretrain(dataset='datacompdr', data_root=<the shards>, ...)`: loader workers,
  decode + crop, tokenisation, the copy to the device, the step, logging. samples/s is the median over its logged
  intervals (`metrics.jsonl`, wall-clock between log steps, the first `--skip` intervals dropped: start-up, compile).
- `open_clip`: `open_clip_train.main` on the same shards, model, batch, workers, precision, AdamW settings, gradient
  clipping and `--torchcompile` (gt captions only: it has no second caption), median of its logged `Batch (t)`
  interval means, the first `--skip` dropped. open_clip_train 3.3.0 fails with webdataset 1.0.2 (KeyError 'fname' at
  the end of a shard), so its subprocess gets webdataset 0.2.86 first on PYTHONPATH, from `--open-clip-site`
  (installed there with pip --target on first use; qclip's own pins are untouched).

Printed per row: samples/s of each, job/step, job/open_clip, and model-FLOPs utilisation (FLOPs of one training
sample, forward + backward of image + K captions over their own tokens, counted with torch's FlopCounterMode, x
samples/s / peak; open_clip_train also computes the padding, which is not counted as useful work).

    .venv/bin/python experiments/bench_job.py --device cpu           # tiny-vit, 1 thread + 1 loader worker: minutes
    python experiments/bench_job.py --device cuda --model ViT-B-16 --precision bf16 --setups eager:256 compile:512 \\
        --workers 15 --side 320 --out job.json                         # the GPU figures (experiments/bench_job_h200.sh)

On a CPU the step runs on `--threads` cores and the loader on `--workers` others (default 1 + 1 on a 2-core
machine), so job/step measures what the pipeline between the loader and the step costs, as on a GPU. On a shared
machine the separate-process ratio drifts with the load (the loader worker competes with other jobs for the cores
the step had to itself); the CPU mode therefore also reports `job_over_own_steps`: the job's samples/s over those of
its own steps timed inside it, over the same intervals, which no outside load moves.

Measured on the 2-core CPU machine, idle (load average 0.9), batch 64 fp32, 1 thread + 1 loader worker, 80-px JPEGs;
qclip runs the captions without their padding (`qclip.models.unpad_text`), open_clip_train pads them to the context:

    python experiments/bench_job.py --device cpu                                   # tiny-vit (65 image tokens)
    python experiments/bench_job.py --device cpu --model tiny-vit-p16 --steps 60   # 17 image tokens: text weighs more

    model         captions  open_clip_train  qclip job  bare step  job/step  job/own steps  job/open_clip
    tiny-vit      gt              141.9         177.8      186.0     0.956       0.993          1.253
    tiny-vit      gt+syn            -           151.3      152.6     0.992       0.994            -
    tiny-vit-p16  gt              316.8         547.4      562.2     0.974       0.981          1.728
    tiny-vit-p16  gt+syn            -           344.5      353.0     0.976       0.983            -

The GPU figures (job/step, job/open_clip_train, MFU; ViT-B/16 bf16) come from `experiments/bench_job_h200.sh`: one GPU,
about 7 minutes.
"""
import argparse, io, json, os, re, shutil, statistics, subprocess, sys, tempfile, time
from multiprocessing import Pool
from pathlib import Path
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = 'a photo of the small large red blue green dog cat car tree house on in with near beside street park'.split()

# ------------------------------------------------------------------------------------------------ data
def _shard(job):
    "One DataCompDR-layout shard of `per` JPEGs of `side` px with natural-image-like statistics."
    path, k, per, side = job
    import webdataset as wds
    from PIL import Image
    rng = np.random.default_rng(k)
    with wds.TarWriter(str(path)) as w:
        for i in range(per):
            low = rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)
            a = np.asarray(Image.fromarray(low).resize((side, side), Image.BICUBIC)).astype(np.int16)
            a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
            b = io.BytesIO(); Image.fromarray(a).save(b, format='JPEG', quality=90)
            cap = lambda n: ' '.join(rng.choice(WORDS, n))
            uid = f'{k:05d}{i:05d}'
            w.write({'__key__': uid, 'jpg': b.getvalue(), 'txt': cap(12), 'json': {'uid': uid},
                     'syn.json': {'syn_text': [cap(15) for _ in range(5)]}})
    return str(path)

def make_shards(root:Path, shards:int, per:int, side:int, procs:int)->list[str]:
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root/f'{k:05d}.tar', k, per, side) for k in range(shards)]
    with Pool(max(1, procs)) as pool: return pool.map(_shard, jobs)

# ------------------------------------------------------------------------------------------------ subprocess work
def work_step(a:dict)->dict:
    "qclip's bare step on random device tensors: seconds per step, `reps` steps between two synchronisations (x3)."
    import torch
    from qclip.models import create_clip, unpad_text
    from qclip.loss import ClipLoss
    from qclip.train import clip_step, param_groups
    dev = torch.device(a['device'])
    if dev.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = create_clip(a['model']).to(dev).train()
    net = torch.compile(model) if a['variant'] == 'compile' else model
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.95), eps=1e-6, fused=True)
    size = model.visual.image_size; size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a['batch'], 3, size, size, generator=g).to(dev)
    t = captions(a['model'], a['batch'], a['K']).to(dev)
    if a['variant'] != 'compile': unpad_text(model)  # as the job's trainer runs them
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(a['warmup']): clip_step(net, x, t, loss_fn, opt, a['precision'], 1.0)
    sync(); warm = time.perf_counter() - t0
    groups = []
    for _ in range(3):
        sync(); t0 = time.perf_counter()
        for _ in range(a['reps']): clip_step(net, x, t, loss_fn, opt, a['precision'], 1.0)
        sync(); groups.append((time.perf_counter() - t0) / a['reps'])
    return dict(step_s=statistics.median(groups), step_s_groups=groups, warmup_s=warm)

def work_job(a:dict)->dict:
    "The real job, `qclip.train.pretrain`, on the shards: samples/s and the share of time in its steps, per interval."
    import qclip.train as qt
    out, marks, in_step, append, step_fn = Path(a['out_dir']), [], [0.], qt.MetricsLog.append, qt.clip_step
    def timed_step(*args, **kw):  # wall time in the job's steps (on a CPU the step's own time; on CUDA only its launch)
        t = time.perf_counter(); r = step_fn(*args, **kw); in_step[0] += time.perf_counter() - t; return r
    def timed_append(self, **row):  # at each log step: wall clock and time spent in steps so far
        marks.append((time.perf_counter(), in_step[0])); return append(self, **row)
    qt.clip_step, qt.MetricsLog.append = timed_step, timed_append
    pretrain = qt.pretrain
    res = pretrain(dataset='datacompdr', data_root=a['data_root'], caption_source=a['captions'], model=a['model'],
                   batch_size=a['batch'], steps=a['steps'], warmup=max(1, a['steps'] // 4), log_every=a['log_every'],
                   eval_every=10**9, ckpt_every=a['steps'], workers=a['workers'], precision=a['precision'],
                   torch_compile=a['variant'] == 'compile', device=a['device'], out_dir=str(out), resume=False, seed=0)
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    share = [(s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in zip(marks, marks[1:])]
    return dict(interval_sps=[r['samples_per_s'] for r in rows], interval_step_share=share, steps=res['steps'])

# ------------------------------------------------------------------------------------------------ runners
def _sub(kind:str, params:dict, env:dict, timeout:float)->dict:
    "Run `work_<kind>(params)` in a fresh interpreter; its JSON result."
    r = subprocess.run([sys.executable, __file__, '--work', kind, json.dumps(params)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if r.returncode != 0: raise RuntimeError(f'{kind} failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])

def open_clip_site(path:Path)->Path:
    "webdataset 0.2.86 (what open_clip_train 3.3.0 works with) in its own folder, for its subprocess only."
    if not (path/'webdataset').is_dir():
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(path),
                        'webdataset==0.2.86'], check=True)
    return path

BATCH_T = re.compile(r'Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)')

def run_open_clip(a, setup, batch, shard_glob, n_shards, env, site:Path)->dict:
    "open_clip_train.main on the shards: samples/s per logged interval (its `Batch (t)`: mean wall time of a step)."
    prec = {'bf16': 'amp_bf16', 'fp32': 'fp32'}[a.precision]
    steps = a.steps
    args = ['--train-data', shard_glob, '--dataset-type', 'webdataset', '--dataset-resampled',
            '--train-num-samples', str(steps * batch), '--batch-size', str(batch), '--workers', str(a.workers),
            '--epochs', '1', '--model', a.model, '--precision', prec, '--lr', '1e-3', '--wd', '0.2', '--beta1', '0.9',
            '--beta2', '0.95', '--eps', '1e-6', '--warmup', str(max(1, steps // 4)), '--grad-clip-norm', '1.0',
            '--log-every-n-steps', str(a.log_every), '--logs', 'none', '--local-loss', '--gather-with-grad',
            '--seed', '0',
            '--device', a.device] + (['--torchcompile'] if setup == 'compile' else [])
    # qclip.models registers qclip's model configs with open_clip (tiny-vit)
    code = 'import sys, qclip.models; from open_clip_train.main import main; main(sys.argv[1:])'
    oc_env = {**env, 'PYTHONPATH': os.pathsep.join([str(site), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)}
    r = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, env=oc_env,
                       timeout=a.timeout, cwd=tempfile.mkdtemp(prefix='bench_job_oc_'))
    log = r.stdout + r.stderr
    if r.returncode != 0: raise RuntimeError(f'open_clip_train failed:\n{log[-3000:]}')
    m = BATCH_T.findall(log)
    return dict(interval_sps=[batch / float(b) for _, b in m], data_wait_s=[float(d) for d, _ in m])

def captions(model:str, batch:int, K:int):
    "Tokens [batch, K, context] of captions as long as the shards' (12 and 15 words)."
    import torch
    from qclip.models import get_tokenizer
    tok, rng = get_tokenizer(model), np.random.default_rng(1)
    return torch.stack([tok([' '.join(rng.choice(WORDS, n)) for n in (12, 15)[:K]]) for _ in range(batch)])

def flops_per_sample(model:str, K:int)->float:
    """Forward + backward FLOPs of one training sample (image + K captions of the shards' lengths, over their own
    tokens: the model's useful work), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from qclip.models import create_clip, unpad_text
    from qclip.loss import ClipLoss
    m = create_clip(model); unpad_text(m)
    size = m.visual.image_size; size = size[0] if isinstance(size, (tuple, list)) else size
    x, t = torch.randn(2, 3, size, size), captions(model, 2, K)
    with FlopCounterMode(display=False) as fc:
        img, txt, scale = m(x, t.transpose(0, 1).reshape(-1, t.shape[-1]))[:3]
        ClipLoss()(img, txt.view(K, 2, -1), scale).backward()
    return fc.get_total_flops() / 2

def _median(xs, skip): xs = xs[skip:]; return statistics.median(xs) if xs else float('nan')

# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    ap.add_argument('--model', default=None, help='default: ViT-B-16 on cuda, tiny-vit on cpu')
    ap.add_argument('--precision', default=None, choices=['bf16', 'fp32'], help='default: bf16 on cuda, fp32 on cpu')
    ap.add_argument('--setups', nargs='+', default=None,
                    help="variant:batch, variant in eager|compile (default: cuda eager:256 compile:512, cpu eager:64)")
    ap.add_argument('--captions', nargs='+', default=['gt', 'gt+syn'], choices=['gt', 'gt+syn'])
    ap.add_argument('--workers', type=int, default=None, help='loader processes (default: cores - 1 on cuda, 1 on cpu)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads of the training process (cpu default 1)')
    ap.add_argument('--steps', type=int, default=None, help='job steps (default: cuda 40, cpu 30)')
    ap.add_argument('--log-every', type=int, default=5); ap.add_argument('--skip', type=int, default=2)
    ap.add_argument('--reps', type=int, default=None, help='bare steps per timed group (default: cuda 15, cpu 5)')
    ap.add_argument('--side', type=int, default=None, help='stored JPEG side in px (default: cuda 320, cpu 80)')
    ap.add_argument('--shards', type=int, default=None); ap.add_argument('--per-shard', type=int, default=256)
    ap.add_argument('--no-open-clip', action='store_true', help="skip open_clip_train")
    ap.add_argument('--open-clip-site', default='', help='folder with webdataset 0.2.86 for open_clip_train')
    ap.add_argument('--peak-tflops', type=float, default=0, help='device peak for MFU (default: from the GPU name)')
    ap.add_argument('--timeout', type=float, default=900, help='seconds for each subprocess')
    ap.add_argument('--data', default='', help='shards folder to reuse (default: generated in a temporary folder)')
    ap.add_argument('--out', default='', help='write the results here as JSON (rewritten after every row)')
    ap.add_argument('--work', nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.work:
        print(json.dumps({'step': work_step, 'job': work_job}[a.work[0]](json.loads(a.work[1])))); return
    cuda = a.device == 'cuda'
    cores = len(os.sched_getaffinity(0))
    a.model = a.model or ('ViT-B-16' if cuda else 'tiny-vit')
    a.precision = a.precision or ('bf16' if cuda else 'fp32')
    a.setups = [(s.split(':')[0], int(s.split(':')[1]))
                for s in (a.setups or (['eager:256', 'compile:512'] if cuda else ['eager:64']))]
    a.workers = a.workers if a.workers is not None else (max(1, cores - 1) if cuda else 1)
    a.threads = a.threads or (0 if cuda else 1)
    a.steps, a.reps = a.steps or (40 if cuda else 30), a.reps or (15 if cuda else 5)
    a.side = a.side or (320 if cuda else 80)
    big = max(b for _, b in a.setups)
    a.shards = a.shards or max(a.workers * 2, -(-big * 4 // a.per_shard))
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if a.threads: env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env['PYTHONPATH'] = os.pathsep.join([p for p in [env.get('PYTHONPATH', ''), str(ROOT)] if p])

    import torch
    dev_name = (torch.cuda.get_device_name() if cuda else
                f'CPU ({cores} cores; step on {a.threads} thread(s), {a.workers} loader worker(s))')
    peak = a.peak_tflops or None
    if cuda and not peak:
        sys.path.insert(0, str(HERE)); from bench_scaling import device_peak_tflops
        peak = device_peak_tflops(a.precision)
    t0 = time.perf_counter()
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix='bench_job_'))/'shards'
    if not (data.is_dir() and len(list(data.glob('*.tar'))) >= a.shards):
        make_shards(data, a.shards, a.per_shard, a.side, cores)
    n_shards = len(list(data.glob('*.tar')))
    shard_glob = f'{data}/{{00000..{n_shards - 1:05d}}}.tar'
    print(f"{a.model} {a.precision} on {dev_name}; {n_shards} shards x {a.per_shard} JPEGs of {a.side} px "
          f"({sum(p.stat().st_size for p in data.glob('*.tar')) / 2**20:.0f} MiB, made in "
          f"{time.perf_counter() - t0:.0f} s); {a.workers} loader workers; job: {a.steps} steps, logged every "
          f"{a.log_every}, first {a.skip} intervals dropped",
          flush=True)
    site = None if a.no_open_clip else open_clip_site(Path(a.open_clip_site) if a.open_clip_site else
                                                        Path.home()/'.cache'/'qclip'/'bench'/'open_clip_site')
    fps = {K: flops_per_sample(a.model, K) for K in sorted({1 if c == 'gt' else 2 for c in a.captions})}
    rows, tmp = [], Path(tempfile.mkdtemp(prefix='bench_job_runs_'))
    for variant, batch in a.setups:
        for cap in a.captions:
            K = 1 if cap == 'gt' else 2
            base = dict(device=a.device, model=a.model, precision=a.precision, variant=variant, batch=batch, K=K)
            step = _sub('step', {**base, 'warmup': 3 if variant == 'eager' else 5, 'reps': a.reps}, env, a.timeout)
            job = _sub('job', {**base, 'captions': cap, 'steps': a.steps, 'log_every': a.log_every,
                               'workers': a.workers, 'data_root': str(data),
                               'out_dir': str(tmp/f'{variant}{batch}-{cap}')}, env, a.timeout)
            oc = (run_open_clip(a, variant, batch, shard_glob, n_shards, env, site)
                  if (site is not None and cap == 'gt') else None)
            r = dict(variant=variant, batch=batch, captions=cap, step_sps=batch / step['step_s'],
                     job_sps=_median(job['interval_sps'], a.skip), job_intervals=job['interval_sps'], step=step,
                     open_clip_sps=_median(oc['interval_sps'], a.skip) if oc else None,
                     open_clip_intervals=oc['interval_sps'] if oc else None,
                     open_clip_data_wait_s=_median(oc['data_wait_s'], a.skip) if oc else None,
                     gflops_per_sample=fps[K] / 1e9)
            r['job_over_step'] = r['job_sps'] / r['step_sps']
            # CPU only: the job's samples/s over that of its own steps, timed inside the job over the same intervals
            # (skip - 1: these intervals start one log later); immune to what else loads a shared machine
            r['job_over_own_steps'] = _median(job['interval_step_share'], max(0, a.skip - 1)) if not cuda else None
            r['job_over_open_clip'] = r['job_sps'] / r['open_clip_sps'] if oc else None
            r['job_mfu'] = r['job_sps'] * fps[K] / (peak * 1e12) if peak else None
            r['step_mfu'] = r['step_sps'] * fps[K] / (peak * 1e12) if peak else None
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.endswith('intervals') and k != 'step'}), flush=True)
            r['job_interval_step_share'] = job['interval_step_share']
            if a.out:
                tmp_out = Path(a.out).with_suffix('.tmp')
                tmp_out.write_text(json.dumps(dict(device=dev_name, model=a.model, precision=a.precision, rows=rows,
                                                   workers=a.workers, side=a.side, peak_tflops=peak), indent=1))
                os.replace(tmp_out, a.out)
    shutil.rmtree(tmp, ignore_errors=True)
    if not a.data: shutil.rmtree(data.parent, ignore_errors=True)
    f = lambda v, w, spec='.1f', scale=1, unit='': (format(v * scale, spec) + unit if v is not None else '-').rjust(w)
    print(f"\n{a.model} {a.precision} on {dev_name} (median samples/s; total {time.perf_counter() - t0:.0f} s)")
    print(f"{'setup':<12}{'captions':<9}{'open_clip':>10}{'qclip job':>10}{'bare step':>10}{'job/step':>9}"
          f"{'(own)':>7}{'job/oc':>8}{'job MFU':>8}{'step MFU':>9}")
    for r in rows:
        print(f"{r['variant'] + ':' + str(r['batch']):<12}{r['captions']:<9}{f(r['open_clip_sps'], 10)}"
              f"{f(r['job_sps'], 10)}{f(r['step_sps'], 10)}{f(r['job_over_step'], 9, '.3f')}"
              f"{f(r['job_over_own_steps'], 7, '.3f')}{f(r['job_over_open_clip'], 8, '.3f')}"
              f"{f(r['job_mfu'], 8, '.1f', 100, '%')}{f(r['step_mfu'], 9, '.1f', 100, '%')}")
    print("job/step: samples/s of the job over the bare step's (separate processes, one after the other); (own), CPU "
          "only: over its own steps timed inside the job, the share of the job's time spent in steps (load on a shared "
          f"machine cancels out). Load average at the end: {os.getloadavg()[0]:.1f} on {cores} cores")

if __name__ == '__main__': main()
