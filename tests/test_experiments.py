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
    assert {'table1', 'table2', 'table3', 'table5', 'table6', 'table7', 'table8', 'table9', 'table10', 'fig2', 'fig3'} <= names, names
    for s in SPECS:
        if s.stem.startswith(('table', 'fig')):
            assert 'small' in (read_spec(s).get('profiles') or {}), f'{s.name} has no small profile'

JOBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if (ROOT/'nbs'/p.name).is_file() and p.name[:1] in '12345')

@pytest.mark.parametrize('nb', JOBS, ids=[p.stem for p in JOBS])
def test_every_parameter_is_visible_to_papermill(nb):
    "papermill drops a parameter whose line holds a second '=' (in its comment, say) from --help-notebook and inspection."
    import re, nbformat
    cells = [c for c in nbformat.read(str(nb), as_version=4).cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
    if not cells: pytest.skip('no parameters cell')
    names = {m.group(1) for line in cells[0].source.splitlines() if (m := re.match(r'^(\w+)\s*=', line))}
    assert names == set(pm.inspect_notebook(str(nb))), f'{nb.name}: papermill cannot read {sorted(names - set(pm.inspect_notebook(str(nb))))}'
