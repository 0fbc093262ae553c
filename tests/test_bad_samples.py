"""Bad data in a resampled stream, counted as distinct samples, not reads: one broken image, one sample without
`syn.json` and one shard cut short, met again and again by 2 ranks x 2 loader workers, are reported as 1, 1 and 1
distinct bad samples beside their failed reads; and data that is all bad stops within a few hundred reads."""
import io, json
from pathlib import Path
import numpy as np, pytest, torch, webdataset as wds
from PIL import Image
from qclip.data.shards import BadDataError
from qclip.distributed import launch
from qclip.train import pretrain

def _jpeg(i):
    a = np.random.default_rng(i).integers(0, 255, (72, 72, 3), np.uint8)
    b = io.BytesIO(); Image.fromarray(a).save(b, format='JPEG', quality=90); return b.getvalue()

def _sample(k, i, **drop):
    s = {'__key__': f'{k}{i:03d}', 'jpg': _jpeg(i), 'txt': f'photo {k} {i}', 'json': {'uid': f'{k}{i:03d}'},
         'syn.json': {'syn_text': [f'synthetic {j} of {k}{i}' for j in range(5)]}}
    for key, v in drop.items():
        if v is None: del s[key]
        else: s[key] = v
    return s

def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples: w.write(s)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    _write(root/'00000.tar', [_sample('a', i) for i in range(16)])
    broken = {3: {'jpg': b'not a jpeg'}, 7: {'syn.json': None}}  # an image that does not decode; no synthetic captions
    _write(root/'00001.tar', [_sample('b', i, **broken.get(i, {})) for i in range(16)])
    _write(root/'00002.tar', [_sample('c', i) for i in range(16)])
    raw = (root/'00002.tar').read_bytes()
    (root/'00002.tar').write_bytes(raw[:len(raw) * 2 // 3])  # cut short mid-member: the samples before the cut are used
    allbad = root/'allbad'; allbad.mkdir()
    _write(allbad/'00000.tar', [_sample('x', i, jpg=b'not a jpeg') for i in range(2000)])
    return root

PARAMS = dict(dataset='datacompdr', caption_source='gt+syn', steps=8, batch_size=16, warmup=1, log_every=2,
              eval_every=100, ckpt_every=4, workers=2, model='tiny-vit')

def test_distinct_bad_samples_beside_failed_reads(data, tmp_path):
    out = tmp_path/'run'
    res = launch(pretrain, dict(PARAMS, data_root=f'{data}/{{00000..00002}}.tar', out_dir=str(out)), nproc_per_node=2)
    assert res['world_size'] == 2 and res['steps'] == 8
    # 2 ranks x 2 workers x 8 steps x 16 samples: each shard was read many times over
    assert res['bad_samples'] == {'image': 1, 'missing': 1, 'truncated': 1}, res
    assert all(res['bad_reads'][k] >= 2 for k in res['bad_samples']), res['bad_reads']
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    last = rows[-1]
    assert (last['bad_samples'], last['bad_reads']) == (3, sum(res['bad_reads'].values()))
    assert {k: last[f'bad_samples_{k}'] for k in res['bad_samples']} == res['bad_samples']
    assert {k: last[f'bad_reads_{k}'] for k in res['bad_reads']} == res['bad_reads']
    assert all(a['bad_reads'] <= b['bad_reads'] for a, b in zip(rows, rows[1:]))  # cumulative
    # the checkpoint carries the tally: a resumed run goes on counting from it, still 3 distinct samples
    ck = torch.load(out/'checkpoint.pt', weights_only=True)
    assert {k: len(v) for k, v in ck['bad_ids'].items()} == res['bad_samples'] and ck['bad'] == res['bad_reads']
    res2 = pretrain(**dict(PARAMS, data_root=f'{data}/{{00000..00002}}.tar', out_dir=str(out), steps=10, batch_size=32))
    assert res2['bad_samples'] == res['bad_samples']
    assert sum(res2['bad_reads'].values()) > sum(res['bad_reads'].values())

def test_all_bad_data_stops_early(data, tmp_path):
    with pytest.raises(BadDataError) as e:
        pretrain(**dict(PARAMS, data_root=str(data/'allbad'), out_dir=str(tmp_path/'run'), workers=0))
    msg = str(e.value)
    assert 'failed to read (more than max_bad_frac=0.5)' in msg and "{'image': 20}" in msg, msg
