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
                params=dict(steps=2, batch_size=8, warmup=1, log_every=1, eval_every=2, ckpt_every=2, synth_n=256, val_images=64, workers=0),
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
