"""The SLURM path through submitit's own local executor: a NotebookJob runs 10_pretrain; a simulated preemption
(SIGUSR2 to the task, what SLURM sends before preempting) checkpoints, requeues, and the requeued job resumes from the
last checkpoint and finishes with an unbroken metrics log."""
import json, os, re, signal, time
from pathlib import Path
import psutil, pytest, submitit
from qclip.jobs import NotebookJob, slurm_executor

ROOT = Path(__file__).parents[1]
PARAMS = dict(steps=12, batch_size=8, warmup=1, log_every=1, eval_every=100, ckpt_every=3, synth_n=256, val_images=64, workers=0)

def test_preempted_job_requeues_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    run = tmp_path/'run'; run.mkdir()
    ex = slurm_executor(tmp_path/'submitit', dict(nproc_per_node=1, time_min=60), cluster='local')
    assert isinstance(ex._executor, submitit.LocalExecutor)
    job = ex.submit(NotebookJob(), str(ROOT/'nbs'/'10_pretrain.ipynb'), str(run), PARAMS)
    deadline = time.time() + 300
    while time.time() < deadline:  # preempt once the first checkpoint (step 3) is written, mid-run
        ck = run/'metrics.jsonl'
        steps = [json.loads(l)['step'] for l in ck.read_text().splitlines()] if ck.exists() else []
        if (run/'checkpoint.pt').exists() and steps and steps[-1] >= 4: break
        assert not job.done(), job.stderr()
        time.sleep(0.1)
    else: pytest.fail('the job never reached its first checkpoint')
    tasks = psutil.Process(job._process.pid).children()  # the controller's child is the task (global rank 0)
    assert len(tasks) == 1
    kernel = tasks[0].children(recursive=True)  # the notebook's kernel: it must not outlive the preempted attempt
    assert kernel
    tasks[0].send_signal(signal.SIGUSR2)
    res = job.result()
    assert res['steps'] == 12
    out = job.stdout() + (job.stderr() or '')
    assert 'this job is preempted' in out and 'Requeued job' in out, out[-3000:]
    assert (run/'attempts'/'notebook.0.ipynb').exists()  # the interrupted attempt's record is kept
    nb = (run/'notebook.ipynb').read_text()
    m = re.search(r'resuming from \S+ at step (\d+)', nb)
    assert m and 3 <= int(m.group(1)) < 12 and int(m.group(1)) % 3 == 0, nb[-3000:]
    assert [json.loads(l)['step'] for l in (run/'metrics.jsonl').read_text().splitlines()] == list(range(1, 13))
    assert not [p for p in kernel if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

def test_qclip_run_slurm_path_then_skip(tmp_path, monkeypatch):
    "`qclip run X.yaml --slurm --cluster local`: one submitit job per run, then nothing left to do."
    import yaml
    from qclip.jobs import main
    monkeypatch.setenv('OMP_NUM_THREADS', '2'); monkeypatch.chdir(tmp_path)
    (tmp_path/'x.yaml').write_text(yaml.safe_dump(dict(notebook=str(ROOT/'nbs'/'10_pretrain.ipynb'), out_root='runs',
        params={**PARAMS, 'steps': 2, 'ckpt_every': 2}, grid={'caption_source': ['gt']}, resources={'time_min': 30})))
    assert main(['run', 'x.yaml', '--slurm', '--cluster', 'local']) == 0
    d = tmp_path/'runs'/'caption_source=gt'
    assert json.loads((d/'results.json').read_text())['steps'] == 2 and (d/'notebook.ipynb').exists()
    assert list((tmp_path/'runs'/'.submitit').glob('*_log.out'))  # submitit's own job logs
    assert main(['run', 'x.yaml', '--slurm', '--cluster', 'local']) == 0  # done: nothing submitted
    assert len(list((tmp_path/'runs'/'.submitit').glob('*_submitted.pkl'))) == 1
