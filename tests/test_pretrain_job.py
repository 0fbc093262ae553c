"The main job as users run it: papermill on nbs/10_pretrain.ipynb, and the qclip_pretrain command."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import papermill as pm, pytest, torch, yaml
from safetensors.torch import load_file

NB = Path(__file__).parents[1]/'nbs'/'10_pretrain.ipynb'
TINY = dict(steps=6, batch_size=16, warmup=2, log_every=2, eval_every=3, ckpt_every=3, synth_n=256, synth_val=64, workers=0)

def _run(tmp_path, **params):
    return pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters=params, kernel_name='python3',
                               progress_bar=False, cwd=str(tmp_path))

def test_papermill_run_writes_outputs(tmp_path):
    out = tmp_path/'run'
    _run(tmp_path, out_dir=str(out), **TINY)
    assert {'params.yaml', 'metrics.jsonl', 'metrics.png', 'checkpoint.pt', 'model.safetensors', 'results.json'} <= {p.name for p in out.iterdir()}
    p = yaml.safe_load((out/'params.yaml').read_text())
    assert p['steps'] == 6 and p['dataset'] == 'synth-datacompdr' and p['caption_source'] == 'gt+syn'
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [2, 3, 4, 6] and 'val_i2t_r1' in rows[-1]
    # the final weights are an open_clip state dict
    import open_clip, qclip.models  # registers qclip's configs
    m = open_clip.create_model('tiny-vit', pretrained=str(out/'model.safetensors'))
    torch.testing.assert_close(m.state_dict()['logit_scale'], load_file(out/'model.safetensors')['logit_scale'])
    # the record shows the progress as text, to 100% (a widget would leave a frozen 0% there: ipywidgets is installed)
    outs = [o for c in json.loads((tmp_path/'out.ipynb').read_text())['cells'] for o in c.get('outputs', [])]
    assert not any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outs)
    assert 'pretrain: 100%' in ''.join(''.join(o.get('text', '')) for o in outs)

def test_zero_steps_writes_the_untrained_model(tmp_path):
    "steps=0 (the random-init floor of the downstream tables): the seeded initial weights, results at step 0, no plot."
    out = tmp_path/'init'
    _run(tmp_path, out_dir=str(out), **{**TINY, 'steps': 0, 'seed': 3})
    assert {'params.yaml', 'model.safetensors', 'results.json'} <= {p.name for p in out.iterdir()}
    r = json.loads((out/'results.json').read_text())
    assert r['steps'] == 0 and r['samples_seen'] == 0 and 0 <= r['val_i2t_r1'] <= 1
    from qclip.core import seed_everything
    from qclip.models import create_clip
    seed_everything(3)
    ref = create_clip('tiny-vit').state_dict()
    got = load_file(out/'model.safetensors')
    assert all(torch.equal(ref[k], got[k]) for k in got), 'not the model that seed 3 initialises'

@pytest.mark.parametrize('params,message', [
    (dict(model='ViT-X'), "unknown model='ViT-X'"),
    (dict(dataset='laion'), "unknown dataset='laion'"),
    (dict(caption_source='both'), "caption_source='both' is not valid; expected one of: gt, syn, gt+syn"),
    (dict(steps=-5), 'steps=-5 is not valid; expected a non-negative integer'),
    (dict(batch_size=-1), 'batch_size=-1 is not valid'),
    (dict(dataset='datacompdr', data_root='/nonexistent/shards'), "no webdataset shards (*.tar, or train/*.tar) found at '/nonexistent/shards'"),
    # NaN passes `<` and `==`, inf is positive: both trained before (a NaN loss, NaN weights, recall 1.0)
    (dict(lr=float('inf')), 'lr=inf is not valid; expected a positive number, not NaN or infinity'),
    (dict(lr=float('nan')), 'lr=nan is not valid'),
    (dict(weight_decay=float('nan')), 'weight_decay=nan is not valid'),
    (dict(grad_clip=float('nan')), 'grad_clip=nan is not valid'),
    (dict(min_lr=float('nan')), 'min_lr=nan is not valid'),
])
def test_bad_input_fails_fast(tmp_path, params, message):
    t0 = time.perf_counter()
    with pytest.raises(pm.PapermillExecutionError) as e: _run(tmp_path, out_dir=str(tmp_path/'run'), **params)
    assert message in str(e.value)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path/'run'/'checkpoint.pt').exists()

