"""Files qclip did not write in this run, used as a hostile user would (issue 25, part A, items 1 and 8).

Item 1: a path read from a data or state file reaches webdataset's opener only as a local path: a `pipe:` command in a
reinforced folder's reinforce.yaml, in a side-car's stats, or as the name of a shard file never runs.
Item 8: every weights loader refuses a pickle that carries code (and weights it does not read) in one line naming the
parameter and the file, without torch's advice to switch `weights_only` off; the payload never runs."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch, yaml
from qclip.data.synth import write_synth_shards
from qclip.heads import load_encoder
from qclip.models import create_clip, save_weights
from qclip.quality import cli as quality_cli
from qclip.reinforce import cli as reinforce_cli, examples, plot_examples, reinforce
from qclip.train import pretrain

BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
TINY = dict(dataset='datacomp', coca='tiny-coca', coca_train_steps=0, n_captions=1, seq_len=6, batch_size=4,
            device='cpu')


def _args(**kw): return [a for k, v in kw.items() for a in ('--' + k.replace('_', '-'), str(v))]


class _Payload:
    "A pickled object that runs a shell command when unpickled without weights_only."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('untrusted')
    torch.save({'visual.proj': _Payload(d/'pwned')}, d/'evil.pt')  # a "state dict" whose value is code
    np.savez(d/'w.npz', w=np.ones(2))
    save_weights(create_clip('tiny-vit'), d/'clip.safetensors')
    write_synth_shards('synth-align', d/'img', 4, shard_size=4)
    return d


def _refused(msg:str, param:str, path):
    "One line naming the parameter and the file, saying why, without the advice to turn the protection off."
    msg = str(msg)
    assert f"{param}: {str(path)!r} was refused" in msg and 'would run code' in msg, msg
    assert '\n' not in msg.strip() and 'weights_only' not in msg and 'Traceback' not in msg, msg


# ---- item 1: a pipe: URL read from a file never runs

def test_caption_quality_does_not_run_a_pipe_data_root_from_reinforce_yaml(files, tmp_path):
    r, marker = tmp_path/'reinforced', tmp_path/'pwned'  # the URL's last part names a side-car: it is joined and read
    (r/'train').mkdir(parents=True)
    (r/'train'/'train-000000.tar').write_bytes((files/'img'/'train-000000.tar').read_bytes())
    (r/'reinforce.yaml').write_text(yaml.safe_dump(dict(dataset='datacomp', coca='tiny-coca', synth_n=4, synth_val=4,
                                    synth_size=64, data_root=f'pipe:echo pwned >> {marker} #/train-000000.tar')))
    for flag in ('--sources', '--reinforced'):
        p = subprocess.run([str(BIN/'qclip'), 'caption-quality', flag, str(r), '--scorer-steps', '0', '--device', 'cpu',
                            '--out-dir', str(tmp_path/'q')], capture_output=True, text=True, env=ENV, timeout=600)
        assert not marker.exists(), 'the command in reinforce.yaml ran'
        assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines()[-1].startswith(
            f"qclip caption-quality: {str(r/'reinforce.yaml')!r}: data_root='pipe:echo pwned"), p.stderr
    assert not (tmp_path/'q').exists()


def test_examples_do_not_run_a_pipe_source_from_a_stats_file(files, tmp_path):
    out, marker = tmp_path/'r', tmp_path/'pwned'
    reinforce(**TINY, data_root=str(files/'img'), out_dir=str(out))
    assert len(examples(out, k=2)) == 2
    f = out/'train'/'train-000000_stats.json'
    st = json.loads(f.read_text()); st['source'] = f'pipe:echo pwned >> {marker}'; f.write_text(json.dumps(st))
    with pytest.raises(Exception) as e: plot_examples(out, tmp_path/'ex.png', k=2)
    assert not marker.exists(), 'the command in the stats file ran'
    assert isinstance(e.value, ValueError) and '\n' not in str(e.value), e.value
    assert str(e.value).startswith(f"{str(f)!r}: source='pipe:echo pwned") and not (tmp_path/'ex.png').exists()


def test_a_shard_named_like_a_command_is_read_as_a_file(files, tmp_path):
    d = tmp_path/'data'; d.mkdir()
    (d/'00000.tar').write_bytes((files/'img'/'train-000000.tar').read_bytes())
    (d/'pipe:touch pwned #.tar').write_bytes(b'')  # anyone who can write to a data folder can name a file so
    out = tmp_path/'out'
    p = subprocess.run([str(BIN/'qclip'), 'reinforce', *_args(**TINY, data_root='.', out_dir=out)], cwd=d,
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (d/'pwned').exists()  # the command in the name did not run: the file was read, and is no tar
    res = json.loads((out/'results.json').read_text())
    assert (res['written'], res['failed_shards']) == (4, ['train/pipe:touch pwned #.tar'])


# ---- item 8: refused pickles, unsupported weights

def test_encoder_parameter(files):
    with pytest.raises(Exception) as e: load_encoder(files/'evil.pt', 'tiny-vit')
    _refused(str(e.value), 'encoder', files/'evil.pt'); assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match=r"encoder: '.*w\.npz': \.npz weights are not supported"):
        load_encoder(files/'w.npz', 'tiny-vit')
    assert not (files/'pwned').exists()


def test_pretraining_resume(files, tmp_path):
    out = tmp_path/'run'; out.mkdir()
    torch.save({'step': 1, 'params': {}, 'model': {'w': _Payload(files/'pwned')}}, out/'checkpoint.pt')
    with pytest.raises(Exception) as e:
        pretrain(dataset='synth-datacompdr', model='tiny-vit', steps=1, batch_size=4, warmup=1, synth_n=16, synth_val=8,
                 eval_every=10, ckpt_every=1, workers=0, device='cpu', out_dir=str(out))
    _refused(str(e.value), f"out_dir={str(out)!r} (resume)", out/'checkpoint.pt'); assert isinstance(e.value, ValueError)
    assert not (files/'pwned').exists()


@pytest.mark.parametrize('flag', ['coca_weights', 'teachers'])
def test_reinforce_weights(files, tmp_path, capsys, flag):
    w = files/'evil.pt'
    extra = dict(coca_weights=w) if flag == 'coca_weights' else dict(teachers=f'tiny-vit:{w}', n_aug=1)
    assert reinforce_cli(_args(**TINY, data_root=files/'img', out_dir=tmp_path/'r', **extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('qclip reinforce: '), err
    _refused(err[0], flag, w)
    if flag == 'coca_weights':
        assert reinforce_cli(_args(**TINY, data_root=files/'img', out_dir=tmp_path/'r', coca_weights=files/'w.npz')) == 2
        assert '.npz weights are not supported' in capsys.readouterr().err
    assert not (files/'pwned').exists() and not list((tmp_path/'r').rglob('*.tar'))


def test_caption_quality_scorer(files, tmp_path, capsys):
    w = files/'evil.pt'
    assert quality_cli(['--sources', 'synth-align', '--n-images', '4', '--synth-n', '16', '--scorer', f'tiny-vit:{w}',
                        '--device', 'cpu', '--out-dir', str(tmp_path/'q')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('qclip caption-quality: '), err
    _refused(err[0], 'scorer', w)
    assert not (files/'pwned').exists() and not (tmp_path/'q').exists()
