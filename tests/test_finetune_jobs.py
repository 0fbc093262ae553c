"The downstream jobs as users run them: papermill on nbs/20_classification.ipynb and nbs/23_depth.ipynb."
import json, math, os, re, time
from pathlib import Path
import papermill as pm, pytest, torch, yaml

NBS = Path(__file__).parents[1]/'nbs'
CLS, DEPTH = NBS/'20_classification.ipynb', NBS/'23_depth.ipynb'
TINY = dict(steps=4, batch_size=8, warmup=1, log_every=2, eval_every=4, ckpt_every=2, synth_n=32, synth_val=16)
OUTPUTS = {'params.yaml', 'metrics.jsonl', 'metrics.png', 'checkpoint.pt', 'model.safetensors', 'results.json'}

@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # two cores shared with other test processes: torch with 2 threads each is several times slower than with 1
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # the papermill kernels inherit it
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _run(nb, tmp_path, **params):
    return pm.execute_notebook(str(nb), str(tmp_path/'out.ipynb'), parameters=params, kernel_name='python3',
                               progress_bar=False, cwd=str(tmp_path))

def _results(out):
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    return json.loads((out/'results.json').read_text())

def test_classification_job(tmp_path):
    out = tmp_path/'run'
    _run(CLS, tmp_path, out_dir=str(out), **TINY)
    r = _results(out)
    assert r['task'] == 'classification' and r['mode'] == 'finetune' and r['steps'] == 4 and r['val_n'] == 16
    for k in ('top1', 'top5', 'val_loss'): assert math.isfinite(r[k]), k
    assert 0 <= r['top1'] <= r['top5'] <= 100
    assert yaml.safe_load((out/'params.yaml').read_text())['lr'] == 1e-4  # the finetune default filled in (paper, Table 12)
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert [x['step'] for x in rows] == [2, 4] and 'top1' in rows[-1]

def test_depth_job(tmp_path):
    out = tmp_path/'run'
    _run(DEPTH, tmp_path, out_dir=str(out), encoder='tiny-mci', **TINY)
    r = _results(out)
    assert r['task'] == 'depth' and r['val_n'] == 16
    for k in ('rmse', 'abs_rel', 'sq_rel', 'rmse_log', 'log10', 'silog', 'd1', 'd2', 'd3'): assert math.isfinite(r[k]), k
    assert 0 <= r['d1'] <= r['d2'] <= r['d3'] <= 1

@pytest.mark.parametrize('nb,params', [(CLS, {}), (DEPTH, dict(encoder='tiny-mci'))])
def test_diverged_run_stops_keeping_its_last_finite_checkpoint(tmp_path, nb, params):
    """lr=1e3 (a typo for 1e-3) makes the weights NaN within a few steps (for depth first the batch-norm statistics,
    while the training loss still looks finite): the job stops there in one line, papermill fails, the checkpoint on
    disk is the last finite one, and no results.json is written (it said rmse NaN, or a score of a NaN model)."""
    out = tmp_path/'run'
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(nb, tmp_path, out_dir=str(out), **{**TINY, 'steps': 6, 'ckpt_every': 1, 'lr': 1e3, **params})
    assert e.value.ename == 'DivergedError', str(e.value)[-2000:]
    m = re.fullmatch(r"training diverged: (.+?) at step (\d+); stopped, the last finite checkpoint (\S+) \(step (\d+)\) "
                     r"is kept; lr=1000.0 is likely too high.*; lower lr", e.value.evalue)
    assert m and m[3] == str(out/'checkpoint.pt'), e.value.evalue
    from qclip.core import load_checkpoint
    from qclip.harness import nonfinite
    ck = load_checkpoint(out/'checkpoint.pt')
    assert ck['step'] == int(m[4]) < int(m[2]) and nonfinite(ck['model']) is None
    assert not (out/'results.json').exists()

def test_real_layouts(tmp_path):
    "Tiny fake ImageNet class folders and a NYUv2 tree in the BTS layout go through the jobs' real-data path."
    from qclip.finetune import fake_imagenet, fake_nyuv2
    fake_imagenet(tmp_path/'imagenet'); fake_nyuv2(tmp_path/'data'/'nyu_depth_v2')
    _run(CLS, tmp_path, out_dir=str(tmp_path/'cls'), dataset='imagenet', data_root=str(tmp_path/'imagenet'), img_size=32,
         mode='linear', steps=2, batch_size=4, warmup=1)
    r = _results(tmp_path/'cls')
    assert r['classes'] == ['n01440764', 'n01443537', 'n01484850'] and r['val_n'] == 12 and r['mode'] == 'linear'
    _run(DEPTH, tmp_path, out_dir=str(tmp_path/'depth'), dataset='nyuv2', data_root=str(tmp_path/'data'), crop=32,
         steps=2, batch_size=2, warmup=1)
    r = _results(tmp_path/'depth')
    assert r['val_n'] == 3 and r['crop'] == 32 and math.isfinite(r['rmse'])