def test_diverged_run_stops_keeping_its_last_finite_checkpoint(tmp_path):
    """`papermill ... -p lr 1e3` (a typo for 1e-3) diverges within a few steps: the run stops there with one line (the
    step, the value, the checkpoint kept, the likely cause) and papermill exits non-zero; the checkpoint on disk is the
    last finite one, and no results.json claims a score."""
    out, params = tmp_path/'run', {**TINY, 'ckpt_every': 1, 'lr': '1e3'}
    cmd = [str(Path(sys.executable).with_name('papermill')), str(NB), str(tmp_path/'out.ipynb'), '--cwd', str(tmp_path),
           '-p', 'out_dir', str(out), *[a for k, v in params.items() for a in ('-p', k, str(v))]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, p.stderr[-2000:]
    line = next((l for l in p.stderr.splitlines() if l.startswith('DivergedError: ')), None)
    assert line, p.stderr[-3000:]
    m = re.fullmatch(r"DivergedError: training diverged: (.+?) at step (\d+); stopped, the last finite checkpoint "
                     r"(\S+) \(step (\d+)\) is kept; lr=1000.0 is likely too high \(the default is 0.001\); lower lr", line)
    assert m, line
    assert m[1].endswith(('=nan', '=inf', '=-inf', ' is not finite')) and m[3] == str(out/'checkpoint.pt')
    from qclip.core import load_checkpoint
    from qclip.harness import nonfinite
    ck = load_checkpoint(out/'checkpoint.pt')
    assert ck['step'] == int(m[4]) < int(m[2]) and nonfinite(ck['model']) is None  # never overwritten with NaN weights
    assert not (out/'results.json').exists() and not (out/'model.safetensors').exists()

def test_missing_data_says_how_to_run_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv('QCLIP_DATA', str(tmp_path/'data'))
    with pytest.raises(pm.PapermillExecutionError) as e: _run(tmp_path, dataset='datacomp', caption_source='gt', out_dir=str(tmp_path/'run'))
    assert str(tmp_path/'data'/'datacomp') in str(e.value) and '-p dataset synth-datacomp' in str(e.value)

def _cli(out, **kw):
    args = [f'{k}={v}' for k, v in {**TINY, 'steps': 12, 'ckpt_every': 4, 'eval_every': 100, 'out_dir': str(out), **kw}.items()]
    return [str(Path(sys.executable).with_name('qclip_pretrain')), *args]

def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    "A run killed with SIGKILL mid-chunk and resumed ends with the same weights as an uninterrupted one."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run(_cli(tmp_path/'a'), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(tmp_path/'b'), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = tmp_path/'b'/'metrics.jsonl', time.time() + 300
    while time.time() < deadline:  # kill between checkpoints: after step 6 is logged, before step 8's checkpoint
        steps = [json.loads(l)['step'] for l in log.read_text().splitlines()] if log.exists() else []
        if steps and steps[-1] >= 6: break
        assert proc.poll() is None, 'run ended before it could be killed'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert torch.load(tmp_path/'b'/'checkpoint.pt', weights_only=True)['step'] == 4
    assert not (tmp_path/'b'/'model.safetensors').exists()
    subprocess.run(_cli(tmp_path/'b'), check=True, env=env, capture_output=True, timeout=600)
    a, b = load_file(tmp_path/'a'/'model.safetensors'), load_file(tmp_path/'b'/'model.safetensors')
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    ra = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    rb = [json.loads(l) for l in (tmp_path/'b'/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in ra] == [r['step'] for r in rb]
    assert [r['loss'] for r in ra] == [r['loss'] for r in rb]
    # and the run never wrote anything half-way: no temporaries left in the folder
    assert not [p for p in (tmp_path/'b').iterdir() if p.name.startswith('.')]
