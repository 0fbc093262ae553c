"""Fine-tuning on 2 gloo processes on this CPU: classification (through `qclip launch` of nbs/20_classification.ipynb,
as a user runs it) and depth (through `qclip.distributed.launch`) take the steps of one process at the same global
batch, step by step; a run whose rank 1 dies resumes on 1 process and ends where the uninterrupted run ends."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from qclip.core import load_checkpoint
from qclip.distributed import launch, RankFailedError
from qclip.finetune import finetune_classification, finetune_depth

ROOT, BIN = Path(__file__).parents[1], Path(sys.executable).parent
# global batch 8 = 2 processes x 4 against 1 x 8; no stochastic depth (its draws are per rank by design)
CLS = dict(steps=4, warmup=1, lr=1e-4, log_every=1, eval_every=2, ckpt_every=2, synth_n=32, synth_val=16, drop_path=0.0, workers=0)
DEPTH = dict(steps=4, warmup=1, lr=1e-4, log_every=1, eval_every=4, ckpt_every=2, synth_n=16, synth_val=8, drop_path=0.0, workers=0)
# Stated tolerances: the same arithmetic up to the order of float sums (DDP's gradient all-reduce, the sharded evaluation).
# AdamW moves every coordinate by about lr whatever its gradient, so float noise in a near-zero gradient can flip a
# coordinate's step: weights may differ by up to 2 x lr x steps there. The step itself is checked to float precision in
# test_depth_step_is_the_global_batch_step (gradients), and the losses and evaluations of every step here.
LOSS_TOL, WEIGHT_RTOL = 1e-4, 1e-3

def _rows(d): return [json.loads(l) for l in (Path(d)/'metrics.jsonl').read_text().splitlines()]

def _same_run(a, b, p):
    "Two run folders took the same steps: losses and evaluations per step, and the final weights."
    ra, rb = _rows(a), _rows(b)
    assert [r['step'] for r in ra] == [r['step'] for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k not in ('samples_per_s', 'val_n'): assert abs(x[k] - y[k]) <= LOSS_TOL * max(1, abs(x[k])), (x['step'], k, x[k], y[k])
    sa, sb = load_checkpoint(Path(a)/'checkpoint.pt')['model'], load_checkpoint(Path(b)/'checkpoint.pt')['model']
    for k in sa: torch.testing.assert_close(sa[k], sb[k], atol=2 * p['lr'] * p['steps'], rtol=WEIGHT_RTOL, msg=k)

@pytest.fixture(scope='module')
def one_proc_cls(tmp_path_factory):
    d = tmp_path_factory.mktemp('cls1')/'run'
    return d, finetune_classification(**CLS, batch_size=8, out_dir=d)

def test_two_process_classification_is_the_global_batch(one_proc_cls, tmp_path):
    "`qclip launch --nproc-per-node 2` of the job notebook: one run, one writer, the 1 x 8 run's steps."
    d1, r1 = one_proc_cls
    args = [a for k, v in {**CLS, 'batch_size': 4, 'out_dir': tmp_path/'run'}.items() for a in ('-p', k, str(v))]
    cmd = [str(BIN/'qclip'), 'launch', '--nproc-per-node', '2', str(ROOT/'nbs'/'20_classification.ipynb'),
           str(tmp_path/'out.ipynb'), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((tmp_path/'run'/'results.json').read_text())
    assert (res['world_size'], res['global_batch'], r1['world_size'], r1['global_batch']) == (2, 8, 1, 8)
    assert load_checkpoint(tmp_path/'run'/'checkpoint.pt')['world_size'] == 2
    assert res['val_n'] == r1['val_n'] == 16 and res['top1'] == pytest.approx(r1['top1'])
    _same_run(d1, tmp_path/'run', CLS)
    assert len(_rows(tmp_path/'run')) == CLS['steps']  # rank 0 alone writes the log: one row per step, not two

def test_two_process_run_resumes_on_one(one_proc_cls, tmp_path, monkeypatch):
    "Rank 1 dies at step 3 (after the step-2 checkpoint); one process at batch 8 resumes it and ends as the 1 x 8 run."
    d1, _ = one_proc_cls
    out = tmp_path/'run'
    monkeypatch.setenv('QCLIP_FAIL_AT', '1:3')
    with pytest.raises(RankFailedError, match='rank 1 of 2 failed first'):
        launch(finetune_classification, dict(CLS, batch_size=4, out_dir=str(out)), nproc_per_node=2, log_dir=tmp_path/'logs')
    monkeypatch.delenv('QCLIP_FAIL_AT')
    ck = load_checkpoint(out/'checkpoint.pt')
    assert (ck['step'], ck['world_size']) == (2, 2) and not (out/'results.json').exists()
    with pytest.raises(ValueError, match='global batch_size'):  # another global batch is another run
        finetune_classification(**CLS, batch_size=4, out_dir=out)
    finetune_classification(**CLS, batch_size=8, out_dir=out)
    _same_run(d1, out, CLS)

def test_two_process_depth_is_the_global_batch(tmp_path):
    "Depth's SiLog loss is not a mean over images: summed statistics over the ranks make 2 x 4 the 1 x 8 step."
    one = finetune_depth(**DEPTH, batch_size=8, out_dir=tmp_path/'one')
    two = launch(finetune_depth, dict(DEPTH, batch_size=4, out_dir=str(tmp_path/'two')), nproc_per_node=2, log_dir=tmp_path/'logs')
    assert (two['world_size'], two['global_batch']) == (2, 8) and two['val_n'] == one['val_n'] == 8
    _same_run(tmp_path/'one', tmp_path/'two', DEPTH)

def test_depth_step_is_the_global_batch_step(tmp_path):
    "The gradient itself: 2 x 4 images under DDP (global batch norm, summed SiLog) give the 1 x 8 step's, to float precision."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(Path(__file__).with_name('_depth_step_worker.py')), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path/'ddp.pt', weights_only=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from _depth_step_worker import batch, model
    from qclip.heads import SiLogLoss
    m = model(); x, g = batch()
    loss = SiLogLoss()(m(x), g); loss.backward()
    assert abs(loss.item() - ddp['loss']) < 1e-5
    for n, p in m.named_parameters():
        if p.grad is not None: torch.testing.assert_close(ddp['grads'][n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    for k, v in m.state_dict().items(): torch.testing.assert_close(ddp['state'][k], v, msg=k)  # running statistics