@pytest.fixture(scope='module')
def wrong_arch_weights(tmp_path_factory):
    from qclip.models import create_clip, save_weights
    return save_weights(create_clip('tiny-vit'), tmp_path_factory.mktemp('w')/'tiny_vit.safetensors')

@pytest.mark.parametrize('nb,params,message', [
    (CLS, dict(encoder='ViT-X-99'), "encoder='ViT-X-99' is neither an architecture"),
    (DEPTH, dict(encoder='/no/such/run'), "encoder='/no/such/run' is neither an architecture"),
    (CLS, dict(dataset='imagenet', data_root='/no/imagenet'), "data_root='/no/imagenet': '/no/imagenet/train' does not exist; expected the layout root/train/<wnid>/*.JPEG"),
    (DEPTH, dict(dataset='nyuv2', data_root='/no/nyu'), "data_root='/no/nyu': no NYUv2 there; expected the layout root/sync/<scene>/rgb_XXXXX.jpg"),
    (CLS, dict(mode='probe'), "mode='probe' is not valid; expected one of: finetune, linear"),
    (DEPTH, dict(layer_decay=1.5), "layer_decay=1.5 is not valid"),
    (CLS, dict(lr=float('inf')), "lr=inf is not valid; expected a positive number, not NaN or infinity"),
    (DEPTH, dict(weight_decay=float('nan')), "weight_decay=nan is not valid"),
    (DEPTH, dict(min_lr=float('nan')), "min_lr=nan is not valid"),
    (CLS, dict(grad_clip=float('nan')), "grad_clip=nan is not valid"),
    (CLS, dict(encoder='WEIGHTS', arch='tiny-mci'), "checkpoint tiny_vit.safetensors does not fit arch 'tiny-mci'"),
    (DEPTH, dict(encoder='WEIGHTS'), "does not name its architecture; pass arch="),
])
def test_bad_input_fails_fast(tmp_path, nb, params, message, wrong_arch_weights):
    params = {k: str(wrong_arch_weights) if v == 'WEIGHTS' else v for k, v in params.items()}
    t0 = time.perf_counter()
    with pytest.raises(pm.PapermillExecutionError) as e: _run(nb, tmp_path, out_dir=str(tmp_path/'run'), **params)
    assert message in str(e.value)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path/'run'/'checkpoint.pt').exists()

def test_killed_depth_run_resumes_exactly(tmp_path, monkeypatch):
    "A depth run that dies after its step-2 checkpoint and is run again ends with the uninterrupted run's weights."
    from qclip.finetune import finetune_depth
    from qclip.core import load_checkpoint
    kw = dict(TINY, log_every=1, synth_n=16, synth_val=8, drop_path=0.2)
    a = finetune_depth(**kw, out_dir=tmp_path/'a')
    monkeypatch.setenv('QCLIP_FAIL_AT', '0:3')
    with pytest.raises(RuntimeError, match='injected failure on rank 0 at step 3'): finetune_depth(**kw, out_dir=tmp_path/'b')
    monkeypatch.delenv('QCLIP_FAIL_AT')
    assert load_checkpoint(tmp_path/'b'/'checkpoint.pt')['step'] == 2 and not (tmp_path/'b'/'results.json').exists()
    b = finetune_depth(**kw, out_dir=tmp_path/'b')
    sa, sb = load_checkpoint(tmp_path/'a'/'checkpoint.pt')['model'], load_checkpoint(tmp_path/'b'/'checkpoint.pt')['model']
    for k in sa: assert torch.equal(sa[k], sb[k]), k
    assert a['rmse'] == b['rmse']
    la = [json.loads(l)['loss'] for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    lb = [json.loads(l)['loss'] for l in (tmp_path/'b'/'metrics.jsonl').read_text().splitlines()]
    assert la == lb and len(la) == 4
    assert not [p for p in (tmp_path/'b').iterdir() if p.name.startswith('.')]  # no temporaries left behind
