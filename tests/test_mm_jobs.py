"""The OpenMMLab half of the dense tasks: every qclip.mm recipe builds through mmseg/mmdet's own Runner and trains an
iteration, the metrics agree with independent references, bad input fails with a clear message, and the job
notebooks 21/22 run under papermill. Skipped when the OpenMMLab stack is not installed (tools/install_mm.sh)."""
import json, os
from pathlib import Path
import numpy as np, pytest, torch, yaml
pytest.importorskip('mmcv.ops', reason='needs the OpenMMLab stack: tools/install_mm.sh')
import papermill as pm
import qclip.mm as qm
from qclip.data.synth import CLASSES, SHAPES

NBS = Path(__file__).parents[1]/'nbs'
SMALL = [r for r in qm.RECIPES if r.endswith('-small')]
TINY = dict(iters=1, batch_size=2, synth_n=[32, 8], workers=0)

def _encoder(recipe): return 'tiny-mci' if 'mci' in recipe else 'tiny-vit'

@pytest.mark.parametrize('recipe', SMALL)
def test_recipe_trains_and_evaluates(recipe, tmp_path):
    "Each recipe's config builds through mm's Runner with a tiny qclip encoder, trains one iteration and evaluates."
    cfg = qm.mm_config(recipe, work_dir=str(tmp_path), encoder=_encoder(recipe), **TINY)
    assert cfg.model.backbone.type == ('QCLIPMCi' if 'mci' in recipe else 'QCLIPViT')
    assert cfg.optim_wrapper.constructor == 'QCLIPLayerDecayConstructor'
    m = qm.run_mm(cfg)
    keys = ['mIoU', 'mAcc', 'aAcc'] if cfg.qclip.task == 'seg' else ['bbox_mAP', 'segm_mAP']
    assert set(keys) <= set(m) and all(np.isfinite(m[k]) for k in keys), m
    assert [r['iter'] for r in qm.mm_losses(tmp_path)] == [1]
    assert (tmp_path/'iter_1.pth').is_file()

def test_iou_metric_matches_numpy():
    "mmseg's IoUMetric against a confusion matrix computed here (ignore label 255, a class absent from the labels)."
    from mmseg.evaluation import IoUMetric
    rng, K = np.random.default_rng(0), len(CLASSES)
    gts = [rng.integers(0, K - 1, (20, 24)) for _ in range(3)]  # class K-1 never in the labels
    preds = [np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, K, g.shape)) for g in gts]
    for g in gts: g[:2] = 255
    metric = IoUMetric(iou_metrics=['mIoU']); metric.dataset_meta = dict(classes=CLASSES)
    metric.process({}, [dict(pred_sem_seg=dict(data=torch.from_numpy(p)[None]), gt_sem_seg=dict(data=torch.from_numpy(g)[None]))
                        for p, g in zip(preds, gts)])
    got = metric.compute_metrics(metric.results)
    conf = np.zeros((K, K))
    for p, g in zip(preds, gts):
        v = g != 255; np.add.at(conf, (g[v], p[v]), 1)  # rows: label, columns: prediction
    tp, label, pred = np.diag(conf), conf.sum(1), conf.sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        iou, acc = tp / (label + pred - tp), tp / label
    ref = dict(aAcc=100 * tp.sum() / conf.sum(), mIoU=100 * np.nanmean(iou), mAcc=100 * np.nanmean(acc))
    for k in ref: assert abs(got[k] - ref[k]) < 0.006, (k, got[k], ref[k])  # mmseg rounds to 2 decimals

