"""Real pretraining data: small shards in each published layout (DataCompDR joined with DataComp, its bf16 `pth.gz`
variant, img2dataset alt-text with rewritten captions), corrupted copies of them, read by `qclip.data.shards` and by
the `10_pretrain` job itself (papermill)."""
import gzip, io, json, shutil
from collections import Counter
from pathlib import Path
import numpy as np, papermill as pm, pytest, torch, webdataset as wds, yaml
from PIL import Image
from open_clip import get_tokenizer
from qclip.data.augment import MEAN, STD
from qclip.data.shards import (DATASETS, ShardStream, make_loader, find_shards, dataset_spec, eval_transform,
                               train_transform, subset_shards, pair_dr_shards)

NB = Path(__file__).parents[1]/'nbs'/'10_pretrain.ipynb'
TINY = dict(steps=4, batch_size=8, warmup=1, log_every=2, eval_every=100, ckpt_every=2, workers=0)
TOK = get_tokenizer('ViT-B-16')
N_AUG, SIDE, D = 4, 40, 1536

def _enc(a, fmt):
    b = io.BytesIO(); Image.fromarray(a).save(b, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {})); return b.getvalue()

def _view_level(j, i): return 30 + 50 * j + 3 * (i % 5)  # grey level of stored view j of sample i

def _dcdr_sample(uid, i, emb='npz'):
    "A DataCompDR-joined sample: view j of the image is a grey square; teacher rows carry their index in column 0."
    a = np.zeros((SIDE, SIDE * N_AUG, 3), np.uint8)
    for j in range(N_AUG): a[:, j * SIDE:(j + 1) * SIDE] = _view_level(j, i)
    rng = np.random.default_rng(i)
    im, tx = rng.standard_normal((N_AUG, D)).astype(np.float32), rng.standard_normal((6, D)).astype(np.float32)
    im[:, 0], tx[:, 0] = np.arange(N_AUG) * 100, np.arange(6) * 100
    if emb == 'npz':
        z = io.BytesIO(); np.savez(z, image_emb=im.astype(np.float16), text_emb=tx.astype(np.float16)); e = z.getvalue()
    else:
        z = io.BytesIO(); torch.save({'image_emb': torch.from_numpy(im).bfloat16(), 'text_emb': torch.from_numpy(tx).bfloat16()}, z)
        e = z.getvalue()  # TarWriter gzips values of `*.gz` keys itself
    pa = [[[0, j * SIDE, SIDE, SIDE], [[i % 14, 0.3]]] for j in range(N_AUG)]
    return {'__key__': uid, 'jpg': _enc(a, 'JPEG'), 'txt': f'photo {uid}', 'json': {'uid': uid, 'sha256': '0' * 64},
            'url.txt': f'https://example.com/{uid}.jpg', 'syn.json': {'syn_text': [f'synthetic {s} of {uid}' for s in range(5)]},
            'paug.json': {'param_aug': pa if i % 2 else json.dumps(pa)},  # both published variants: list and JSON string
            emb: e}

