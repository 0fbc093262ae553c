"""Every experiments/*.yaml is a runnable spec: it loads with each of its profiles, its notebooks exist, and every
parameter it sets is a parameter of that notebook (papermill would only warn and run with the default)."""
from pathlib import Path
import papermill as pm, pytest, yaml
from qclip.jobs import load_experiment, read_spec

ROOT = Path(__file__).parents[1]
SPECS = sorted((ROOT/'experiments').glob('*.yaml'))
_params = {}

def nb_params(nb):
    if nb not in _params: _params[nb] = set(pm.inspect_notebook(str(ROOT/nb)))
    return _params[nb]

@pytest.mark.parametrize('spec', SPECS, ids=[s.stem for s in SPECS])
def test_experiment_spec(spec):
    profiles = [None, *(read_spec(spec).get('profiles') or {})]
    for profile in profiles:
        e = load_experiment(spec, profile)
        assert e['runs'], (spec.name, profile)
        for r in e['runs']:
            assert (ROOT/r['notebook']).is_file(), r['notebook']
            unknown = set(r['params']) - nb_params(r['notebook'])
            assert not unknown, f"{spec.name} [{profile or 'full'}] {r['name']}: {sorted(unknown)} are not parameters of {r['notebook']}"

def test_shared_run_folders_mean_the_same_run():
    "Specs whose profiles share an out_root (Tables 5-8 and Fig. 3 reuse Table 1's small runs) must define every shared "
    "run folder with the same notebook and parameters, or each `qclip run` would redo (and overwrite) the other's runs."
    seen = {}
    for spec in SPECS:
        for profile in [None, *(read_spec(spec).get('profiles') or {})]:
            for r in load_experiment(spec, profile)['runs']:
                key, val = str(Path(r['dir'])), (r['notebook'], r['params'])
                if key in seen:
                    assert seen[key][1] == val, f"{r['dir']}: {seen[key][0]} and {spec.stem} [{profile or 'full'}] define it differently"
                else: seen[key] = (f"{spec.stem} [{profile or 'full'}]", val)
    assert len(seen) > len(SPECS)

def test_every_table_and_figure_has_a_spec():
    names = {s.stem for s in SPECS}
    assert {'table1', 'table2', 'table3', 'table4', 'table5', 'table6', 'table7', 'table8', 'table9', 'table10', 'fig2', 'fig3'} <= names, names
    for s in SPECS:
        if s.stem.startswith(('table', 'fig')):
            assert 'small' in (read_spec(s).get('profiles') or {}), f'{s.name} has no small profile'

def test_sweeps_at_full_scale_one_point_in_the_cpu_and_gpu_profiles():
    "The paper's lr x drop path sweeps (Tables 13-15) are the full-scale grids; the small and gpu profiles run one point, so "
    "make reproduce (Table 1 small: 40 runs) is not slowed by them."
    for spec in SPECS:
        for profile in [p for p in (read_spec(spec).get('profiles') or {}) if p in ('small', 'gpu')]:
            swept = [r['name'] for r in load_experiment(spec, profile)['runs'] if {'lr', 'drop_path'} & set(r['values'])]
            assert not swept, f"{spec.name} [{profile}] sweeps: {swept[:3]}"
    assert len(load_experiment(ROOT/'experiments'/'table1.yaml', 'small')['runs']) == 40  # 4 rows x 5 seeds x (pretraining, probes)
    full = load_experiment(ROOT/'experiments'/'table1.yaml')['runs']
    per = lambda stage: {r['params']['encoder']: 0 for r in full if r['stage'] == stage}
    for stage, n in [('detection', 21), ('segmentation', 15), ('depth', 20)]:
        enc = per(stage)
        for r in full:
            if r['stage'] == stage: enc[r['params']['encoder']] += 1
        assert set(enc.values()) == {n} and len(enc) == 4, (stage, enc)  # ALIGN, DataComp, DataCompDR, OpenAI-WIT

def test_rows_from_elsewhere():
    "Table 3's 12.8B rows are Table 1's pretraining runs (linked, never run again); the OpenAI-WIT rows of Tables 1 and 5-8 "
    "and Table 7's DFN+VeCLIP fine-tune released weights; Table 4 has the 384 px DataCompDR row."
    t1 = {r['name']: r for r in load_experiment(ROOT/'experiments'/'table1.yaml')['runs']}
    t3 = load_experiment(ROOT/'experiments'/'table3.yaml')['runs']
    linked = [r for r in t3 if r.get('linked')]
    assert [r['name'] for r in linked] == ['pretrain_12b/dataset=datacomp,caption_source=gt', 'pretrain_12b/dataset=datacompdr,caption_source=gt+syn']
    for r in linked: assert (r['dir'], r['params']) == (t1['pretrain/' + r['name'].split('/')[1]]['dir'], t1['pretrain/' + r['name'].split('/')[1]]['params'])
    assert sorted(r['params']['steps'] for r in t3 if r['stage'] == 'pretrain') == [31250, 31250, 76294, 76294]  # 2.05B, 5B seen
    ups = {r['params']['encoder'] for r in t3 if r['stage'] == 'depth'}
    assert {str(Path(r['dir']).absolute()) for r in linked} <= ups and len(ups) == 6
    for table, stage in [('table1', 'linear'), ('table1', 'finetune'), ('table5', 'detection'), ('table6', 'cascade'),
                         ('table7', 'segmentation'), ('table8', 'depth')]:
        runs = [r for r in load_experiment(ROOT/'experiments'/f'{table}.yaml')['runs'] if r['stage'] == stage]
        wit = [r for r in runs if r['values'].get('dataset') == 'openai-wit']
        assert wit and all(r['params']['arch'] == 'ViT-B-16' and r['params']['encoder'].endswith('openai-wit.safetensors') for r in wit), table
    assert [r for r in load_experiment(ROOT/'experiments'/'table7.yaml')['runs'] if r['values'].get('dataset') == 'dfn-veclip']
    for profile in ('small', 'gpu'):  # no released weights at those scales
        assert not [r for r in load_experiment(ROOT/'experiments'/'table7.yaml', profile)['runs'] if 'arch' in r['params']]
    t4 = [r for r in load_experiment(ROOT/'experiments'/'table4.yaml')['runs'] if r['stage'] == 'finetune_384']
    assert [(r['values']['dataset'], r['params']['img_size']) for r in t4] == [('datacompdr', 384)]

JOBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if (ROOT/'nbs'/p.name).is_file() and p.name[:1] in '12345')

@pytest.mark.parametrize('nb', JOBS, ids=[p.stem for p in JOBS])
def test_every_parameter_is_visible_to_papermill(nb):
    "papermill drops a parameter whose line holds a second '=' (in its comment, say) from --help-notebook and inspection."
    import re, nbformat
    cells = [c for c in nbformat.read(str(nb), as_version=4).cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    if not cells: pytest.skip('no parameters cell')
    names = {m.group(1) for line in cells[0].source.splitlines() if (m := re.match(r'^(\w+)\s*=', line))}
    assert names == set(pm.inspect_notebook(str(nb))), f'{nb.name}: papermill cannot read {sorted(names - set(pm.inspect_notebook(str(nb))))}'
