"""The `gpu` profiles of Table 1, Fig. 2 and Fig. 3, without a GPU: each dry-runs with the runs it promises, and the
whole Table 1 chain runs end to end with the gpu profile's own parameters (bf16, loader workers, its recipes) on the
CPU at tiny sizes, so that the one GPU run has no parameter or code path that was never exercised."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, yaml
from qclip.jobs import load_experiment, check_run_params

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent

@pytest.mark.parametrize('spec, n', [('table1', 72), ('fig2', 12), ('fig3', 13)])
def test_gpu_profile_dry_runs(spec, n):
    e = load_experiment(ROOT/'experiments'/f'{spec}.yaml', 'gpu')
    assert len(e['runs']) == n
    assert all(r['params'].get('device', 'cuda') == 'cuda' for r in e['runs'] if 'device' in r['params'])
    r = subprocess.run([str(BIN/'qclip'), 'run', f'experiments/{spec}.yaml', '--profile', 'gpu', '--dry-run'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count('would run') == n, r.stdout[-2000:] + r.stderr[-2000:]

# the gpu profile's parameters, shrunk: everything that sets a size or a length, and the device
TINY = dict(pretrain=dict(steps=2, batch_size=8, warmup=1, synth_n=64, synth_val=32, eval_every=2, ckpt_every=2, log_every=1,
                          workers=1, device='cpu'),
            probes=dict(synth_n=64, synth_val=32, dense_n=32, batch_size=32, device='cpu'),
            finetune=dict(steps=2, batch_size=8, warmup=1, synth_n=32, synth_val=16, workers=1, device='cpu'),
            detection=dict(iters=2, batch_size=2, synth_n=[16, 8], workers=1, device='cpu'),
            segmentation=dict(iters=2, batch_size=2, synth_n=[16, 8], workers=1, device='cpu'),
            depth=dict(steps=2, batch_size=4, warmup=1, synth_n=16, synth_val=8, workers=1, device='cpu'))

def test_gpu_profile_runs_on_cpu_at_tiny_sizes(tmp_path):
    pytest.importorskip('mmcv.ops', reason='the detection and segmentation stages need the OpenMMLab stack')
    gpu = load_experiment(ROOT/'experiments'/'table1.yaml', 'gpu')
    stages = {r['stage'] for r in gpu['runs']}
    assert set(TINY) == stages
    spec = dict(extends=str(ROOT/'experiments'/'table1.yaml'), profiles=dict(gpu=dict(out_root=str(tmp_path/'runs'), stages={
        s: dict(params=p, **({'grid': [dict(dataset=['synth-datacompdr'], caption_source=['gt+syn'], seed=[0])]} if s == 'pretrain' else {}))
        for s, p in TINY.items()})))
    (tmp_path/'tiny.yaml').write_text(yaml.safe_dump(spec, sort_keys=False))
    e = load_experiment(tmp_path/'tiny.yaml', 'gpu')
    check_run_params(e)
    for r in e['runs']:  # every parameter the gpu profile sets is still there, only sizes and the device changed
        ref = next(g for g in gpu['runs'] if g['stage'] == r['stage'])
        assert set(ref['params']) <= set(r['params']) | {'encoder'}, (r['stage'], set(ref['params']) - set(r['params']))
        assert all(r['params'][k] == v for k, v in ref['params'].items() if k not in TINY[r['stage']] and k != 'encoder' and k not in ref['values'])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([str(BIN/'qclip'), 'run', str(tmp_path/'tiny.yaml'), '--profile', 'gpu'], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    status = json.loads(p.stdout[p.stdout.index('{'):])
    assert set(status.values()) == {'ran'} and len(status) == 6, status
    pre = json.loads((tmp_path/'runs'/'pretrain'/'dataset=synth-datacompdr,caption_source=gt+syn,seed=0'/'results.json').read_text())
    assert pre['steps'] == 2
    assert yaml.safe_load((tmp_path/'runs'/'pretrain'/'dataset=synth-datacompdr,caption_source=gt+syn,seed=0'/'params.yaml').read_text())['precision'] == 'bf16'