def _write(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples: w.write(s)
    return path

def _dcdr(root, n_shards=2, per=10, emb='npz'):
    return [_write(root/f'{k:05d}.tar', [_dcdr_sample(f'{k:03d}{i:04d}', k * per + i, emb) for i in range(per)])
            for k in range(n_shards)]

def _alt_sample(uid, i, txt=True):
    "img2dataset layout (jpg/png/webp, txt, json) plus LaCLIP-style rewritten captions under `laclip.json`."
    a = np.full((48, 64, 3), 10 * (i % 20), np.uint8)
    fmt, ext = [('JPEG', 'jpg'), ('PNG', 'png'), ('WEBP', 'webp')][i % 3]
    s = {'__key__': uid, ext: _enc(a, fmt), 'json': {'key': uid, 'caption': f'alt {uid}', 'status': 'success'},
         'laclip.json': json.dumps([f'rewrite {r} of {uid}' for r in range(4)])}
    if txt: s['txt'] = f'alt {uid}'
    return s

def _tokens(texts): return TOK(texts)

def _batches(stream): return list(make_loader(stream))

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    d = dict(root=root, npz=_dcdr(root/'dcdr'), pth=_dcdr(root/'dcdr_bf16', emb='pth.gz'))
    d['alt'] = [_write(root/'alt'/f'{k:05d}.tar', [_alt_sample(f'{k:03d}{i:04d}', i) for i in range(9)]) for k in range(2)]
    d['alt_notxt'] = [_write(root/'alt_notxt'/f'{k:05d}.tar', [_alt_sample(f'{k:03d}{i:04d}', i, txt=i % 2 == 0) for i in range(10)]) for k in range(2)]
    # corrupted copies: every kind of bad sample in one shard, cut short in its last member; and a shard that is not there
    bad = [_dcdr_sample(f'900{i:04d}', i) for i in range(10)]
    bad[1]['jpg'] = b'\xff\xd8 this is not a jpeg'
    del bad[3]['txt']
    bad[5]['syn.json'] = b'{"syn_text": ["cut short'
    bad[7]['npz'] = b'not an npz'
    p = _write(root/'bad'/'00000.tar', bad)
    raw = p.read_bytes()
    last = raw.rfind(b'9000009.npz')  # the header of the last member
    p.write_bytes(raw[:last + 512 + 1000])   # its data cut mid-way
    d['bad'], d['missing'] = p, root/'bad'/'00001.tar'
    # the published split: DataCompDR tars (no jpg, no txt) + DataComp image shards, joined by uid. The image shards
    # lack two downloads (3, 7) and hold one image (99) that DataCompDR does not have.
    for k in range(2):
        full = [_dcdr_sample(f'{k:03d}{i:04d}', k * 10 + i) for i in range(10)]
        _write(root/'dr'/f'{k:05d}.tar', [{kk: v for kk, v in x.items() if kk not in ('jpg', 'txt')} for x in full])
        imgs = [{kk: x[kk] for kk in ('__key__', 'jpg', 'txt')} | {'json': {'uid': x['json']['uid'], 'status': 'success'}}
                for i, x in enumerate(full) if i not in (3, 7)]
        extra = _dcdr_sample(f'{k:03d}0099', 99)
        imgs.insert(4, {'__key__': extra['__key__'], 'jpg': extra['jpg'], 'txt': extra['txt'], 'json': {'uid': extra['json']['uid']}})
        _write(root/'dc'/f'{k:05d}.tar', imgs)
    return d

# ---------------------------------------------------------------- reading the layouts (library level)

@pytest.mark.parametrize('variant', ['npz', 'pth'])
def test_datacompdr_reads_every_key(data, variant):
    "jpg, txt, syn.json, paug.json (list and JSON string) and npz / pth.gz: the view, captions and teacher rows agree."
    s = ShardStream([str(u) for u in data[variant]], DATASETS['datacompdr'], 'gt+syn', TOK, train_transform(16), 5,
                    train=False, teacher=True, paug=True, extras=True)
    seen = 0
    for b in _batches(s):
        grey = ((b['images'] * STD + MEAN) * 255).mean((1, 2, 3))
        for n, key in enumerate(b['keys']):
            i, aug = int(key[:3]) * 10 + int(key[3:]), int(b['aug'][n])
            assert abs(grey[n] - _view_level(aug, i)) < 3             # the stored crop of entry `aug` was replayed
            assert b['image_emb'][n, 0] == 100 * aug                 # ... and its teacher image embedding came with it
            assert b['image_emb'].shape[1] == D and b['text_emb'].shape[1:] == (2, D)
            assert b['text_emb'][n, 0, 0] == 0                       # row 0: ground-truth caption
            s_idx = int(b['text_emb'][n, 1, 0].item()) // 100 - 1      # row 1 + s: synthetic caption s
            assert 0 <= s_idx < 5
            assert torch.equal(b['texts'][n], _tokens([f'photo {key}', f'synthetic {s_idx} of {key}']))
            seen += 1
        assert b['bad'] == {}
    assert seen == 20
    # every stored augmentation and every synthetic caption gets used
    s.train = True
    b = next(make_loader(s, 1))
    assert len(set(b['aug'].tolist())) > 1


def test_datacompdr_embeddings_match_between_variants(data):
    "The bf16 pth.gz variant carries the same embeddings as the npz one, to bf16/fp16 precision."
    kw = dict(spec=DATASETS['datacompdr'], caption_source='gt', tokenizer=TOK, transform=eval_transform(16), batch_size=20,
              train=False, teacher=True, extras=True)
    a = _batches(ShardStream([str(data['npz'][0])], **kw))[0]
    b = _batches(ShardStream([str(data['pth'][0])], **kw))[0]
    assert a['keys'] == b['keys']
    torch.testing.assert_close(a['text_emb'], b['text_emb'], atol=0.05, rtol=0.02)
    import tarfile
    with tarfile.open(data['pth'][0]) as tf:  # the published bf16 layout: a gzipped torch pickle under `pth.gz`
        raw = [tf.extractfile(m).read() for m in tf if m.name.endswith('.pth.gz')]
    assert len(raw) == 10 and all(r[:2] == b'\x1f\x8b' for r in raw)
    assert torch.load(io.BytesIO(gzip.decompress(raw[0])), weights_only=True)['image_emb'].dtype == torch.bfloat16


@pytest.mark.parametrize('source,expect', [
    ('gt', lambda k, caps: caps == [f'photo {k}']),
    ('syn', lambda k, caps: len(caps) == 1 and caps[0].startswith('synthetic') and caps[0].endswith(f'of {k}')),
    ('gt+syn', lambda k, caps: caps[0] == f'photo {k}' and caps[1].startswith('synthetic') and caps[1].endswith(f'of {k}')),
])
def test_caption_sources_datacompdr(data, source, expect):
    "Table 2's G / S / G+S: the captions of each sample are the ones asked for (one of the 5 synthetic drawn)."
    s = ShardStream([str(u) for u in data['npz']], DATASETS['datacompdr'], source, TOK, eval_transform(16), 20,
                    train=False, extras=True)
    b = _batches(s)[0]
    drawn = set()
    for n, k in enumerate(b['keys']):
        K = b['texts'].shape[1]
        cands = [[f'photo {k}']] if source == 'gt' else ([[f'synthetic {j} of {k}'] for j in range(5)] if source == 'syn'
                 else [[f'photo {k}', f'synthetic {j} of {k}'] for j in range(5)])
        hit = [c for c in cands if torch.equal(b['texts'][n], _tokens(c))]
        assert len(hit) == 1 and expect(k, hit[0]) and K == len(hit[0])
        if source != 'gt': drawn.add(hit[0][-1].split()[1])
    if source != 'gt': assert len(drawn) > 1  # different synthetic captions drawn across samples


def test_alt_text_rewritten_captions_as_syn(data):
    "img2dataset shards (jpg, png, webp) with LaCLIP-style rewrites under a key of the user's choice."
    spec = dataset_spec('cc12m', 'laclip.json')
    b = _batches(ShardStream([str(u) for u in data['alt']], spec, 'gt+syn', TOK, eval_transform(16), 18, train=False, extras=True))[0]
    assert len(b['keys']) == 18 and b['bad'] == {}
    for n, k in enumerate(b['keys']):
        assert any(torch.equal(b['texts'][n], _tokens([f'alt {k}', f'rewrite {r} of {k}'])) for r in range(4))


def test_bad_samples_counted_by_kind(data):
    "Each corruption is skipped and counted once under its kind; the good samples still arrive."
    shards = [str(data['bad']), str(data['missing']), str(data['npz'][0])]
    s = ShardStream(shards, DATASETS['datacompdr'], 'gt+syn', TOK, eval_transform(16), 4, train=False, teacher=True,
                    paug=True, extras=True)
    bs = _batches(s)
    counts = sum((Counter(b['bad']) for b in bs), Counter())
    assert counts == {'image': 1, 'missing': 1, 'malformed': 2, 'truncated': 1, 'shard': 1}, counts
    keys = [k for b in bs for k in b['keys']]
    assert sorted(k for k in keys if k.startswith('900')) == [f'900{i:04d}' for i in (0, 2, 4, 6, 8)]
    assert len(keys) == 5 + 10


def test_datacompdr_joined_with_datacomp_by_uid(data):
    "DataCompDR tars joined at read time with the DataComp shards holding jpg and txt; failed downloads are passed over."
    img, dr = find_shards('datacompdr', str(data['root']/'dc')), find_shards('datacompdr', str(data['root']/'dr'))
    s = ShardStream(img, DATASETS['datacompdr'], 'gt+syn', TOK, train_transform(16), 40, train=False, teacher=True, paug=True,
                    extras=True, dr_shards=pair_dr_shards(img, dr))
    (b,) = _batches(s)
    assert b['keys'] == [f'{k:03d}{i:04d}' for k in range(2) for i in range(10) if i not in (3, 7)]
    assert b['bad'] == {'missing': 2}  # uid 99 of each image shard has no DataCompDR sample
    grey = ((b['images'] * STD + MEAN) * 255).mean((1, 2, 3))
    for n, key in enumerate(b['keys']):
        i = int(key[:3]) * 10 + int(key[3:])
        assert abs(grey[n] - _view_level(int(b['aug'][n]), i)) < 3 and b['image_emb'][n, 0] == 100 * b['aug'][n]
        assert torch.equal(b['texts'][n, 0], _tokens([f'photo {key}'])[0])


def test_subset_is_a_prefix(data):
    shards, limits = subset_shards([str(u) for u in data['npz']], 13)
    b = _batches(ShardStream(shards, DATASETS['datacompdr'], 'gt', TOK, eval_transform(8), 100, train=False, limits=limits, extras=True))[0]
    assert b['keys'] == [f'000{i:04d}' for i in range(10)] + [f'001{i:04d}' for i in range(3)]

# ---------------------------------------------------------------- the 10_pretrain job (papermill)

def _run(tmp_path, **params):
    out = tmp_path/'run'
    tmp_path.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(NB), str(tmp_path/'out.ipynb'), parameters={**TINY, 'out_dir': str(out), **params},
                        kernel_name='python3', progress_bar=False, cwd=str(tmp_path))
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    return yaml.safe_load((out/'params.yaml').read_text()), rows, json.loads((out/'results.json').read_text())


