"""The SLURM path through submitit's own local executor: a NotebookJob runs 10_pretrain; a simulated preemption
(SIGUSR2 to the task, what SLURM sends before preempting) checkpoints, requeues, and the requeued job resumes from the
last checkpoint and finishes with an unbroken metrics log. And what `qclip run --slurm` says it will submit: one job
per run, its tasks one process group (not that many copies of the run)."""
import json, os, re, signal, time
from pathlib import Path
import psutil, pytest, submitit
from qclip.jobs import NotebookJob, slurm_executor

ROOT = Path(__file__).parents[1]
PARAMS = dict(steps=12, batch_size=8, warmup=1, log_every=1, eval_every=100, ckpt_every=3, synth_n=256, synth_val=64, workers=0)

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

def test_slurm_dry_run_one_distributed_job_per_run(capsys, tmp_path):
    "Table 1 at the paper's scale: each downstream run is ONE job of 1 node x 8 tasks, one process group of 8."
    from qclip.jobs import main, load_experiment
    assert main(['run', str(ROOT/'experiments'/'table1.yaml'), '--slurm', '--dry-run']) == 0
    out = capsys.readouterr().out
    assert ('finetune: 4 runs, each 1 SLURM job of 1 node x 8 tasks = one process group of 8 (8 GPUs per node); '
            'batch_size 128 per process x 8 = 1024 global') in out, out[:3000]
    assert 'depth: 80 runs, each 1 SLURM job of 1 node x 8 tasks = one process group of 8 (8 GPUs per node); batch_size 3 ' \
           'per process x 8 = 24 global' in out  # Table 15's batch 24
    for stage, n in [('linear', 4), ('detection', 84), ('segmentation', 60)]:  # 3 encoders + OpenAI's, x the paper's sweep
        assert re.search(rf'^{stage}: {n} runs, each 1 SLURM job of 1 node x 8 tasks = one process group of 8 ', out, re.M), stage
    assert 'pretrain: 3 runs, each 1 SLURM job of 16 nodes x 8 tasks = one process group of 128' in out
    runs = re.findall(r'^[a-z]+/\S+: (?:new|stopped|changed|done)', out, re.M)  # one line (one job) per run
    assert len(runs) == 3 + 4 + 4 + 84 + 60 + 80, len(runs)
    # and the executor a run gets asks for exactly that job: 1 node, 8 tasks
    r = next(r for r in load_experiment(ROOT/'experiments'/'table1.yaml')['runs'] if r['stage'] == 'finetune')
    ex = slurm_executor(tmp_path, r['resources'], cluster='local')
    assert {k: ex._executor.parameters[k] for k in ('nodes', 'tasks_per_node', 'gpus_per_node')} == dict(nodes=1, tasks_per_node=8, gpus_per_node=8)
