"A real 2-process gloo run of qclip.loss.ClipLoss equals the single-process loss on the whole batch."
import math, subprocess, sys
from pathlib import Path
import pytest, torch, torch.nn.functional as F
from qclip.loss import ClipLoss

WORLD = 2

def _full_batch(world):
    g = torch.Generator().manual_seed(0)
    B, D = 6 * world, 16
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(2, B, D, generator=g), dim=-1).requires_grad_()
    loss = ClipLoss()(img, txt, torch.tensor(math.log(1 / 0.07)).exp())
    loss.backward()
    return loss.detach(), img.grad, txt.grad

@pytest.mark.parametrize('local_loss', [True, False])
def test_two_process_loss_equals_full_batch(tmp_path, local_loss):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}',
           str(Path(__file__).with_name('_dist_loss_worker.py')), str(tmp_path), str(int(local_loss)), '1']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{k}.pt', weights_only=True) for k in range(WORLD)]
    loss, img_grad, txt_grad = _full_batch(WORLD)
    # local_loss: each rank holds its rows' share, the mean over ranks is the full-batch loss;
    # without it every rank computes the whole loss.
    if local_loss: torch.testing.assert_close(sum(r['loss'] for r in ranks) / WORLD, loss, atol=1e-5, rtol=1e-5)
    else:
        for r in ranks: torch.testing.assert_close(r['loss'], loss, atol=1e-5, rtol=1e-5)
    # gather_with_grad sums every rank's gradient into the local rows: WORLD x the full-batch gradient, which
    # DDP's gradient averaging divides back out.
    b = img_grad.shape[0] // WORLD
    for k, r in enumerate(ranks):
        torch.testing.assert_close(r['img_grad'], WORLD * img_grad[k*b:(k+1)*b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r['txt_grad'], WORLD * txt_grad[:, k*b:(k+1)*b], atol=1e-5, rtol=1e-4)
