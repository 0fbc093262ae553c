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

def _one_line_refusal(r, *parts):
    "`qclip run` refused the spec: exit 2, one line on stderr (no traceback) holding each of `parts`."
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('qclip run: '), r.stderr[-3000:]
    for p in parts: assert p in lines[0], lines[0]
    return lines[0]

TINY_PRE = dict(steps=0, batch_size=8, synth_n=256, synth_val=64, workers=0)

def test_stage_name_cannot_escape_out_root(tmp_path):
    "A stage called '../../../x' wrote a whole run three folders above out_root; it is refused before anything starts."
    cwd = tmp_path/'a'/'b'/'c'; cwd.mkdir(parents=True)
    spec = dict(out_root='runs', stages={'../../../x': dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), params=TINY_PRE)})
    (cwd/'esc.yaml').write_text(yaml.safe_dump(spec))
    _one_line_refusal(_qclip('run', 'esc.yaml', cwd=cwd), "stage name '../../../x' is not valid")
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['a', 'b', 'c', 'esc.yaml']  # nothing written anywhere

def test_out_root_that_is_a_file_is_one_line(tmp_path):
    (tmp_path/'taken').write_text('a file, not a folder\n')
    spec = dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), out_root='taken', params=TINY_PRE)
    (tmp_path/'f.yaml').write_text(yaml.safe_dump(spec))
    _one_line_refusal(_qclip('run', 'f.yaml', cwd=tmp_path), "out_root='taken' cannot be a folder: 'taken' is a file")

def test_missing_weights_refused_before_any_run(tmp_path):
    "A `weights:` file that is not there stops `qclip run` before the runs before and after it start or leave folders."
    nb = str(ROOT/'nbs'/'20_classification.ipynb')
    spec = dict(out_root='runs/w', stages=dict(
        pre=dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), params=TINY_PRE),
        ext=dict(weights={'openai': dict(encoder=str(tmp_path/'no'/'openai.safetensors'), arch='tiny-vit')}),
        linear=dict(notebook=nb, after=['pre', 'ext'], params=dict(mode='linear', steps=1, batch_size=8, warmup=1))))
    (tmp_path/'w.yaml').write_text(yaml.safe_dump(spec, sort_keys=False))
    _one_line_refusal(_qclip('run', 'w.yaml', cwd=tmp_path),
                      f"stages.ext.weights.openai.encoder='{tmp_path/'no'/'openai.safetensors'}' does not exist")
    assert not (tmp_path/'runs').exists()

def _limited(max_bytes):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (max_bytes, max_bytes))

def test_alias_bomb_refused_quickly_in_bounded_memory(tmp_path):
    """A 'billion laughs' parameter (10^9 values in 500 bytes) hung `qclip run` past 2.7 GB; it is refused in one line,
    well inside 1.5 GB of heap (the interpreter with torch takes ~0.8 GB) and a generous time limit."""
    bomb = 'a: &a [x, x, x, x, x, x, x, x, x, x]\n' + ''.join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip('abcdefgh', 'bcdefghi'))
    (tmp_path/'bomb.yaml').write_text(f"notebook: {ROOT/'nbs'/'10_pretrain.ipynb'}\ndescription:\n"
                                      + ''.join('  ' + l + '\n' for l in bomb.splitlines()) + 'params: {data_root: *i}\n')
    r = subprocess.run([str(BIN/'qclip'), 'run', 'bomb.yaml'], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       preexec_fn=_limited(3 << 29))
    _one_line_refusal(r, 'bomb.yaml: its YAML aliases (*name) expand to more than 1,000,000 values')
    assert not (tmp_path/'runs').exists()

def test_oversized_spec_refused(tmp_path):
    "A spec over 1 MiB (a 58 MB one took 4 GB before printing anything) is refused without being parsed."
    spec = dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), params=TINY_PRE, description='x' * (2 << 20))
    (tmp_path/'big.yaml').write_text(yaml.safe_dump(spec))
    r = subprocess.run([str(BIN/'qclip'), 'run', 'big.yaml', '--dry-run'], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, preexec_fn=_limited(3 << 29))
    _one_line_refusal(r, 'big.yaml: larger than 1,048,576 bytes')

def test_grid_dedup_is_linear():
    """De-duplicating a grid's union hashes each cell once: cells are compared only on a hash collision, never with
    every earlier cell (that was quadratic: 131 s for 100,000 runs)."""
    from qclip.jobs import expand_grid
    class V:  # a grid value that counts the comparisons made with it
        calls = 0
        def __init__(self, v): self.v = v
        def __hash__(self): return hash(self.v)
        def __eq__(self, o): V.calls += 1; return isinstance(o, V) and self.v == o.v
    a, b = [V(i) for i in range(100)], [V(i) for i in range(30)]
    runs = expand_grid([dict(a=a, b=b), dict(a=a[:50], b=b)])  # 3,000 runs + 1,500 repeats of them
    assert len(runs) == 3000 and V.calls <= 3000, V.calls  # quadratic: ~ 4.5 million
    assert len(expand_grid([dict(a=list(range(1000)), b=list(range(100)))] * 2)) == 100_000
