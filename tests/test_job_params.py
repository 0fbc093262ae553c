"""A papermill parameter that a job notebook does not have fails the job at once, naming the closest valid one.
papermill itself only warns ("Passed unknown parameter") and the job would train on its defaults."""
import papermill as pm, pytest
from pathlib import Path

NBS = Path(__file__).parents[1]/'nbs'
TYPOS = {'10_pretrain': ('stpes', 'steps'), '20_classification': ('learning_rate', None), '21_segmentation': ('iter', 'iters'),
         '22_detection': ('lables', 'label'), '23_depth': ('max_dept', 'max_depth'), '30_attention': ('num_image', 'num_images'),
         '50_results': ('run_root', 'runs_root')}

@pytest.mark.parametrize('name', sorted(TYPOS))
def test_misspelled_parameter_fails_naming_the_closest(name, tmp_path):
    typo, close = TYPOS[name]
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NBS/f'{name}.ipynb'), str(tmp_path/'out.ipynb'), kernel_name='python3', progress_bar=False,
                            parameters={typo: 1, 'out_dir': str(tmp_path/'run')}, cwd=str(tmp_path))
    msg = str(e.value)
    assert f"unknown parameter(s) '{typo}'" + (f" (did you mean '{close}'?)" if close else '') in msg, msg[-2000:]
    assert not (tmp_path/'run').exists()  # failed before the job touched anything

def _checkers():
    "Each job's parameter checker with its defaults (the mm recipes: the job keys that are numbers)."
    from qclip.train import check_params, PRETRAIN_DEFAULTS
    from qclip.finetune import check_cls_params, CLS_DEFAULTS, check_depth_params, DEPTH_DEFAULTS
    from qclip.probes import check_probe_params, PROBE_DEFAULTS
    from qclip.reinforce import check_reinforce_params, REINFORCE_DEFAULTS
    from qclip.quality import check_quality_params, QUALITY_DEFAULTS
    floats = lambda d, extra=(): [k for k, v in d.items() if isinstance(v, float) or k in extra]
    return {'pretrain': (check_params, floats(PRETRAIN_DEFAULTS)),
            'classification': (check_cls_params, floats(CLS_DEFAULTS, ('lr', 'weight_decay'))),  # None: by mode
            'depth': (check_depth_params, floats(DEPTH_DEFAULTS)),
            'probes': (check_probe_params, floats(PROBE_DEFAULTS)),
            'reinforce': (check_reinforce_params, floats(REINFORCE_DEFAULTS)),
            'caption-quality': (check_quality_params, floats(QUALITY_DEFAULTS))}

@pytest.mark.parametrize('job', ['pretrain', 'classification', 'depth', 'probes', 'reinforce', 'caption-quality'])
def test_every_float_parameter_refuses_nan_and_inf(job):
    "NaN passes every comparison (`nan < 0` is False) and inf is 'positive': each float parameter refuses both by name."
    check, keys = _checkers()[job]
    for k in keys:
        for v in (float('nan'), float('inf')):
            with pytest.raises(ValueError, match=f"^{k}={v!r} is not valid"): check(**{k: v})

def test_mm_recipe_parameters_refuse_nan_and_inf():
    pytest.importorskip('mmcv.ops', reason='needs the OpenMMLab stack: tools/install_mm.sh')
    from qclip.mm import resolve_recipe
    for k in ('lr', 'weight_decay', 'layer_decay', 'drop_path'):
        for v in (float('nan'), float('inf')):
            with pytest.raises(ValueError, match=f"^{k}={v!r} is not valid"): resolve_recipe('upernet-vit-small', **{k: v})