def test_coco_metric_matches_pycocotools(tmp_path):
    "mmdet's CocoMetric against pycocotools' COCOeval run directly on the same (perturbed ground-truth) predictions."
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from pycocotools import mask as mask_utils
    ann = qm.synth_coco(32, 8)/'annotations'/'instances_val2017.json'
    coco, rng = COCO(str(ann)), np.random.default_rng(0)
    samples, dets = [], []
    for img_id in coco.getImgIds():
        info = coco.imgs[img_id]; h, w = info['height'], info['width']
        boxes, scores, labels, masks = [], [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) + [None]:  # each object, jittered, plus one false positive
            if a is None: x, y, bw, bh, cat, m = 5., 5., 20., 16., int(rng.integers(1, 9)), np.zeros((h, w), np.uint8)
            else:
                x, y, bw, bh = np.array(a['bbox']) + rng.normal(0, 1.5, 4); cat = a['category_id']; m = coco.annToMask(a)
                m = np.roll(m, int(rng.integers(-1, 2)), axis=1)
            if a is None: m[5:21, 5:25] = 1
            if rng.random() < 0.15: cat = cat % 8 + 1  # some wrong classes
            boxes.append([x, y, x + bw, y + bh]); scores.append(float(rng.random())); labels.append(cat - 1); masks.append(m)
            rle = mask_utils.encode(np.asfortranarray(m)); rle['counts'] = rle['counts'].decode()
            dets.append(dict(image_id=img_id, category_id=cat, bbox=[float(x), float(y), float(bw), float(bh)], score=scores[-1], segmentation=rle))
        samples.append(dict(img_id=img_id, ori_shape=(h, w), pred_instances=dict(
            bboxes=torch.tensor(boxes, dtype=torch.float32), scores=torch.tensor(scores), labels=torch.tensor(labels),
            masks=torch.from_numpy(np.stack(masks)).bool())))
    metric = CocoMetric(ann_file=str(ann), metric=['bbox', 'segm'], outfile_prefix=str(tmp_path/'coco'))
    metric.dataset_meta = dict(classes=tuple(SHAPES))
    metric.process({}, samples)
    got = metric.compute_metrics(metric.results)
    for iou_type in ['bbox', 'segm']:
        dt = coco.loadRes([{k: v for k, v in d.items() if k != ('segmentation' if iou_type == 'bbox' else 'bbox')} for d in dets])
        e = COCOeval(coco, dt, iou_type); e.evaluate(); e.accumulate(); e.summarize()
        for i, k in enumerate(['mAP', 'mAP_50', 'mAP_75']):
            assert abs(got[f'{iou_type}_{k}'] - e.stats[i]) < 6e-4, (iou_type, k, got[f'{iou_type}_{k}'], e.stats[i])
    assert 0.2 < got['bbox_mAP'] < 0.95  # a non-trivial operating point

def test_resume_continues_from_last_checkpoint(tmp_path):
    "A run stopped after its iteration-2 checkpoint resumes there (mmengine checkpoints load on torch >= 2.6)."
    opts = {'default_hooks.checkpoint.interval': 2, 'default_hooks.logger.interval': 1}
    cfg = qm.mm_config('upernet-vit-small', work_dir=str(tmp_path), **{**TINY, 'iters': 4}, cfg_options=opts)
    qm.run_mm(cfg)
    os.remove(tmp_path/'iter_4.pth'); (tmp_path/'last_checkpoint').write_text(str(tmp_path/'iter_2.pth'))
    cfg = qm.mm_config('upernet-vit-small', work_dir=str(tmp_path), resume=True, **{**TINY, 'iters': 4}, cfg_options=opts)
    qm.run_mm(cfg)
    last = sorted(tmp_path.glob('*/vis_data/scalars.json'))[-1]
    assert [json.loads(l)['iter'] for l in last.read_text().splitlines() if 'loss' in l] == [3, 4]

