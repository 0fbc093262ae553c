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
