"""Adding a downstream task is a `Task` builder and a call to `qclip.finetune.fit`: here, counting the objects of the
built-in scenes (a regression nobody asked for). The run folder, exact resume, N processes, EMA, plot and results
come from the harness; the task below is the whole of what a new task writes (its recipe notebook would hold the
parameters and one call)."""
import json
from pathlib import Path
import pytest, torch, torch.nn as nn
from qclip.finetune import (Task, fit, check_cls_params, CLS_DEFAULTS, synth_arrays, SynthCls, _norm,
                            _collate)
from qclip.heads import load_encoder, Classifier
from qclip.distributed import rank_share, all_reduce_sum
from qclip.train import autocast

# ---- the task: 20 lines ----
class Counts(SynthCls):
    "Built-in scenes -> (uint8 image, number of objects)."
    def __init__(self, arrays, size, train):
        super().__init__(arrays, size, train); self.y = [len(i.unique()) - 1 for i in arrays['inst']]

@torch.no_grad()
def eval_count(model, val, norm, dev, p):
    err, n = 0., 0
    for x, y in torch.utils.data.DataLoader(rank_share(val), batch_size=64, collate_fn=_collate):
        with autocast(dev, p['precision']): err += (model(norm(x.to(dev))).float()[:, 0] - y.to(dev)).abs().sum().item()
        n += len(y)
    err, n = all_reduce_sum(err, n)
    return dict(count_mae=err / n, val_n=int(n))

def count_task(p:dict)->Task:
    tower = load_encoder(p['encoder'])
    train, val = (Counts(synth_arrays(p['dataset'], s, n), 64, s == 'train') for s, n in (('train', p['synth_n']), ('val', p['synth_val'])))
    norm, loss = _norm(tower), nn.MSELoss()
    return Task('count', train, val, Classifier(tower, 1), norm, lambda out, y: loss(out[:, 0], y.float()),
                lambda m, dev: eval_count(m, val, norm, dev, p), 'count_mae', 'held-out count error', dict(task='count'))
# ----

def test_a_new_task_is_a_builder(tmp_path, monkeypatch):
    kw = dict(steps=6, batch_size=8, warmup=1, log_every=2, eval_every=3, ckpt_every=3, synth_n=32, synth_val=16, lr=1e-3)
    p = check_cls_params(**kw, out_dir=tmp_path/'count')
    monkeypatch.setenv('QCLIP_FAIL_AT', '0:4')  # killed after the step-3 checkpoint
    with pytest.raises(RuntimeError, match='injected failure'): fit(p, count_task, CLS_DEFAULTS)
    monkeypatch.delenv('QCLIP_FAIL_AT')
    r = fit(p, count_task, CLS_DEFAULTS)  # resumed at step 3
    assert r['task'] == 'count' and r['val_n'] == 16 and 0 <= r['count_mae'] < 10
    assert {'params.yaml', 'metrics.jsonl', 'checkpoint.pt', 'model.safetensors', 'results.json', 'metrics.png'} <= {
        f.name for f in (tmp_path/'count').iterdir()}
    rows = [json.loads(l) for l in (tmp_path/'count'/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [2, 3, 4, 6] and 'count_mae' in rows[-1]
    once = fit(check_cls_params(**kw, out_dir=tmp_path/'once'), count_task, CLS_DEFAULTS)  # the harness's exact resume
    assert r['count_mae'] == once['count_mae'] and r['loss'] == once['loss']
    with pytest.raises(ValueError, match="'task': \\('count', 'cls'\\)"):  # a run folder resumes only its own task
        fit({**p, 'steps': 9}, lambda q: Task(**{**count_task(q).__dict__, 'name': 'cls'}), CLS_DEFAULTS)