def test_bad_input_gives_clear_messages(tmp_path):
    from qclip.models import create_clip, save_weights
    save_weights(create_clip('tiny-vit'), tmp_path/'model.safetensors')
    with pytest.raises(ValueError, match="checkpoint model.safetensors does not fit arch 'vit-tiny-mae'"):
        qm.mm_config('upernet-vit-small', encoder=str(tmp_path/'model.safetensors'), arch='vit-tiny-mae')
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        qm.mm_config('mask-rcnn-vit-small', encoder=str(tmp_path/'missing.safetensors'))
    with pytest.raises(ValueError, match='QCLIPMCi needs a convolutional'):
        qm.mm_config('semfpn-mci-small', encoder='tiny-vit')
    with pytest.raises(FileNotFoundError, match=f"data_root='{tmp_path}' lacks images/training.*ade20k expects ADEChallengeData2016/"):
        qm.mm_config('upernet-vit', dataset='ade20k', data_root=str(tmp_path), encoder='tiny-vit')
    with pytest.raises(FileNotFoundError, match="data_root='/data/nope' is not a folder; coco expects .*annotations/instances_train2017.json"):
        qm.mm_config('mask-rcnn-vit', data_root='/data/nope', encoder='tiny-vit')

def _run(nb, tmp_path, **params):
    return pm.execute_notebook(str(NBS/nb), str(tmp_path/'out.ipynb'), parameters=params, kernel_name='python3',
                               progress_bar=False, cwd=str(tmp_path))

@pytest.mark.parametrize('nb,keys', [('21_segmentation.ipynb', {'mIoU', 'mAcc', 'aAcc'}),
                                     ('22_detection.ipynb', {'bbox_mAP', 'segm_mAP', 'bbox_mAP_50', 'segm_mAP_50'})])
def test_papermill_job_writes_results(nb, keys, tmp_path):
    out = tmp_path/'run'
    _run(nb, tmp_path, out_dir=str(out), iters=2, batch_size=2, synth_n=[32, 8], device='cpu')
    assert {'params.yaml', 'config.py', 'results.json', 'loss.png', 'work_dir'} <= {p.name for p in out.iterdir()}
    res = json.loads((out/'results.json').read_text())
    assert keys <= set(res) and all(np.isfinite(v) for v in res.values())
    p = yaml.safe_load((out/'params.yaml').read_text())
    assert p['iters'] == 2 and p['encoder'] == 'tiny-vit' and p['dataset'] == 'synth'
    from mmengine.config import Config
    assert Config.fromfile(str(out/'config.py')).train_cfg.max_iters == 2  # the dump is a plain config that loads back

def test_papermill_wrong_task_fails_fast(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="recipe='mask-rcnn-vit-small' is not valid here: it is a detection recipe"):
        _run('21_segmentation.ipynb', tmp_path, recipe='mask-rcnn-vit-small', out_dir=str(tmp_path/'run'))
    assert not (tmp_path/'run'/'work_dir').exists()

class _Payload:
    "A crafted checkpoint object: unpickling it writes a file (any code could run in its place)."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (Path.write_text, (Path(self.path), 'code ran'))

@pytest.mark.parametrize('how', ['resume', 'load_from'])
def test_malicious_checkpoint_never_runs(how, tmp_path):
    "A checkpoint whose pickle carries code is refused on both ways mmengine reads one; the payload's file is never written."
    pwned, wd = tmp_path/'pwned', tmp_path/'work_dir'
    wd.mkdir()
    torch.save({'state_dict': {}, 'meta': {'iter': 1}, 'message_hub': _Payload(pwned)}, wd/'iter_1.pth')
    opts = {}
    if how == 'resume': (wd/'last_checkpoint').write_text(str(wd/'iter_1.pth'))
    else: opts = {'load_from': str(wd/'iter_1.pth')}
    cfg = qm.mm_config('upernet-vit-small', work_dir=str(wd), resume=how == 'resume', cfg_options=opts, **TINY)
    with pytest.raises(Exception, match='refusing to load checkpoint'): qm.run_mm(cfg)
    assert not pwned.exists()

