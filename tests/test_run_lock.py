"""One job per run folder (`qclip.core.run_lock`): a second papermill run into the folder of a running one fails at
once naming the holder, and a second `qclip run` of the same spec skips the run the first is doing."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import yaml
from qclip.core import lock_holder

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
NB = ROOT/'nbs'/'10_pretrain.ipynb'
# a first job that trains until the test stops it, so that a second one surely starts while it runs
LONG = dict(steps=100_000, batch_size=16, warmup=2, log_every=5, eval_every=150, ckpt_every=50, synth_n=256, synth_val=64, workers=0)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

def _wait_for_holder(d:Path, proc, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (h := lock_holder(d)) is not None: return h
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f'no job took the lock on {d}')

def _papermill(tmp_path, name, out, **params):
    args = [str(BIN/'papermill'), str(NB), str(tmp_path/name), '-p', 'out_dir', str(out)]
    for k, v in params.items(): args += ['-p', k, str(v)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)

def _stop(proc):
    "SIGKILL the job's whole process group (papermill or qclip run, and the kernel it started)."
    os.killpg(proc.pid, signal.SIGKILL); proc.communicate(timeout=60)

def test_second_papermill_run_into_a_busy_folder_is_refused(tmp_path):
    out = tmp_path/'run'
    first = _papermill(tmp_path, 'a.ipynb', out, **LONG)
    h = _wait_for_holder(out, first)
    second = _papermill(tmp_path, 'b.ipynb', out, **LONG)
    _, err = second.communicate(timeout=300)
    assert second.returncode != 0
    assert f"is in use by another job (host {h['host']}, pid {h['pid']}" in err, err[-3000:]
    assert first.poll() is None, 'the first job must still be training when the second is refused'
    time.sleep(2); _stop(first)
    steps = [json.loads(l)['step'] for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert steps and steps == sorted(set(steps))  # one writer: no interleaved rows
    assert not (tmp_path/'b.ipynb').exists() or 'resuming from' not in (tmp_path/'b.ipynb').read_text()
    t0 = time.monotonic()
    while lock_holder(out) is not None and time.monotonic() - t0 < 30: time.sleep(0.2)  # the killed job's lock goes with it
    assert lock_holder(out) is None

def test_second_qclip_run_skips_the_busy_run(tmp_path):
    spec = dict(notebook=str(NB), out_root='runs/busy', params=LONG, grid=dict(seed=[0]))
    (tmp_path/'busy.yaml').write_text(yaml.safe_dump(spec))
    run = lambda: subprocess.Popen([str(BIN/'qclip'), 'run', 'busy.yaml'], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    first = run()
    d = tmp_path/'runs'/'busy'/'seed=0'
    h = _wait_for_holder(d, first)
    assert h['pid'] == first.pid  # `qclip run` holds the folder for the run; its kernel runs inside that lock
    t0 = time.monotonic()
    second = run()
    out2, err2 = second.communicate(timeout=120)
    assert second.returncode == 0, out2 + err2
    assert f"seed=0: in use by another job (host {h['host']}, pid {h['pid']}): skipped" in out2, out2
    assert json.loads(out2[out2.index('{'):]) == {'seed=0': 'locked'} and time.monotonic() - t0 < 60
    assert first.poll() is None
    _stop(first)
    assert not (d/'attempts').exists()  # ran once: no second attempt moved the first one's notebook aside