def test_pretrain_distills_on_datacompdr_both_variants(tmp_path, data):
    "The MobileCLIP recipe on DataCompDR in both embedding formats, mixed by weight: stored crops, teachers, RangeAugment."
    root = f"{data['root']}/dcdr/{{00000..00001}}.tar::{data['root']}/dcdr_bf16/{{00000..00001}}.tar"
    p, rows, res = _run(tmp_path, dataset='datacompdr', data_root=root, data_weights='0.5::0.5', caption_source='gt+syn',
                        w0=0.25, w1=0.75, paug_replay=True, range_augment=True)
    assert (p['w0'], p['w1'], p['paug_replay'], p['range_augment'], p['data_weights']) == (0.25, 0.75, True, True, '0.5::0.5')
    assert [r['step'] for r in rows] == [2, 4] and all(np.isfinite(r['loss']) for r in rows)
    assert all(r['bad_samples'] == 0 for r in rows) and res['bad_samples'] == {}


def test_pretrain_joins_datacompdr_at_read_time(tmp_path, data):
    p, rows, res = _run(tmp_path, dataset='datacompdr', data_root=str(data['root']/'dc'), dr_root=str(data['root']/'dr'),
                        caption_source='gt+syn', w0=0.25, w1=0.75, paug_replay=True)
    assert p['dr_root'] == str(data['root']/'dr') and [r['step'] for r in rows] == [2, 4]
    assert set(res['bad_samples']) <= {'missing'}  # only the images DataCompDR does not have