def test_mmengine_checkpoints_still_resume(tmp_path):
    "The allow-list covers what mmengine's Runner writes: a job killed after its checkpoint resumes through dense_job."
    out = tmp_path/'run'
    qm.dense_job('det', 'mask-rcnn-vit-small', out_dir=out, encoder='tiny-vit', device='cpu', **{**TINY, 'iters': 2})
    assert (out/'work_dir'/'iter_2.pth').is_file()
    res = qm.dense_job('det', 'mask-rcnn-vit-small', out_dir=out, encoder='tiny-vit', device='cpu', **{**TINY, 'iters': 3})
    last = sorted((out/'work_dir').glob('*/vis_data/scalars.json'))[-1]
    assert [json.loads(l)['iter'] for l in last.read_text().splitlines() if 'loss' in l] == [3]  # resumed after 2
    assert all(0 <= v <= 100 for k, v in res.items() if 'mAP' in k), res  # mAP in %, as every job reports

def _iters_trained(work_dir):
    "Iterations each Runner run in `work_dir` trained, in order of the runs."
    return [[json.loads(l)['iter'] for l in f.read_text().splitlines() if 'loss' in l]
            for f in sorted(Path(work_dir).glob('*/vis_data/scalars.json'))]

def test_copied_run_folder_resumes_its_own_checkpoint(tmp_path):
    """mmengine's `last_checkpoint` holds an absolute path: a run folder moved elsewhere resumed from the original's
    checkpoint (and failed once that was gone). It resumes from its own copy; a name outside it is never followed."""
    import shutil
    job = dict(task='seg', recipe='upernet-vit-small', encoder='tiny-vit', device='cpu',
               cfg_options={'default_hooks.logger.interval': 1}, **{k: v for k, v in TINY.items() if k != 'iters'})
    qm.dense_job(**job, out_dir=tmp_path/'a', iters=2)
    shutil.copytree(tmp_path/'a', tmp_path/'b'); shutil.rmtree(tmp_path/'a')  # moved: the original is gone
    assert str(tmp_path/'a') in (tmp_path/'b'/'work_dir'/'last_checkpoint').read_text()
    (tmp_path/'b'/'results.json').unlink()
    qm.dense_job(**job, out_dir=tmp_path/'b', iters=3)
    assert _iters_trained(tmp_path/'b'/'work_dir')[-1] == [3]  # resumed after iteration 2, from b's own file
    assert (tmp_path/'b'/'work_dir'/'last_checkpoint').read_text().strip() == str(tmp_path/'b'/'work_dir'/'iter_3.pth')
    # a last_checkpoint naming a file that is not in the run folder is ignored: the run starts from iteration 0
    (tmp_path/'b'/'work_dir'/'last_checkpoint').write_text(str(tmp_path/'elsewhere'/'iter_9.pth'))
    qm.dense_job(**job, out_dir=tmp_path/'b', iters=2)
    assert _iters_trained(tmp_path/'b'/'work_dir')[-1] == [1, 2]

def test_load_from_a_finished_checkpoint_is_one_clear_line(tmp_path):
    """`load_from` a checkpoint already at `iters` (resume=True, the default) trained nothing, wrote results.json, then
    failed on the empty loss log; it is refused in one line before anything is written, naming both ways on."""
    job, log = dict(recipe='upernet-vit-small', encoder='tiny-vit', device='cpu', **{**TINY, 'iters': 2}), \
        {'default_hooks.logger.interval': 1}
    qm.dense_job('seg', **job, out_dir=tmp_path/'a')
    ck = tmp_path/'a'/'work_dir'/'iter_2.pth'
    with pytest.raises(ValueError) as e:
        qm.dense_job('seg', **job, out_dir=tmp_path/'b', cfg_options={'load_from': str(ck), **log})
    assert str(e.value) == (f"load_from='{ck}' is a checkpoint at iteration 2, the end of this schedule (2): resume=True "
                            "would continue it and train nothing; pass resume=False to train from its weights, or a "
                            "longer schedule to continue it")
    assert not (tmp_path/'b'/'results.json').exists()
    res = qm.dense_job('seg', **job, out_dir=tmp_path/'c', cfg_options={'load_from': str(ck), **log}, resume=False)
    assert _iters_trained(tmp_path/'c'/'work_dir') == [[1, 2]] and 'mIoU' in res  # trained from its weights
