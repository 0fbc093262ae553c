"""The OpenMMLab jobs as one job on 2 gloo processes on this CPU, launched as users launch them (`qclip launch` of
nbs/22_detection.ipynb; `dense_job` under `qclip launch`'s QCLIP_NPROC_PER_NODE request): one work dir, one mmengine
log, one set of checkpoints, mmengine's Runner at world size 2, and a global batch of 2 x the per-process batch. A
world size that changes the recipe's global batch (paper Tables 13-14) is refused before anything starts."""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest, yaml
pytest.importorskip('mmcv.ops', reason='needs the OpenMMLab stack: tools/install_mm.sh')
import qclip.mm as qm

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # 2 ranks on 2 cores
# 16 training scenes, 8 test scenes, 6 iterations of 2 images per process: a few seconds of training per rank
TINY = dict(encoder='tiny-vit', iters=6, batch_size=2, synth_n=[16, 8], device='cpu', cfg_options={'default_hooks.logger.interval': 1})

def _one_job(out:Path, iters:int)->str:
    "`out` holds one run: rank 0's files once, one mmengine run (one log), one set of checkpoints, each rank's launcher log; the mmengine log."
    assert {p.name for p in out.iterdir()} == {'params.yaml', 'config.py', 'results.json', 'loss.png', 'work_dir', 'logs'}
    runs = [p for p in (out/'work_dir').iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # both ranks' Runner in one timestamped folder (rank 0's timestamp, broadcast)
    logs = list(runs[0].glob('*.log'))
    assert len(logs) == 1, logs  # mmengine's file log is rank 0's
    assert sorted(p.name for p in (out/'work_dir').glob('*.pth')) == [f'iter_{iters}.pth']
    assert len(list((out/'logs').rglob('stdout.log'))) == 2  # torch elastic: one per rank
    p = yaml.safe_load((out/'params.yaml').read_text())
    assert (p['world_size'], p['global_batch']) == (2, 2 * TINY['batch_size'])
    log = logs[0].read_text()
    assert 'Distributed launcher: pytorch' in log and 'GPU number: 2' in log  # mmengine's Runner saw the group of 2
    assert "Iter(test) [4/4]" in log  # the 8 test scenes split over 2 ranks (mmengine's distributed sampler), gathered on rank 0
    return log

def test_detection_notebook_launch_is_one_job(tmp_path):
    "`qclip launch --nproc-per-node 2` of 22_detection: Mask R-CNN small at its own global batch, 2 x 2 = 4, no lr scaling."
    out = tmp_path/'det'
    params = {**TINY, 'recipe': 'mask-rcnn-vit-small', 'out_dir': str(out), 'synth_n': '[16, 8]',
              'cfg_options': json.dumps(TINY['cfg_options'])}
    cmd = [str(BIN/'qclip'), 'launch', '--nproc-per-node', '2', str(ROOT/'nbs'/'22_detection.ipynb'), str(tmp_path/'out.ipynb'),
           *[a for k, v in params.items() for a in ('-p', k, str(v))]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    log = _one_job(out, 6)
    assert 'LR is set based on' not in log  # the recipe's global batch: lr as given
    # the training sampler gives each rank half of every epoch: 16 scenes = 4 iterations of 2 x 2, so the 6 iterations
    # restart the data once (one process at batch 2 would take 8 iterations per epoch and never restart)
    n = len({a['image_id'] for a in json.loads((qm.synth_coco(16, 8, label='object')/'annotations'/'instances_train2017.json').read_text())['annotations']})
    assert n == 16 and log.count('Reach the end of the dataloader') == 1
    assert set(json.loads((out/'results.json').read_text())) >= {'bbox_mAP', 'segm_mAP'}
    assert not (tmp_path/'.dist_test').exists()  # results gathered over the group, not through the working folder

def test_segmentation_launch_request_is_one_job(tmp_path):
    "`dense_job` under a 2-process launch request: UperNet small at 2 x 2 = 4 instead of its 8, lr scaled by mmengine (scale_lr)."
    out = tmp_path/'seg'
    code = ("import json, qclip.mm as qm; print('RESULT', json.dumps(qm.dense_job('seg', 'upernet-vit-small', out_dir=%r, "
            "scale_lr=True, **%r)))" % (str(out), TINY))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**ENV, 'QCLIP_NPROC_PER_NODE': '2'})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert '2 processes x 2 per process = 4 global (recipe: 1 x 8 = 8)' in r.stdout
    res = json.loads(r.stdout.split('RESULT ')[-1])
    assert res == json.loads((out/'results.json').read_text()) and set(res) == {'mIoU', 'mAcc', 'aAcc'}  # rank 0's, returned
    log = _one_job(out, 6)
    # mmengine's auto_scale_lr: world size x per-process batch against the recipe's global batch
    assert 'LR is set based on batch size of 8 and the current batch size is 4. Scaling the original LR by 0.5.' in log
    assert yaml.safe_load((out/'params.yaml').read_text())['scale_lr'] is True

@pytest.mark.parametrize('recipe,env,msg', [
    ('upernet-vit-small', {'QCLIP_NPROC_PER_NODE': '2'},  # qclip launch --nproc-per-node 2
     "batch_size=2 on 2 processes is a global batch of 4, but the recipe trains at a global batch of 8"),
    ('mask-rcnn-vit', {'RANK': '0', 'WORLD_SIZE': '4', 'LOCAL_RANK': '0'},  # torchrun: Table 13's 16 as 4 x 2
     "batch_size=2 on 4 processes is a global batch of 8, but the recipe trains at a global batch of 16 (2 per process x 8 processes"),
    ('upernet-vit', {'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'},  # one SLURM task: Table 14's 16 as 1 x 2
     "batch_size=2 on 1 process is a global batch of 2, but the recipe trains at a global batch of 16"),
])
def test_world_size_that_changes_the_global_batch_is_refused(recipe, env, msg, tmp_path, monkeypatch):
    for k, v in env.items(): monkeypatch.setenv(k, v)
    task = qm.RECIPES[recipe]['task']
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        qm.dense_job(task, recipe, out_dir=tmp_path/'run', batch_size=None if recipe.endswith('vit') else 2, encoder='tiny-vit')
    assert 'scale_lr=True' in str(e.value) and not (tmp_path/'run').exists()  # refused before the folder or a process
