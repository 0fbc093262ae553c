"""The job notebooks `40_reinforce` and `41_caption_quality` run end to end under papermill (tiny sizes), and the
`qclip reinforce` / `qclip caption-quality` command functions drive the same jobs."""
import json
from pathlib import Path
import papermill as pm, pytest
from papermill.exceptions import PapermillExecutionError
from qclip.quality import cli as quality_cli, load_quality, quality_table
from qclip.reinforce import cli as reinforce_cli

NBS = Path(__file__).parents[1]/'nbs'


@pytest.fixture(scope='module')
def reinforced(tmp_path_factory):
    "40_reinforce: a tiny CoCa trained for 2 steps first, then 2 captions per built-in synth-align image."
    out = tmp_path_factory.mktemp('jobs')/'reinforce'
    pm.execute_notebook(str(NBS/'40_reinforce.ipynb'), str(out.parent/'40.ipynb'), kernel_name='python3', progress_bar=False,
                        parameters=dict(coca_train_steps=2, n_captions=2, seq_len=8, batch_size=8, synth_n=64, synth_val=16,
                                        splits='train,val', write_images=True, device='cpu', out_dir=str(out)))
    return out


def test_reinforce_notebook(reinforced):
    res = json.loads((reinforced/'results.json').read_text())
    assert (res['images'], res['written'], res['captions'], res['bad_samples']) == (80, 80, 160, {})
    assert not res['random_init'] and Path(res['coca_weights']).is_file()  # the CoCa trained in the job
    assert {'reinforce.yaml', 'examples.png', 'coca', 'train', 'val'} <= {p.name for p in reinforced.iterdir()}


def test_caption_quality_notebook(reinforced, tmp_path):
    pm.execute_notebook(str(NBS/'41_caption_quality.ipynb'), str(tmp_path/'41.ipynb'), kernel_name='python3', progress_bar=False,
                        parameters=dict(sources='synth-align', reinforced=str(reinforced), n_images=16, synth_n=64,
                                        scorer_steps=2, device='cpu', out_dir=str(tmp_path/'q')))
    q = quality_table(load_quality(tmp_path))
    assert ('synth-align + tiny-coca', 'gt+syn') in q.index and ('synth-align', 'gt') in q.index
    assert q['clip_score'].notna().all() and (q['captions'] > 0).all()


def test_command_functions(reinforced, tmp_path, capsys):
    assert reinforce_cli(['--coca-weights', json.loads((reinforced/'results.json').read_text())['coca_weights'],
                          '--n-captions', '1', '--decoding', 'top_k', '--top-k', '5', '--seq-len', '8', '--synth-n', '16',
                          '--device', 'cpu', '--out-dir', str(tmp_path/'r')]) == 0
    assert json.loads((tmp_path/'r'/'results.json').read_text())['captions'] == 16
    assert quality_cli(['--sources', 'synth-align', '--reinforced', str(tmp_path/'r'), '--n-images', '8', '--synth-n', '16',
                        '--scorer-steps', '0', '--device', 'cpu', '--out-dir', str(tmp_path/'q')]) == 0
    assert 'synth-align + tiny-coca | syn' in capsys.readouterr().out


@pytest.mark.parametrize('notebook,typo,close', [('40_reinforce', 'n_caption', 'n_captions'),
                                                 ('41_caption_quality', 'n_image', 'n_images')])
def test_misspelled_parameter_fails_before_any_work(tmp_path, notebook, typo, close):
    "papermill -p n_caption 1 must not run with the defaults: the job stops, naming the closest parameter."
    with pytest.raises(PapermillExecutionError) as e:
        pm.execute_notebook(str(NBS/f'{notebook}.ipynb'), str(tmp_path/'out.ipynb'), kernel_name='python3',
                            progress_bar=False, parameters={typo: 1, 'device': 'cpu', 'out_dir': str(tmp_path/'run')})
    assert f"unknown parameter(s) '{typo}' (did you mean '{close}'?)" in e.value.evalue, e.value.evalue
    assert not (tmp_path/'run').exists()


def _strict_json(path):
    "`path` parsed as strict JSON: a bare NaN or Infinity fails."
    def refuse(c): raise ValueError(f'{c} in {path} is not strict JSON')
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_coca_training_stops_when_its_loss_is_not_finite(tmp_path, monkeypatch):
    "A CoCa whose loss goes NaN stops at that step with one line (as pretraining does): no weights, no results.json."
    import pytest, torch
    from open_clip.loss import CoCaLoss
    from qclip.harness import DivergedError
    from qclip.reinforce import train_coca
    nan = lambda self, *a, **k: (torch.tensor(float('nan'), requires_grad=True),) * 2
    monkeypatch.setattr(CoCaLoss, 'forward', nan)
    with pytest.raises(DivergedError, match=r'CoCa training diverged: contrastive_loss=nan, caption_loss=nan at step 1; '
                                            r'stopped, no checkpoint of this run was written'):
        train_coca(steps=2, batch_size=4, warmup=0, synth_n=16, ckpt_every=1, log_every=1, workers=0,
                   out_dir=tmp_path/'coca', device='cpu')
    assert not (tmp_path/'coca'/'results.json').exists() and not (tmp_path/'coca'/'model.safetensors').exists()
    for k, v in [('lr', float('inf')), ('weight_decay', float('nan')), ('grad_clip', -1.)]:  # refused before it starts
        with pytest.raises(ValueError, match=k):
            train_coca(**{k: v}, steps=1, synth_n=16, out_dir=tmp_path/'coca2', device='cpu')


def test_results_json_strict_when_a_measure_is_infinite(tmp_path, monkeypatch):
    "A caption-quality measure that is infinite: results.json still parses as strict JSON, the measure null."
    import qclip.quality as q
    summary = q.quality_summary
    monkeypatch.setattr(q, 'quality_summary', lambda f: summary(f).assign(
        value=lambda d: d['value'].where(d['measure'] != 'words', float('inf'))))
    res = q.caption_quality(sources='synth-align', n_images=8, synth_n=16, scorer_steps=0, device='cpu',
                            out_dir=tmp_path/'q')
    assert res['synth-align | gt']['words'] == float('inf')
    assert _strict_json(tmp_path/'q'/'results.json')['quality']['synth-align | gt']['words'] is None
