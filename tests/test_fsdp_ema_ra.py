"""FSDP with EMA and RangeAugment (the paper's recipe, Table 11) on 2 gloo processes: the same run as DDP's, an
interrupted run resumes to the same weights, and its checkpoint resumes on one process."""
import json
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from qclip.distributed import launch, RankFailedError
from qclip.train import pretrain

# global batch 16 = 2 x 8; ema and range_augment on (the paper's ViT-B/16 recipe)
P = dict(steps=8, batch_size=8, warmup=2, lr=2e-4, log_every=1, eval_every=4, ckpt_every=4, synth_n=256, synth_val=64,
         workers=0, ema=0.9, range_augment=True)

def _rows(d): return [json.loads(l) for l in (Path(d)/'metrics.jsonl').read_text().splitlines()]

def _run(out, nproc=2, **kw):
    p = dict(P, out_dir=str(out), **kw)
    return launch(pretrain, p, nproc_per_node=nproc) if nproc > 1 else pretrain(**p)

@pytest.fixture(scope='module')
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp')/'run'
    return out, _run(out, parallel='fsdp')

def test_fsdp_with_ema_and_range_augment_matches_ddp(fsdp, tmp_path):
    out, res = fsdp
    assert res['steps'] == 8 and res['world_size'] == 2
    ddp = _run(tmp_path/'ddp', parallel='ddp')
    a, b = _rows(tmp_path/'ddp'), _rows(out)
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, 9))
    print('loss ddp: ', [f"{r['loss']:.4f}" for r in a], '\nloss fsdp:', [f"{r['loss']:.4f}" for r in b])
    for x, y in zip(a, b): assert abs(x['loss'] - y['loss']) < 2e-3, (x['step'], x['loss'], y['loss'])
    # the saved weights are the EMA's, equal up to float summation order (reduce-scatter vs all-reduce)
    wa, wb = load_file(tmp_path/'ddp'/'model.safetensors'), load_file(out/'model.safetensors')
    assert wa.keys() == wb.keys()
    for k in wa: torch.testing.assert_close(wa[k], wb[k], atol=2e-4, rtol=1e-3)
    ck = torch.load(out/'checkpoint.pt', weights_only=True)
    assert ck['ema'].keys() == wa.keys() and ck['range_augment'] and ck['range_augment_opt']['state']
    # the EMA is not the model: decay 0.9 over 8 steps lags behind it
    assert not torch.equal(ck['ema']['visual.proj'], ck['model']['visual.proj'])
    ddp_ck = torch.load(tmp_path/'ddp'/'checkpoint.pt', weights_only=True)
    assert ck['range_augment'].keys() == ddp_ck['range_augment'].keys()

def test_fsdp_interrupted_resumes_to_the_same_weights(fsdp, tmp_path, monkeypatch):
    "Failing after its first checkpoint and resumed, an FSDP + EMA + RangeAugment run ends where the straight one does."
    out, res = fsdp
    half = tmp_path/'half'
    monkeypatch.setenv('QCLIP_FAIL_AT', '1:6')  # rank 1 raises at step 6: the checkpoint of step 4 is what is left
    with pytest.raises(RankFailedError, match='injected failure on rank 1 at step 6'): _run(half, parallel='fsdp')
    monkeypatch.delenv('QCLIP_FAIL_AT')
    assert torch.load(half/'checkpoint.pt', weights_only=True)['step'] == 4
    _run(half, parallel='fsdp')
    a, b = load_file(out/'model.safetensors'), load_file(half/'model.safetensors')
    for k in a: assert torch.equal(a[k], b[k]), k
    ca, cb = (torch.load(d/'checkpoint.pt', weights_only=True) for d in (out, half))
    for k in ca['range_augment']: assert torch.equal(ca['range_augment'][k], cb['range_augment'][k]), k
    assert [r['loss'] for r in _rows(out)] == [r['loss'] for r in _rows(half)]

def test_fsdp_checkpoint_resumes_on_one_process(fsdp, tmp_path):
    out, _ = fsdp
    one = tmp_path/'one'
    one.mkdir(); (one/'checkpoint.pt').write_bytes((out/'checkpoint.pt').read_bytes())
    res = _run(one, nproc=1, batch_size=16, steps=10, parallel='fsdp')  # one process: no sharding, same checkpoint
    assert res['steps'] == 10 and [r['step'] for r in _rows(one)] == [9, 10]
    assert abs(_rows(one)[0]['loss'] - _rows(out)[-1]['loss']) < 1.0  # it continued (chance is 2 log 16 = 5.5)
