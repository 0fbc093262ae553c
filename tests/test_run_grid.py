"""`qclip run` of a small experiments yaml: every grid cell runs once into its own folder; a second invocation skips
them all; a run that stopped (checkpoint, no results) is resumed."""
import json, os, subprocess, sys, time
from pathlib import Path
import nbformat, yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent

def _qclip(*args, cwd):
    return subprocess.run([str(BIN/'qclip'), *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '2'})

def test_grid_runs_each_cell_once_then_skips(tmp_path):
    spec = dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), out_root='runs/grid',
                params=dict(steps=2, batch_size=8, warmup=1, log_every=1, eval_every=2, ckpt_every=2, synth_n=256, synth_val=64, workers=0),
                grid=dict(caption_source=['gt', 'syn']))
    (tmp_path/'grid.yaml').write_text(yaml.safe_dump(spec))
    r = _qclip('run', 'grid.yaml', '--local', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = tmp_path/'runs'/'grid'
    assert sorted(p.name for p in runs.iterdir()) == ['caption_source=gt', 'caption_source=syn']
    for cs in ['gt', 'syn']:
        d = runs/f'caption_source={cs}'
        assert {'notebook.ipynb', 'run.yaml', 'params.yaml', 'metrics.jsonl', 'results.json', 'checkpoint.pt'} <= {p.name for p in d.iterdir()}
        assert yaml.safe_load((d/'params.yaml').read_text())['caption_source'] == cs
        assert json.loads((d/'results.json').read_text())['steps'] == 2
        assert nbformat.read(str(d/'notebook.ipynb'), as_version=4).metadata['papermill']['parameters']['out_dir'] == str(d)
    stamp = {p: p.stat().st_mtime for p in runs.glob('*/notebook.ipynb')}
    t0 = time.perf_counter()
    r = _qclip('run', 'grid.yaml', cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count(': done') == 2, r.stdout
    assert time.perf_counter() - t0 < 30 and stamp == {p: p.stat().st_mtime for p in runs.glob('*/notebook.ipynb')}
    # a run that stopped after its checkpoint resumes; the finished one is still skipped
    d = runs/'caption_source=syn'
    (d/'results.json').unlink(); (d/'model.safetensors').unlink()
    r = _qclip('run', 'grid.yaml', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'caption_source=gt: done' in r.stdout and 'caption_source=syn: stopped -> resume' in r.stdout
    assert (d/'results.json').exists() and (d/'attempts'/'notebook.0.ipynb').exists()
    assert 'resuming from' in (d/'notebook.ipynb').read_text()
    # a finished run asked for another lr starts over (resuming its last checkpoint would return the old lr's run);
    # the old run is kept whole under attempts/
    spec['grid'] = dict(caption_source=['syn']); spec['params']['lr'] = 5e-4
    (tmp_path/'grid.yaml').write_text(yaml.safe_dump(spec))
    old = (d/'metrics.jsonl').read_text()
    r = _qclip('run', 'grid.yaml', cwd=tmp_path)
    assert r.returncode == 0 and 'caption_source=syn: changed -> run again from scratch' in r.stdout, r.stdout[-3000:]
    assert 'resuming from' not in (d/'notebook.ipynb').read_text()
    assert (d/'attempts'/'run0'/'metrics.jsonl').read_text() == old and (d/'attempts'/'run0'/'results.json').exists()
    lrs = [json.loads(l)['lr'] for l in (d/'metrics.jsonl').read_text().splitlines()]
    assert max(lrs) <= 5e-4 + 1e-12 and yaml.safe_load((d/'params.yaml').read_text())['lr'] == 5e-4

def test_staged_runs_side_by_side(tmp_path):
    "`--jobs 2`: the pretraining runs overlap in time, each linear probe starts once its own encoder is done, a failed "
    "run blocks only what follows it, and a second invocation skips every finished run."
    from datetime import datetime
    pre = dict(steps=2, batch_size=8, warmup=1, log_every=1, eval_every=2, ckpt_every=2, synth_n=256, synth_val=64, workers=0)
    spec = dict(out_root='runs/staged', stages=dict(
        pretrain=dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), params=pre, grid=[dict(seed=[0, 1]), dict(seed=[2], lr=[-1.0])]),
        linear=dict(notebook=str(ROOT/'nbs'/'20_classification.ipynb'), after='pretrain',
                    params=dict(mode='linear', steps=2, batch_size=8, warmup=1, synth_n=64, synth_val=32, log_every=1, eval_every=2, ckpt_every=2))))
    (tmp_path/'staged.yaml').write_text(yaml.safe_dump(spec, sort_keys=False))
    r = _qclip('run', 'staged.yaml', '--jobs', '2', cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # seed 2 fails (lr=-1)
    st = json.loads(r.stdout[r.stdout.rindex('{\n'):])
    assert st == {'pretrain/seed=0': 'ran', 'pretrain/seed=1': 'ran', 'pretrain/seed=2,lr=-1.0': 'failed',
                  'linear/seed=0': 'ran', 'linear/seed=1': 'ran', 'linear/seed=2,lr=-1.0': 'blocked'}, r.stdout
    assert 'lr=-1.0 is not valid' in r.stdout
    runs = tmp_path/'runs'/'staged'
    def span(d):
        m = nbformat.read(str(d/'notebook.ipynb'), as_version=4).metadata['papermill']
        return datetime.fromisoformat(m['start_time']), datetime.fromisoformat(m['end_time'])
    (a0, a1), (b0, b1) = span(runs/'pretrain'/'seed=0'), span(runs/'pretrain'/'seed=1')
    assert a0 < b1 and b0 < a1, 'the two pretraining runs did not overlap'
    for s in (0, 1):
        lin = runs/'linear'/f'seed={s}'
        assert yaml.safe_load((lin/'run.yaml').read_text())['params']['encoder'] == str((runs/'pretrain'/f'seed={s}').absolute())
        assert span(lin)[0] >= span(runs/'pretrain'/f'seed={s}')[1], 'a linear probe started before its encoder was done'
        assert 0 <= json.loads((lin/'results.json').read_text())['top1'] <= 100  # per cent
    assert not (runs/'linear'/'seed=2,lr=-1.0').exists()
    r = _qclip('run', 'staged.yaml', '--jobs', '2', '--only', 'linear', cwd=tmp_path)
    assert r.stdout.count(': done') == 2 and "linear/seed=2,lr=-1.0: waiting for pretrain/seed=2,lr=-1.0" in r.stdout, r.stdout

def test_stopping_qclip_run_stops_its_runs_and_they_resume(tmp_path):
    "SIGTERM to `qclip run --jobs 2` (a scheduler, a closed terminal) stops the runs in progress with their kernels, "
    "leaving no orphan processes; the same command then resumes both from their checkpoints."
    import signal, psutil
    spec = dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), out_root='runs/stop',
                params=dict(steps=150, batch_size=8, warmup=1, log_every=5, eval_every=1000, ckpt_every=5, synth_n=256, synth_val=64, workers=0),
                grid=dict(seed=[0, 1]))
    (tmp_path/'stop.yaml').write_text(yaml.safe_dump(spec))
    p = subprocess.Popen([str(BIN/'qclip'), 'run', 'stop.yaml', '--jobs', '2'], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '2'})
    runs, deadline = tmp_path/'runs'/'stop', time.time() + 300
    while time.time() < deadline and not all((runs/f'seed={s}'/'checkpoint.pt').exists() for s in (0, 1)): time.sleep(0.2)
    kids = psutil.Process(p.pid).children(recursive=True)
    assert len(kids) >= 4, kids  # two `qclip launch` children, each with its kernel
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143 and 'stopped' in err, (p.returncode, out[-2000:], err[-2000:])
    assert not psutil.wait_procs(kids, timeout=20)[1], 'processes of the stopped runs are still running'
    assert not any(runs.glob('*/results.json'))
    r = _qclip('run', 'stop.yaml', '--jobs', '2', cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count('stopped -> resume') == 2, r.stdout[-3000:] + r.stderr[-3000:]
    for s in (0, 1):
        assert json.loads((runs/f'seed={s}'/'results.json').read_text())['steps'] == 150
        assert 'resuming from' in (runs/f'seed={s}'/'notebook.ipynb').read_text()