def test_pretrain_skips_and_counts_bad_samples(tmp_path, data):
    "Corrupt image, missing txt, malformed syn.json / npz, truncated tar, missing shard: skipped, counted, run completes."
    root = f"{data['root']}/dcdr/{{00000..00001}}.tar::{data['root']}/bad/{{00000..00001}}.tar"
    p, rows, res = _run(tmp_path, dataset='datacompdr', data_root=root, data_weights='0.5::0.5', caption_source='gt+syn',
                        w1=0.5, paug_replay=True, steps=6, ckpt_every=6, log_every=3)
    assert [r['step'] for r in rows] == [3, 6]
    bad = res['bad_samples']
    assert set(bad) == {'image', 'missing', 'malformed', 'truncated', 'shard'}, bad
    assert rows[-1]['bad_samples'] == sum(bad.values()) and all(rows[-1][f'bad_samples_{k}'] == v for k, v in bad.items())
    assert rows[0]['bad_samples'] <= rows[-1]['bad_samples']  # cumulative
    assert all(res['bad_reads'][k] >= v for k, v in bad.items())  # distinct samples; each may be read more than once


def test_pretrain_uses_the_caption_source_asked(tmp_path, data):
    "Half the alt-text samples lack `txt`: an S run (rewrites under laclip.json) never needs it, a G run counts them missing."
    root = str(data['root']/'alt_notxt')
    _, rows, res = _run(tmp_path/'s', dataset='cc12m', data_root=root, caption_source='syn', syn_key='laclip.json', subset_samples=15)
    assert res['bad_samples'] == {} and rows[-1]['bad_samples'] == 0
    _, rows, res = _run(tmp_path/'g', dataset='cc12m', data_root=root, caption_source='gt', max_bad_frac=0.6)
    assert set(res['bad_samples']) == {'missing'} and res['bad_samples']['missing'] > 0


def test_pretrain_stops_when_most_samples_fail(tmp_path, data):
    root = f"{data['root']}/bad/{{00001..00009}}.tar"  # none of these exist
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(tmp_path, dataset='datacomp', data_root=root, caption_source='gt')
    assert 'failed to read (more than max_bad_frac=0.5)' in str(e.value) and "'shard'" in str(e.value)
    assert not (tmp_path/'run'/'checkpoint.pt').exists()
