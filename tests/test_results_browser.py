"""The results page as a reader gets it: nbs/50_results.ipynb run by papermill over a small set of finished runs, rendered
to HTML by `jupyter nbconvert --to html`, opened in headless chromium: no error output, and its figures there, loaded
and drawn at a readable size. A screenshot of the page at its first result figure (the first after the injected
parameters: the cells above are the library's own tests) goes to $QCLIP_SCREENSHOTS (else runs/screenshots). Needs Debian's chromium and chromium-driver (see tests/_browser.py)."""
import json, os, subprocess, sys
from pathlib import Path
import papermill as pm, pytest, yaml
from _browser import chromium, marks, require

ROOT = Path(__file__).parents[1]
pytestmark = marks()
# every image on the page: loaded (naturalWidth), and its drawn size
IMAGES = """return Array.from(document.images).map(i => {
  const r = i.getBoundingClientRect();
  return {complete: i.complete, natural: [i.naturalWidth, i.naturalHeight], drawn: [r.width, r.height]};
});"""

def _finished_runs(root:Path):
    "Finished pretraining and probe runs as `qclip run` leaves them: 3 caption qualities and random init, 3 seeds."
    def run(stage, name, params, results, encoder=None):
        d = root/'table1-small'/stage/name; d.mkdir(parents=True)
        (d/'run.yaml').write_text(yaml.safe_dump(dict(notebook=f'nbs/{stage}.ipynb', params={**params, **({'encoder': str(encoder)} if encoder else {})})))
        if stage == 'pretrain': (d/'params.yaml').write_text(yaml.safe_dump(params))
        (d/'results.json').write_text(json.dumps(results))
        return d
    for seed, s in [(0, 0.), (1, 2.), (2, -1.)]:
        for q, ds in enumerate(['synth-align', 'synth-datacomp', 'synth-datacompdr', None]):
            params = dict(dataset=ds, seed=seed) if ds else dict(dataset='synth-datacompdr', steps=0, seed=seed)
            pre = run('pretrain', f'dataset={ds},seed={seed}' if ds else f'steps=0,seed={seed}', params, dict(steps=10 if ds else 0))
            gain = 3. * q + 10 if ds else 0.
            run('probes', pre.name, {}, dict(linear_object=30. + gain + s, zeroshot_object=5. + gain / 2 + s, seg_mIoU=20. + gain / 3 + s,
                                              depth_rmse=1.5 - gain / 50, box_AP=2. + gain / 10 + s / 5), pre)

def test_results_page_renders_its_figures(tmp_path):
    require()
    runs, out = tmp_path/'runs', tmp_path/'results'
    _finished_runs(runs)
    page = tmp_path/'50_results.ipynb'
    nb = pm.execute_notebook(str(ROOT/'nbs'/'50_results.ipynb'), str(page), parameters=dict(runs_root=str(runs), out_dir=str(out)),
                             kernel_name='python3', progress_bar=False)
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outs if o.output_type == 'error'], 'error output on the page'
    assert not [o for o in outs if o.get('name') == 'stderr' and 'Traceback' in o.get('text', '')]
    pngs = sum('image/png' in o.get('data', {}) for o in outs)
    assert pngs >= 1, 'the page drew no figure'
    r = subprocess.run([str(Path(sys.executable).with_name('jupyter')), 'nbconvert', '--to', 'html', str(page)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    html = page.with_suffix('.html')
    shots = Path(os.environ.get('QCLIP_SCREENSHOTS') or ROOT/'runs'/'screenshots'); shots.mkdir(parents=True, exist_ok=True)
    driver = chromium(tmp_path)
    try:
        driver.set_page_load_timeout(120)
        driver.get(html.as_uri())
        width = driver.execute_script('return document.documentElement.clientWidth')
        imgs = driver.execute_script(IMAGES)
        assert len(imgs) == pngs, (len(imgs), pngs)  # every figure of the notebook is on the page
        for i in imgs:
            assert i['complete'] and min(i['natural']) > 0, f'a figure did not load: {i}'
            assert 300 <= i['drawn'][0] <= width and i['drawn'][1] >= 100, f'a figure drawn at an unreadable size: {i} (page {width} px)'
        errors = driver.execute_script("return Array.from(document.querySelectorAll("
                                       "'[data-mime-type=\"application/vnd.jupyter.stderr\"], .jp-RenderedText.jp-mod-error'))"
                                       ".map(e => e.textContent).filter(t => /Traceback|Error/.test(t))")
        assert not errors, errors
        first = driver.execute_script("const p = document.querySelector('.celltag_injected-parameters');"
                                      "return Array.from(document.images).find(i => p.compareDocumentPosition(i) & 4);")
        assert first is not None, 'no figure among the results'
        driver.execute_script('arguments[0].scrollIntoView({block: "start"})', first)
        driver.save_screenshot(str(shots/'results-page.png'))
        print(f'\n{len(imgs)} figures, drawn at {[round(i["drawn"][0]) for i in imgs]} px of {width}; '
              f'screenshot: {shots/"results-page.png"}')
    finally:
        driver.quit()
