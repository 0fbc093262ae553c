"""`qclip reinforce` and `qclip caption-quality` used carelessly (issue 25, part A): shards that are not tars, images that
are all bad, an out_dir that is a file, a reinforce.yaml without its keys, two jobs into one folder, a job killed
before its first side-car, a random-init CoCa. Real shards, real processes, real command lines; every failure is one
line and a non-zero exit, and nothing half-written is left behind."""
import io, json, os, signal, struct, subprocess, sys, time, zlib
from pathlib import Path
import pytest, torch, webdataset as wds, yaml
from PIL import Image
from qclip.core import lock_holder
from qclip.data.synth import write_synth_shards
from qclip.quality import cli as quality_cli
from qclip.reinforce import cli as reinforce_cli, reinforce

BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
TINY = dict(dataset='datacomp', coca='tiny-coca', coca_train_steps=0, n_captions=1, seq_len=6, batch_size=4,
            device='cpu', seed=3)  # a random-init CoCa: captions are noise, what matters here is where they go


def _args(**kw): return [a for k, v in kw.items() for a in ('--' + k.replace('_', '-'), str(v))]


def _run(*argv, env=None, cwd=None, timeout=600):
    "`qclip ...` as a real process."
    return subprocess.run([str(BIN/'qclip'), *map(str, argv)], capture_output=True, text=True, env=env or ENV, cwd=cwd,
                          timeout=timeout)


def _one_line(p, prefix):
    "The error of a failed command: a non-zero exit and one line (no traceback)."
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(prefix), p.stderr[-3000:]
    return line


def _files(d): return sorted(str(p.relative_to(d)) for p in Path(d).rglob('*') if p.is_file()) if Path(d).exists() else []


def _tars(d): return {p.name: p.read_bytes() for p in sorted((Path(d)/'train').glob('*.tar'))}


def _synth(d, n=8, shard_size=4, seed=0):
    return write_synth_shards('synth-align', Path(d), n, shard_size=shard_size, seed=seed)


@pytest.fixture(scope='module')
def img(tmp_path_factory):
    "Two good shards of 4 images each."
    d = tmp_path_factory.mktemp('img')
    _synth(d)
    return d


@pytest.fixture(scope='module')
def ref(img, tmp_path_factory):
    "The reference output of a random-init CoCa with seed 3."
    out = tmp_path_factory.mktemp('ref')/'r'
    torch.manual_seed(1)  # whatever this process drew before
    reinforce(**TINY, data_root=str(img), out_dir=str(out))
    return out


def test_shards_that_are_not_tars_fail_in_one_line_then_a_fixed_rerun_writes_them(tmp_path):
    d, out = tmp_path/'data', tmp_path/'out'
    d.mkdir()
    for n in ('train-000000.tar', 'train-000001.tar'): (d/n).write_bytes(b'<html>403 Forbidden</html>')
    p = _run('reinforce', *_args(**TINY, data_root=d, out_dir=out))
    line = _one_line(p, 'qclip reinforce: 2 of the 2 shards to reinforce yielded nothing usable and were not written')
    assert "{'shard': 1}" in line, line
    assert _files(out) == []  # no empty side-car, no stats marking it done, no reinforce.yaml, no results.json
    _synth(d)  # the shards fixed, and the corrected rerun asks for 2 captions: neither is refused nor skipped
    res = reinforce_cli(_args(**{**TINY, 'n_captions': 2}, data_root=d, out_dir=out))
    assert res == 0
    r = json.loads((out/'results.json').read_text())
    assert (r['written'], r['captions'], r['shards_this_run'], r['failed_shards']) == (8, 16, 2, [])


def test_one_unreadable_shard_is_left_for_the_rerun(img, tmp_path):
    d, out = tmp_path/'data', tmp_path/'out'
    d.mkdir()
    for p in sorted(img.glob('*.tar')): (d/p.name).write_bytes(p.read_bytes())
    (d/'train-000002.tar').write_bytes(b'\0' * 100)  # cut short: not a tar
    r = reinforce(**TINY, data_root=str(d), out_dir=str(out))  # 1 of 3 shards failed: not more than max_bad_frac
    assert (r['written'], r['failed_shards']) == (8, ['train/train-000002.tar'])
    assert not (out/'train'/'train-000002.tar').exists() and not (out/'train'/'train-000002_stats.json').exists()
    _synth(tmp_path/'more', n=4, seed=5)
    (d/'train-000002.tar').write_bytes((tmp_path/'more'/'train-000000.tar').read_bytes())
    r = reinforce(**TINY, data_root=str(d), out_dir=str(out))
    assert (r['written'], r['shards_this_run'], r['failed_shards']) == (12, 1, [])


