"""`report_to`: every job's curves in TensorBoard and W&B (offline, no account), read back through the tools' own readers
(TensorBoard's EventAccumulator, the records of W&B's .wandb files) and held to what the job wrote: each scalar equals
the metrics.jsonl row of its step, also after a SIGKILL and resume, from one writer under a 2-process launch."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path
import papermill as pm, pytest, torch, yaml
pytest.importorskip('tensorboard', reason="needs the tracking extra: pip install -e '.[tracking]'")
pytest.importorskip('wandb', reason="needs the tracking extra: pip install -e '.[tracking]'")
from qclip.tracking import read_tensorboard, read_wandb

ROOT = Path(__file__).parents[1]
NBS, BIN = ROOT/'nbs', Path(sys.executable).parent
TINY = dict(steps=4, batch_size=8, warmup=1, log_every=1, eval_every=2, ckpt_every=2, synth_n=128, synth_val=32, workers=0)

@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    "W&B offline (no account, no network) and quiet, in this process and the kernels and processes it starts."
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.delenv('QCLIP_REPORT_TO', raising=False); monkeypatch.setenv('OMP_NUM_THREADS', '1')

def _rows(path): return [json.loads(l) for l in Path(path).read_text().splitlines()]

def _numbers(row): return {k: v for k, v in row.items() if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)}

def assert_tensorboard_is(log_dir, rows, step='step'):
    "TensorBoard shows for `log_dir` exactly the numbers of `rows`, each once, at its row's step (float32 precision)."
    got, want = read_tensorboard(log_dir), {}
    for r in rows:
        for k, v in _numbers(r).items(): want.setdefault(k, []).append((r[step], v))
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k, pts in want.items():
        assert [s for s, _ in got[k]] == [s for s, _ in pts], (k, got[k], pts)  # no step missing or duplicated
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in pts], rel=1e-6, abs=1e-12, nan_ok=True), k

def _wandb_written(out_dir, timeout=60):
    "Wait for W&B's service to write out the last run's file (`finish` returns before it has, now and then)."
    from qclip.tracking import wandb_records
    t0 = time.time()
    while time.time() - t0 < timeout:
        files = sorted(Path(out_dir).glob('wandb/*run-*/run-*.wandb'), key=os.path.getmtime)
        if files and any(r.WhichOneof('record_type') == 'exit' for r in wandb_records(files[-1])): return
        time.sleep(0.2)
    raise TimeoutError(f'no finished W&B run under {out_dir}/wandb after {timeout} s')

def assert_wandb_is(out_dir, rows, runs=1, step='step', since=None):
    """The W&B runs under `out_dir`: `runs` of one id, each history row equal to the `rows` row of its step (the last);
    every step there, or (a killed offline run may lose its last second) every step from `since` on."""
    _wandb_written(out_dir)
    wb = read_wandb(out_dir)
    assert len(wb) == runs and len({r['id'] for r in wb}) == 1, [(r['id'], r['name']) for r in wb]
    hist, by_step = [h for r in wb for h in r['history']], {r[step]: r for r in rows}
    last = {h[step]: h for h in hist}  # a resumed run logs the steps after its checkpoint again: the later one counts
    if since is None: assert sorted(last) == sorted(by_step), (sorted(last), sorted(by_step))
    else: assert set(last) <= set(by_step) and {s for s in by_step if s >= since} <= set(last), (sorted(last), sorted(by_step))
    for s, h in last.items():
        want = _numbers(by_step[s])
        assert {k: v for k, v in h.items() if k in want} == pytest.approx(want, rel=1e-9, nan_ok=True), s
    return wb

def _event_files(log_dir): return sorted(Path(log_dir).glob('events.out.tfevents.*'))

def test_pretrain_notebook_on_two_processes_reports_once(tmp_path):
    """qclip launch --nproc-per-node 2 nbs/10_pretrain.ipynb -p report_to tensorboard,wandb (papermill): rank 0 alone
    writes, one event file and one W&B run, both equal to metrics.jsonl, with the parameters once."""
    out = tmp_path/'run'
    args = [a for k, v in dict(TINY, out_dir=out, report_to='tensorboard,wandb').items() for a in ('-p', k, str(v))]
    r = subprocess.run([str(BIN/'qclip'), 'launch', '--nproc-per-node', '2', str(NBS/'10_pretrain.ipynb'), str(tmp_path/'out.ipynb'),
                        *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, params = _rows(out/'metrics.jsonl'), yaml.safe_load((out/'params.yaml').read_text())
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and 'val_i2t_r1' in rows[-1] and params['report_to'] == 'tensorboard,wandb'
    assert json.loads((out/'results.json').read_text())['world_size'] == 2
    assert len(_event_files(out/'tensorboard')) == 1 and len(list((out/'wandb').glob('*run-*'))) == 1
    assert_tensorboard_is(out/'tensorboard', rows)
    assert {'loss', 'lr', 'samples_per_s', 'val_i2t_r1', 'bad_samples'} <= set(read_tensorboard(out/'tensorboard'))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out/'tensorboard')); ea.Reload()
    assert 'steps: 4' in ea.Tensors('params.yaml/text_summary')[0].tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # the HParams dashboard's session
    hp = HParamsPluginData.FromString(ea.PluginTagToContent('hparams')['_hparams_/session_start_info']).session_start_info
    assert (hp.hparams['steps'].number_value, hp.hparams['model'].string_value) == (4, 'tiny-vit')
    wb = assert_wandb_is(out, rows)
    assert wb[0]['name'] == 'run' and wb[0]['group'] is None
    assert {k: v for k, v in wb[0]['config'].items() if not k.startswith('_')} == params

def test_sigkill_then_resume_continues_the_same_curves(tmp_path):
    "A run killed after logging past its checkpoint and resumed: each step once, the resumed run's values; one W&B id."
    out = tmp_path/'run'
    cmd = [str(BIN/'qclip_pretrain'), *[f'{k}={v}' for k, v in dict(TINY, steps=12, log_every=2, ckpt_every=4, eval_every=100,
                                                                      out_dir=out, report_to='tensorboard,wandb').items()]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill after step 6 is logged, before step 8's checkpoint
        steps = [r['step'] for r in _rows(out/'metrics.jsonl')] if (out/'metrics.jsonl').exists() else []
        if steps and steps[-1] >= 6: break
        assert proc.poll() is None, 'run ended before it could be killed'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert torch.load(out/'checkpoint.pt', weights_only=True)['step'] == 4
    before = read_tensorboard(out/'tensorboard')
    assert [s for s, _ in before['loss']][:3] == [2, 4, 6]  # what the killed run showed: past its checkpoint
    time.sleep(1.1)  # event files are named by the second they were opened in
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    rows = _rows(out/'metrics.jsonl')
    assert [r['step'] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert len(_event_files(out/'tensorboard')) == 2  # the resumed run appends a file to the same run
    assert_tensorboard_is(out/'tensorboard', rows)  # step 6 once: the resumed run's (its samples/s differ)
    _wandb_written(out); wb = read_wandb(out)  # the killed run's file: what W&B's service had written by then
    assert_wandb_is(out, rows, runs=len(wb), since=6)
    assert len(wb) in (1, 2) and wb[-1]['config'].get('model') is None  # the resumed run: its parameters were logged once

def test_finetune_jobs_report(tmp_path):
    "Classification and depth fine-tuning: their metrics rows (loss, lr, samples/s, top-1 / depth metrics) as curves."
    from qclip.finetune import finetune_classification, finetune_depth
    small = dict(steps=4, batch_size=8, warmup=1, log_every=2, eval_every=4, ckpt_every=2, synth_n=32, synth_val=16)
    finetune_classification(**small, out_dir=str(tmp_path/'cls'), report_to='tensorboard,wandb')
    rows = _rows(tmp_path/'cls'/'metrics.jsonl')
    assert 'top1' in rows[-1]
    assert_tensorboard_is(tmp_path/'cls'/'tensorboard', rows); assert_wandb_is(tmp_path/'cls', rows)
    finetune_depth(**small, encoder='tiny-mci', out_dir=str(tmp_path/'depth'), report_to='tensorboard')
    rows = _rows(tmp_path/'depth'/'metrics.jsonl')
    assert 'rmse' in rows[-1] and not (tmp_path/'depth'/'wandb').exists()
    assert_tensorboard_is(tmp_path/'depth'/'tensorboard', rows)

def test_probes_report_their_readouts(tmp_path):
    "The probes of a frozen encoder: every number of results.json, at step 0."
    from qclip.probes import probe_encoder
    res = probe_encoder(encoder='tiny-vit', synth_n=32, synth_val=16, dense_n=16, batch_size=32, out_dir=str(tmp_path/'p'),
                        report_to='tensorboard,wandb')
    assert 'linear_object' in res and 'zeroshot_object' in res
    row = dict(json.loads((tmp_path/'p'/'results.json').read_text()), step=0)
    assert_tensorboard_is(tmp_path/'p'/'tensorboard', [row]); assert_wandb_is(tmp_path/'p', [row])

def test_reinforce_command_reports(tmp_path):
    "`qclip reinforce --report-to`: the CoCa trained first (its metrics.jsonl), then the job's totals (results.json)."
    from qclip.reinforce import cli
    out = tmp_path/'r'
    assert cli(['--coca-train-steps', '2', '--n-captions', '1', '--seq-len', '8', '--batch-size', '8', '--synth-n', '16',
                '--device', 'cpu', '--out-dir', str(out), '--report-to', 'tensorboard,wandb']) == 0
    coca = _rows(out/'coca'/'metrics.jsonl')
    assert [r['step'] for r in coca] == [2] and 'caption_loss' in coca[0]
    assert_tensorboard_is(out/'coca'/'tensorboard', coca); assert_wandb_is(out/'coca', coca)
    res = json.loads((out/'results.json').read_text())
    row = dict(res, step=res['shards'], bad_samples=0)
    assert_tensorboard_is(out/'tensorboard', [row]); assert_wandb_is(out, [row])
    assert 'report_to' not in yaml.safe_load((out/'reinforce.yaml').read_text())  # not part of what the bytes depend on

def test_dense_job_reports_through_mmengine(tmp_path):
    """A segmentation job with report_to: mmengine's own visualizer writes its scalars.json rows to TensorBoard and W&B
    by iteration; resumed from its iteration-2 checkpoint after iteration 4 was logged, iterations 3-4 come once."""
    pytest.importorskip('mmcv.ops', reason='needs the OpenMMLab stack: tools/install_mm.sh')
    import qclip.mm as qm
    out = tmp_path/'seg'; wd = out/'work_dir'
    kw = dict(iters=4, batch_size=2, synth_n=[32, 8], workers=0, device='cpu', out_dir=str(out), report_to='tensorboard,wandb',
              cfg_options={'default_hooks.checkpoint.interval': 2, 'default_hooks.logger.interval': 1})
    scalars = lambda f: [json.loads(l) for l in f.read_text().splitlines()]
    qm.dense_job('seg', 'upernet-vit-small', **kw)
    first = scalars(sorted(wd.glob('*/vis_data/scalars.json'))[-1])
    assert [r['iter'] for r in first if 'loss' in r] == [1, 2, 3, 4]
    assert_tensorboard_is(wd/'tensorboard', first)
    os.remove(wd/'iter_4.pth'); (wd/'last_checkpoint').write_text(str(wd/'iter_2.pth'))  # as if killed after iteration 4's log
    time.sleep(1.1)  # event files are named by the second they were opened in
    qm.dense_job('seg', 'upernet-vit-small', **kw)
    second = scalars(sorted(wd.glob('*/vis_data/scalars.json'))[-1])
    assert [r['iter'] for r in second if 'loss' in r] == [3, 4]
    shown = [r for r in first if r['step'] <= 2] + second
    assert_tensorboard_is(wd/'tensorboard', shown)  # the first run's iterations 3-4 purged
    _wandb_written(wd); wb = read_wandb(wd)
    assert len(wb) == 2 and len({r['id'] for r in wb}) == 1 and wb[0]['name'] == 'seg'
    train = {h['iter']: h for r in wb for h in r['history'] if 'loss' in h}  # by iteration, the later run last
    want = {r['iter']: _numbers(r) for r in shown if 'loss' in r}
    assert sorted(train) == sorted(want) and all({k: train[i][k] for k in want[i]} == pytest.approx(want[i]) for i in want)

def test_qclip_run_groups_an_experiments_runs(tmp_path):
    "`qclip run --report-to`: W&B groups the runs by experiment; `tensorboard --logdir <out_root>` lists each run."
    spec = dict(notebook=str(NBS/'10_pretrain.ipynb'), out_root='runs/grid', params=dict(TINY, steps=2), grid=dict(seed=[0, 1]))
    (tmp_path/'grid.yaml').write_text(yaml.safe_dump(spec))
    r = subprocess.run([str(BIN/'qclip'), 'run', 'grid.yaml', '--report-to', 'tensorboard,wandb'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path/'runs'/'grid'
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    mux = EventMultiplexer(); mux.AddRunsFromDirectory(str(root)); mux.Reload()  # what `tensorboard --logdir` loads
    assert sorted(mux.Runs()) == ['seed=0/tensorboard', 'seed=1/tensorboard']
    for seed in (0, 1):
        d = root/f'seed={seed}'
        assert yaml.safe_load((d/'run.yaml').read_text())['params'].get('report_to') is None  # the spec's runs unchanged
        assert yaml.safe_load((d/'params.yaml').read_text())['report_to'] == 'tensorboard,wandb'
        rows = _rows(d/'metrics.jsonl')
        assert_tensorboard_is(d/'tensorboard', rows)
        wb = assert_wandb_is(d, rows)
        assert (wb[0]['group'], wb[0]['name']) == ('grid', f'seed={seed}')

def test_report_to_is_checked_like_every_parameter(tmp_path, monkeypatch):
    "An unknown writer fails naming report_to and what it accepts; a missing package names the extra; in one line."
    from qclip.train import check_params
    from qclip.reinforce import cli
    import importlib.util
    with pytest.raises(ValueError, match=r"report_to='tensorbord' is not valid; expected one of: '' \(none\), tensorboard, wandb"):
        check_params(report_to='tensorbord')
    r = subprocess.run([str(BIN/'qclip'), 'run', 'x.yaml', '--report-to', 'mlflow'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["qclip run: report_to='mlflow' is not valid; expected one of: "
                                                                   "'' (none), tensorboard, wandb, tensorboard,wandb"], r.stderr
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'wandb' else find(n, *a))  # the extra absent
    with pytest.raises(ModuleNotFoundError, match=r"needs the wandb package, which is not installed: pip install 'qclip\[tracking\]'"):
        check_params(report_to='wandb')
    assert cli(['--report-to', 'wandb', '--out-dir', str(tmp_path/'r')]) == 2 and not (tmp_path/'r').exists()
