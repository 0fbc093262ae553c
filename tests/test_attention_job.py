"""nbs/30_attention.ipynb under papermill: outputs have the right shape, bad parameters fail at once naming the parameter."""
from pathlib import Path
import pandas as pd, papermill as pm, pytest, yaml
from qclip.models import create_clip, save_weights

NB = Path(__file__).resolve().parents[1] / 'nbs' / '30_attention.ipynb'

def _run(tmp_path, **params):
    out = tmp_path / 'out'
    pm.execute_notebook(str(NB), str(tmp_path / 'run.ipynb'), parameters=dict(out_dir=str(out), **params),
                        kernel_name='python3', cwd=str(tmp_path), progress_bar=False)
    return out

def test_job_outputs(tmp_path):
    run = tmp_path / 'pretrain'  # a fake 10_pretrain output folder
    save_weights(create_clip('tiny-vit'), run / 'model.safetensors')
    (run / 'params.yaml').write_text(yaml.safe_dump(dict(model='tiny-vit')))
    ckpts = [str(run), 'tiny-vit', dict(label='MAE', arch='vit-tiny-mae')]
    out = _run(tmp_path, checkpoints=ckpts, num_images=4, batch_size=3)
    assert (out / 'attention_distance.png').stat().st_size > 10_000
    df = pd.read_csv(out / 'attention_distance.csv')
    assert list(df.columns) == ['model', 'layer', 'head', 'distance']
    assert list(df['model'].unique()) == ['pretrain', 'tiny-vit (random init)', 'MAE']
    for _, g in df.groupby('model'):  # tiny-vit and vit-tiny-mae: 6 layers x 4 heads
        assert len(g) == 24 and sorted(g['layer'].unique()) == list(range(1, 7)) and sorted(g['head'].unique()) == list(range(4))
    assert df['distance'].between(0, 64 * 2**.5).all()  # within the 64 px image
    div = pd.read_csv(out / 'attention_diversity.csv')
    assert len(div) == 3 * 6 and {'model', 'layer', 'std', 'spread'} <= set(div.columns)
    assert yaml.safe_load((out / 'params.yaml').read_text())['num_images'] == 4

@pytest.mark.parametrize('params, msg', [
    (dict(num_images=0), 'num_images=0 is not valid'),
    (dict(checkpoints=['tiny-vit', 'no-such-model']), "checkpoints[1]='no-such-model' is not valid"),
])
def test_bad_parameter(tmp_path, params, msg):
    with pytest.raises(pm.PapermillExecutionError) as e: _run(tmp_path, **params)
    assert msg in str(e.value)
    assert not (tmp_path / 'out' / 'attention_distance.csv').exists()

def test_default_checkpoints(tmp_path):
    "Without `checkpoints` the job analyses the finished 10_pretrain runs under ./runs/pretrain."
    for name in ('a', 'b'):
        run = tmp_path / 'runs' / 'pretrain' / name
        run.mkdir(parents=True); (run / 'params.yaml').write_text(yaml.safe_dump(dict(model='tiny-vit')))
    save_weights(create_clip('tiny-vit'), tmp_path / 'runs' / 'pretrain' / 'a' / 'model.safetensors')  # b is unfinished
    out = _run(tmp_path, num_images=2, batch_size=2)
    df = pd.read_csv(out / 'attention_distance.csv')
    assert list(df['model'].unique()) == ['a'] and len(df) == 24
