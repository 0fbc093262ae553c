"""JupyterLab tried as a person would: `jupyter lab` serving a copy of nbs/10_pretrain.ipynb, opened in headless chromium,
tiny parameters typed into a new cell below the `parameters` cell, Run > Run All Cells, then the widget progress bar and
the metrics plot checked and screenshotted (to $QCLIP_SCREENSHOTS, else the test's tmp folder: `make lab-test`).
Needs Debian's chromium and chromium-driver and selenium (skipped without them, failed instead under
QCLIP_REQUIRE_BROWSER=1, which CI sets); `pytest -m "not browser"` leaves it out."""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import psutil, pytest
from _browser import REQUIRED, WHY, chromium, marks, require

NB = Path(__file__).parents[1]/'nbs'/'10_pretrain.ipynb'
pytestmark = marks()
webdriver = __import__('selenium.webdriver').webdriver if REQUIRED else pytest.importorskip('selenium.webdriver', reason=WHY)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

# what a person would type below the parameters cell to try the notebook quickly (out_dir is appended)
TINY = ('steps, batch_size, warmup, synth_n, synth_val = 4, 16, 1, 128, 32\n'
        'log_every, eval_every, ckpt_every, workers = 1, 2, 2, 0\n')
# the page's state, read in one go: code-cell prompts ("[3]:", "[*]:", "[ ]:"), stderr outputs, plot images,
# ipywidgets progress bars, and outputs that look like a text progress bar or a widget that failed to render
PROBE = r"""
const q = s => Array.from(document.querySelectorAll(s));
const outs = q('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output');
return {
  prompts: q('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt').map(e => e.textContent.trim()),
  stderr: outs.filter(e => e.dataset.mimeType === 'application/vnd.jupyter.stderr').map(e => e.textContent),
  plots: outs.filter(e => e.querySelector('img')).length,
  bars: outs.filter(e => e.querySelector('.jupyter-widgets .progress-bar')).map(e => e.textContent.replace(/\s+/g, ' ')),
  textbars: outs.map(e => e.textContent).filter(t => /\d+%\|[^|]*\| *\d+\/\d+/.test(t) || /HBox\(|Error displaying widget/.test(t)),
};
"""

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r: return json.loads(r.read())

def _kernel_states(base, token):
    return [s['kernel']['execution_state'] for s in _get(f'{base}/api/sessions?token={token}')]

def _wait(what, cond, timeout, every=1.0):
    t0 = time.monotonic()
    while True:
        if (v := cond()): return v
        if time.monotonic() - t0 > timeout: raise TimeoutError(f'{what}: not within {timeout}s')
        time.sleep(every)

def _start_lab(root, tmp_path):
    "`make lab`'s server (the venv's jupyter, so the python3 kernel is the venv's python) on a free port, token set."
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'jupyter-config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'jupyter-runtime'),
           'JUPYTERLAB_SETTINGS_DIR': str(tmp_path/'lab-settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'lab-workspaces'),
           'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    # no news/update toasts over the screenshots
    s = tmp_path/'lab-settings'/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings'
    s.parent.mkdir(parents=True); s.write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}']
    if os.getuid() == 0: cmd.append('--allow-root')
    log = open(tmp_path/'jupyter-lab.log', 'w')
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    def up():
        assert proc.poll() is None, f'jupyter lab exited: {(tmp_path/"jupyter-lab.log").read_text()[-3000:]}'
        try: return _get(f'{base}/api/status?token={token}')
        except OSError: return None
    try: _wait('jupyter lab serving', up, 120)
    except BaseException:
        _stop_lab(proc, base, token); raise
    return proc, base, token

def _stop_lab(proc, base, token):
    kids = []
    try: kids = psutil.Process(proc.pid).children(recursive=True)  # the kernel runs in a session of its own
    except psutil.Error: pass
    try: urllib.request.urlopen(urllib.request.Request(f'{base}/api/shutdown?token={token}', method='POST'), timeout=10)
    except OSError: pass
    try: proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
    for k in kids:
        try: k.kill()
        except psutil.Error: pass

