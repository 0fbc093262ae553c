"Each job notebook's parameters cell agrees with its library defaults by value, and every library parameter is settable from it."
import inspect, json
from pathlib import Path
import pytest
from qclip.train import PRETRAIN_DEFAULTS
from qclip.finetune import CLS_DEFAULTS, DEPTH_DEFAULTS
from qclip.probes import PROBE_DEFAULTS
from qclip.transfer import TRANSFER_DEFAULTS
from qclip.quality import QUALITY_DEFAULTS
from qclip.reinforce import REINFORCE_DEFAULTS
from qclip.attention import attention_job

NBS = Path(__file__).parents[1]/'nbs'

def params_cell(name:str)->dict:
    "The values papermill would override: the `parameters`-tagged cell of one of our own notebooks, executed."
    cells = [c for c in json.loads((NBS/name).read_text())['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) == 1, f"{name}: {len(cells)} cells tagged parameters"
    ns = {}; exec(''.join(cells[0]['source']), ns)
    return {k: v for k, v in ns.items() if not k.startswith('__')}

def signature_defaults(f)->dict:
    return {k: p.default for k, p in inspect.signature(f).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}

@pytest.mark.parametrize('name,defaults', [
    ('10_pretrain.ipynb', PRETRAIN_DEFAULTS), ('20_classification.ipynb', CLS_DEFAULTS), ('23_depth.ipynb', DEPTH_DEFAULTS),
    ('24_probes.ipynb', PROBE_DEFAULTS), ('25_transfer.ipynb', TRANSFER_DEFAULTS), ('40_reinforce.ipynb', REINFORCE_DEFAULTS), ('41_caption_quality.ipynb', QUALITY_DEFAULTS),
    ('30_attention.ipynb', signature_defaults(attention_job))])
def test_parameters_cell_is_the_library_defaults(name, defaults):
    cell = params_cell(name)
    assert set(cell) == set(defaults), (name, 'missing', sorted(set(defaults) - set(cell)), 'unknown', sorted(set(cell) - set(defaults)))
    differ = {k: (cell[k], defaults[k]) for k in defaults if cell[k] != defaults[k] or type(cell[k]) is not type(defaults[k])}
    assert not differ, (name, differ)

@pytest.mark.parametrize('name,task', [('21_segmentation.ipynb', 'seg'), ('22_detection.ipynb', 'det')])
def test_dense_parameters_cell_covers_dense_job(name, task):
    pytest.importorskip("mmengine")
    from qclip.mm import JOB_KEYS, dense_job, RECIPES
    cell, sig = params_cell(name), signature_defaults(dense_job)
    keys = set(sig) - {'task'} | set(JOB_KEYS) - ({'label'} if task == 'seg' else set())  # segmentation labels are the classes
    assert set(cell) == keys, (name, 'missing', sorted(keys - set(cell)), 'unknown', sorted(set(cell) - keys))
    assert RECIPES[cell['recipe']]['task'] == task
    for k in ('seed', 'device', 'resume'): assert cell[k] == sig[k], (name, k)
    assert cell['cfg_options'] == {} and sig['cfg_options'] is None  # None means no overrides
    assert all(cell[k] in (None, '') for k in JOB_KEYS if k in cell and k not in ('encoder', 'label')), name  # the recipe's values
