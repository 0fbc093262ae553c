"""A real 2-process gloo run of qclip.loss.DistillClipLoss (teacher embeddings gathered like the features) equals the
full batch, and sends each tensor once: the student's features in one all_gather, the teacher's in another."""
import subprocess, sys
from pathlib import Path
import pytest, torch
from qclip.loss import DistillClipLoss
sys.path.insert(0, str(Path(__file__).parent))
from _dist_distill_worker import data

WORLD = 2

@pytest.mark.parametrize('local_loss', [True, False])
def test_two_process_distill_equals_full_batch(tmp_path, local_loss):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}',
           str(Path(__file__).with_name('_dist_distill_worker.py')), str(tmp_path), str(int(local_loss))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path/f'rank{k}.pt', weights_only=True) for k in range(WORLD)]
    img, txt, t_img, t_txt, scale = data(WORLD)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    loss = DistillClipLoss(0.25, 0.75)(img, txt, scale, t_img, t_txt)
    loss.backward()
    if local_loss: torch.testing.assert_close(sum(r['loss'] for r in ranks) / WORLD, loss.detach(), atol=1e-5, rtol=1e-5)
    else:
        for r in ranks: torch.testing.assert_close(r['loss'], loss.detach(), atol=1e-5, rtol=1e-5)
    b = img.shape[0] // WORLD  # gather_with_grad: WORLD x the full-batch gradient (DDP's averaging divides it out)
    for k, r in enumerate(ranks):
        torch.testing.assert_close(r['img_grad'], WORLD * img.grad[k*b:(k+1)*b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r['txt_grad'], WORLD * txt.grad[:, k*b:(k+1)*b], atol=1e-5, rtol=1e-4)
        K, (B, D), Dt = txt.shape[0], img.shape, t_img.shape[1]
        assert r['calls'] == {'all_gather': 2}, r['calls']  # (image + K texts) and (teacher image + K teacher texts)
        assert r['bytes']['all_gather'] == (1 + K) * b * (D + Dt) * 4 * (WORLD - 1)