def test_every_image_bad_is_one_line(tmp_path):
    d, out = tmp_path/'data', tmp_path/'out'
    src = _synth(tmp_path/'src', n=24, shard_size=24)[0]
    d.mkdir()
    with wds.TarWriter(str(d/'00000.tar')) as w:
        for s in wds.WebDataset(str(src), shardshuffle=False):
            w.write({'__key__': s['__key__'], 'jpg': b'\xff\xd8 not a jpeg', 'txt': s['txt'], 'json': s['json']})
    p = _run('reinforce', *_args(**TINY, data_root=d, out_dir=out))
    line = _one_line(p, 'qclip reinforce: 1 of the 1 shards to reinforce yielded nothing usable')
    assert "'image'" in line, line
    assert _files(out) == []


def test_out_dir_that_is_a_file_is_one_line(img, tmp_path, capsys):
    f = tmp_path/'a_file'; f.write_text('x')
    for out in (f, f/'run'):
        assert reinforce_cli(_args(**TINY, data_root=img, out_dir=out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"qclip reinforce: out_dir={str(out)!r} is not valid: {str(f)!r} is a file, not a folder; "
                       "choose another out_dir"], err
        assert quality_cli(['--sources', 'synth-align', '--scorer-steps', '0', '--out-dir', str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qclip caption-quality: out_dir={str(out)!r} is not valid"), err
    assert f.read_text() == 'x'


def test_killed_before_its_first_sidecar_then_a_corrected_rerun(img, tmp_path):
    "A job killed before it committed anything leaves reinforce.yaml and a temporary file; neither stops the rerun."
    out = tmp_path/'out'
    p = _run('reinforce', *_args(**TINY, data_root=img, out_dir=out),
             env={**ENV, 'QCLIP_REINFORCE_KILL_AT': 'train-000000.tar:0'})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out/'reinforce.yaml').exists() and list((out/'train').glob('.train-000000.tar.*.tmp'))
    r = reinforce(**{**TINY, 'n_captions': 2}, data_root=str(img), out_dir=str(out))  # other parameters: no side-car yet
    assert (r['written'], r['captions']) == (8, 16)
    assert yaml.safe_load((out/'reinforce.yaml').read_text())['n_captions'] == 2
    assert [f for f in _files(out) if f.endswith('.tmp')] == []  # the killed job's temporary file is gone


def test_random_init_coca_is_a_function_of_the_seed(img, ref, tmp_path):
    torch.manual_seed(2)  # another state of the process's generator than the reference saw
    reinforce(**TINY, data_root=str(img), out_dir=str(tmp_path/'again'))
    assert _tars(tmp_path/'again') == _tars(ref)
    reinforce(**{**TINY, 'seed': 4}, data_root=str(img), out_dir=str(tmp_path/'other'))
    assert _tars(tmp_path/'other') != _tars(ref)


def test_random_init_killed_mid_shard_resumes_with_the_same_model(img, ref, tmp_path):
    out = tmp_path/'killed'
    env = {**ENV, 'QCLIP_REINFORCE_KILL_AT': 'train-000001.tar:1', 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    p = _run('reinforce', *_args(**{**TINY, 'batch_size': 1}, data_root=img, out_dir=out), env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert {q.name for q in (out/'train').glob('*.tar')} == {'train-000000.tar'}
    torch.manual_seed(5)
    r = reinforce(**{**TINY, 'batch_size': 1}, data_root=str(img), out_dir=str(out))
    assert r['shards_this_run'] == 1
    reinforce(**{**TINY, 'batch_size': 1}, data_root=str(img), out_dir=str(tmp_path/'whole'))
    assert _tars(out) == _tars(tmp_path/'whole')  # one model throughout: the killed process's and the rerun's


def _second_is_refused(first, out, argv, prefix):
    t0 = time.monotonic()
    while (h := lock_holder(out)) is None:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() - t0 < 300, 'the first job never took the lock'
        time.sleep(0.2)
    try:
        p = _run(*argv)
        line = _one_line(p, prefix)
        assert f"is in use by another job (host {h['host']}, pid {h['pid']}" in line, line
        assert h['pid'] == first.pid and first.poll() is None  # the first job still runs, alone
    finally:
        os.killpg(first.pid, signal.SIGKILL); first.communicate(timeout=60)


def test_two_reinforce_jobs_into_one_folder(tmp_path):
    d, out = tmp_path/'data', tmp_path/'out'
    _synth(d, n=400, shard_size=400)
    argv = ['reinforce', *_args(**{**TINY, 'n_captions': 5, 'seq_len': 30}, data_root=d, out_dir=out)]
    first = subprocess.Popen([str(BIN/'qclip'), *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV, start_new_session=True)
    _second_is_refused(first, out, argv, 'qclip reinforce: out_dir=')


def test_two_caption_quality_jobs_into_one_folder(tmp_path):
    out = tmp_path/'q'
    argv = ['caption-quality', '--sources', 'synth-align', '--n-images', '8', '--synth-n', '64', '--scorer-steps',
            '100000', '--device', 'cpu', '--out-dir', str(out)]  # the first trains its scorer until stopped
    first = subprocess.Popen([str(BIN/'qclip'), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV, start_new_session=True)
    _second_is_refused(first, out, argv, 'qclip caption-quality: out_dir=')


def _png_bomb()->bytes:
    "A tiny PNG that says it is 30000 x 30000 pixels: a decompression bomb."
    b = io.BytesIO(); Image.new('L', (1, 1)).save(b, format='PNG'); raw = bytearray(b.getvalue())
    raw[16:24] = struct.pack('>II', 30000, 30000); raw[29:33] = struct.pack('>I', zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def test_caption_quality_skips_and_counts_bad_samples(tmp_path, monkeypatch, capsys):
    src, d = _synth(tmp_path/'src', n=8, shard_size=8)[0], tmp_path/'qdata'/'datacomp'/'train'
    d.mkdir(parents=True)
    with wds.TarWriter(str(d/'00000.tar')) as w:
        for i, s in enumerate(wds.WebDataset(str(src), shardshuffle=False)):
            s = {k: s[k] for k in ('__key__', 'jpg', 'txt', 'json')}
            if i == 1: s['json'] = b'{"uid": "\xff\xfe"}'   # not UTF-8
            if i == 2: s['jpg'] = s['jpg'][:60]               # a corrupt JPEG
            if i == 3: s['jpg'] = _png_bomb()                 # a decompression bomb
            w.write(s)
    (d/'00001.tar').write_bytes(b'PK\x03\x04 a zip, not a tar')
    monkeypatch.setenv('QCLIP_DATA', str(tmp_path/'qdata'))  # where a real dataset's shards are
    q = tmp_path/'q'
    assert quality_cli(['--sources', 'datacomp', '--scorer-steps', '0', '--device', 'cpu', '--out-dir', str(q)]) == 0
    assert 'datacomp: skipped 4 bad samples/shards (by kind)' in capsys.readouterr().out
    assert json.loads((q/'results.json').read_text())['bad_samples'] == {
        'datacomp': {'image': 2, 'malformed': 1, 'shard': 1}}
    assert len({l.split(',')[1] for l in (q/'captions.csv').read_text().splitlines()[1:]}) == 5  # the 5 good samples
    for f in d.iterdir(): f.write_bytes(b'<html>403 Forbidden</html>')  # no usable sample at all
    q2 = tmp_path/'q2'
    assert quality_cli(['--sources', 'datacomp', '--scorer-steps', '0', '--device', 'cpu', '--out-dir', str(q2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qclip caption-quality: sources='datacomp': no usable sample in its train "
                                               "shards (bad samples/shards by kind: {'shard': 2}"), err
    assert _files(q2) == []  # no empty CSV, no half of a job


def test_reinforce_yaml_without_its_keys_is_one_line(tmp_path, capsys):
    r = tmp_path/'r'; (r/'train').mkdir(parents=True)
    (r/'reinforce.yaml').write_text(yaml.safe_dump(dict(dataset='synth-align', coca='tiny-coca')))
    for flag in ('--sources', '--reinforced'):
        assert quality_cli([flag, str(r), '--scorer-steps', '0', '--out-dir', str(tmp_path/'q')]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"qclip caption-quality: {str(r/'reinforce.yaml')!r} lacks the key(s) data_root, synth_n, "
                       "synth_val, synth_size that qclip reinforce writes; rerun qclip reinforce into that folder"], err
