"""The docs site, checked without Quarto (which cannot be installed here): nbdev's processing of every notebook (the step
before `quarto render`), a page for every notebook in the sidebar, every local link resolving, and a publish workflow
that builds the site with `nbdev_docs`."""
import fnmatch, json, re, subprocess, sys
from pathlib import Path
import nbformat, pytest, yaml

ROOT = Path(__file__).parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb'))
BIN = Path(sys.executable).parent

def _markdown(nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    return [c.source for c in nb.cells if c.cell_type == 'markdown']

@pytest.fixture(scope='module')
def proc():
    r = subprocess.run([str(BIN/'nbdev_proc_nbs')], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return r

def test_nbdev_processes_every_notebook(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {p.stem for p in (ROOT/'_proc').glob('*.ipynb')} | {p.stem for p in (ROOT/'_proc').glob('*.qmd')}
    assert {p.stem for p in NBS} <= out, {p.stem for p in NBS} - out
    assert (ROOT/'_proc'/'_quarto.yml').exists()

def test_every_notebook_has_a_title_and_a_page_in_the_sidebar():
    q = yaml.safe_load((ROOT/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website'
    patterns = []
    def walk(items):
        for it in items:
            if isinstance(it, str): patterns.append(it)
            elif isinstance(it, dict): walk(it.get('contents', []))
    walk(q['website']['sidebar']['contents'])
    for nb in NBS:
        assert any(fnmatch.fnmatch(nb.name, p) for p in patterns), f'{nb.name} is on no sidebar entry of _quarto.yml'
        md = _markdown(nb)
        assert md and md[0].lstrip().startswith('# '), f'{nb.name}: the first markdown cell must be its title'
    for p in patterns:  # no stale entries
        assert any(fnmatch.fnmatch(nb.name, p) for nb in NBS), f'_quarto.yml sidebar entry {p!r} matches no notebook'
    assert (ROOT/'nbs'/'_quarto.yml').resolve() == (ROOT/'_quarto.yml').resolve()

LINK = re.compile(r'\]\(([^)\s]+)\)')

def test_local_links_resolve():
    bad = []
    sources = [(nb, '\n'.join(_markdown(nb))) for nb in NBS] + [(ROOT/'README.md', (ROOT/'README.md').read_text())]
    for path, text in sources:
        for target in LINK.findall(text):
            if re.match(r'^(https?:|mailto:|#)', target): continue
            t = target.split('#')[0]
            base = path.parent
            cands = [base/t, base/Path(t).with_suffix('.ipynb'), ROOT/t, (ROOT/'nbs'/t).with_suffix('.ipynb')]
            if not any(c.exists() for c in cands): bad.append(f'{path.name}: {target}')
    assert not bad, bad

def test_publish_workflow_builds_the_site_with_nbdev_docs():
    wf = yaml.safe_load((ROOT/'.github'/'workflows'/'deploy.yaml').read_text())
    steps = wf['jobs']['build']['steps']
    runs = ' '.join(s.get('run', '') for s in steps)
    uses = ' '.join(s.get('uses', '') for s in steps)
    assert 'nbdev_docs' in runs and 'make reproduce' in runs and 'quarto-dev/quarto-actions/setup' in uses
    assert 'actions/upload-pages-artifact' in uses and any(s.get('with', {}).get('path') == '_docs' for s in steps)
    nbdev_yml = yaml.safe_load((ROOT/'nbs'/'nbdev.yml').read_text())
    assert nbdev_yml['project']['output-dir'] == '_docs'