def test_pretrain_notebook_runs_in_jupyterlab(tmp_path):
    require()
    root = tmp_path/'nbs'; root.mkdir()
    shutil.copy(NB, root/NB.name)  # the repo's notebook is left as it is
    shots = Path(os.environ.get('QCLIP_SCREENSHOTS') or tmp_path/'screenshots'); shots.mkdir(parents=True, exist_ok=True)
    proc, base, token = _start_lab(root, tmp_path)
    driver = None
    try:
        driver = chromium(tmp_path)
        wait = WebDriverWait(driver, 120)
        probe = lambda: driver.execute_script(PROBE)
        driver.get(f'{base}/lab/tree/{NB.name}?token={token}')
        _wait('the notebook kernel idle', lambda: 'idle' in _kernel_states(base, token), 180)
        kernels = [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True) if 'ipykernel_launcher' in c.cmdline()]
        assert kernels and all(k[0] == sys.executable for k in kernels), f'the kernel is not this python ({sys.executable}): {kernels}'
        # the parameters cell: click its prompt (command mode), insert a cell below (B), type the tiny values in it
        cells = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, '.jp-NotebookPanel .jp-CodeCell')
                                      if 'dataset = "synth-datacompdr"' in c.get_attribute('textContent')])
        cells[0].find_element(By.CSS_SELECTOR, '.jp-InputPrompt').click()
        webdriver.ActionChains(driver).send_keys(Keys.ESCAPE).send_keys('b').send_keys(Keys.ENTER).perform()
        active = '.jp-NotebookPanel .jp-Cell.jp-mod-active'
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f'{active} .cm-content:focus')))
        typed = TINY + f'out_dir = "{tmp_path/"run"}"'
        webdriver.ActionChains(driver).send_keys(typed).send_keys(Keys.ESCAPE).perform()
        got = driver.execute_script(
            f"return Array.from(document.querySelectorAll('{active} .cm-line')).map(l => l.textContent).join('\\n')")
        assert got == typed, f'the new cell reads {got!r}'
        # Run > Run All Cells
        wait.until(EC.element_to_be_clickable((By.XPATH, '//div[contains(@class, "lm-MenuBar-itemLabel") and text()="Run"]'))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, '//li[contains(@class, "lm-Menu-item")]'
                                               '[div[contains(@class, "lm-Menu-itemLabel") and text()="Run All Cells"]]'))).click()
        t0 = time.monotonic()
        def done():
            p = probe()
            errors = [t for t in p['stderr'] if 'Traceback' in t or re.search(r'\w+Error\b', t)]
            assert not errors, 'error output:\n' + '\n'.join(errors)[-4000:]
            finished = p['prompts'] and all(re.fullmatch(r'\[\d+\]:', x) for x in p['prompts']) and p['plots']
            return finished and set(_kernel_states(base, token)) == {'idle'} and p
        p = _wait('Run All Cells finished with the metrics plot', done, 300)
        runtime = time.monotonic() - t0
        assert (tmp_path/'run'/'metrics.png').is_file(), 'the run did not write to the typed out_dir'
        assert any(re.search(r'100% 4/4\b', b) for b in p['bars']), \
            f'no finished ipywidgets progress bar (is ipywidgets installed?): widget bars {p["bars"]}, stderr {p["stderr"]}'
        assert not p['textbars'], f'progress bar drawn as text, not a widget: {p["textbars"]}'
        # screenshots: the page at the progress bar, the page at the plot, and the plot alone
        bar = driver.find_element(By.CSS_SELECTOR, '.jp-OutputArea-output .jupyter-widgets .progress')
        driver.execute_script('arguments[0].scrollIntoView({block: "center"})', bar); time.sleep(1)
        driver.save_screenshot(str(shots/'lab-progress.png'))
        img = next(e for e in driver.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output img')
                   if e.get_attribute('naturalWidth') not in (None, '0'))
        driver.execute_script('arguments[0].scrollIntoView({block: "center"})', img); time.sleep(1)
        driver.save_screenshot(str(shots/'lab-plot.png'))
        img.screenshot(str(shots/'plot.png'))
        print(f'\nRun All Cells took {runtime:.0f}s; screenshots in {shots}: lab-progress.png lab-plot.png plot.png')
    except BaseException:
        if driver is not None:
            try: driver.save_screenshot(str(shots/'lab-failure.png')); print(f'\nfailure screenshot: {shots/"lab-failure.png"}')
            except Exception: pass
        print('jupyter lab log tail:\n' + (tmp_path/'jupyter-lab.log').read_text()[-3000:])  # _start_lab wrote it
        raise
    finally:
        if driver is not None: driver.quit()
        _stop_lab(proc, base, token)
