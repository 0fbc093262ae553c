"""A real 2-process gloo run of qclip.loss.ClipLoss: it equals the single-process loss on the whole batch and
open_clip's ClipLoss in value and gradients, and sends each feature tensor across processes once."""
import itertools, subprocess, sys
from pathlib import Path
import pytest, torch
from qclip.loss import ClipLoss
sys.path.insert(0, str(Path(__file__).parent))
from _dist_loss_worker import data

WORLD = 2
CONFIGS = list(itertools.product([True, False], [True, False], [1, 2]))  # local_loss, gather_with_grad, K captions

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('dist_loss')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}',
           str(Path(__file__).with_name('_dist_loss_worker.py')), str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(tmp/f'rank{k}.pt', weights_only=True) for k in range(WORLD)]

def _name(impl, c): return f'{impl}-{int(c[0])}{int(c[1])}{c[2]}'

@pytest.mark.parametrize('local_loss,K', [(True, 2), (False, 2), (True, 1)])
def test_two_process_loss_equals_full_batch(ranks, local_loss, K):
    img, txt, scale = data(WORLD, K)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    loss = ClipLoss()(img, txt, scale); loss.backward()
    rs = [r[_name('qclip', (local_loss, True, K))] for r in ranks]
    # local_loss: each rank holds its rows' share, the mean over ranks is the full-batch loss;
    # without it every rank computes the whole loss.
    if local_loss: torch.testing.assert_close(sum(r['loss'] for r in rs) / WORLD, loss.detach(), atol=1e-5, rtol=1e-5)
    else:
        for r in rs: torch.testing.assert_close(r['loss'], loss.detach(), atol=1e-5, rtol=1e-5)
    # gather_with_grad sums every rank's gradient into the local rows: WORLD x the full-batch gradient, which
    # DDP's gradient averaging divides back out.
    b = img.shape[0] // WORLD
    for k, r in enumerate(rs):
        torch.testing.assert_close(r['img_grad'], WORLD * img.grad[k*b:(k+1)*b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r['txt_grad'], WORLD * txt.grad[:, k*b:(k+1)*b], atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize('config', CONFIGS, ids=[f'local{int(a)}-grad{int(b)}-K{c}' for a, b, c in CONFIGS])
def test_equals_open_clip(ranks, config):
    "Value and gradients on every rank are open_clip's ClipLoss (one call per caption source, summed)."
    for r in ranks:
        ours, ref = r[_name('qclip', config)], r[_name('open_clip', config)]
        for k in ('loss', 'img_grad', 'txt_grad'): torch.testing.assert_close(ours[k], ref[k], atol=1e-6, rtol=1e-5)

@pytest.mark.parametrize('config', CONFIGS, ids=[f'local{int(a)}-grad{int(b)}-K{c}' for a, b, c in CONFIGS])
def test_each_tensor_is_sent_once(ranks, config):
    "One all_gather per forward carrying the image and the K text features once; open_clip sends the image K times."
    local_loss, gather_with_grad, K = config
    b, D = 6, 16
    tensor = b * D * 4  # bytes of one rank's [b, D] float32 features
    for r in ranks:
        ours, ref = r[_name('qclip', config)], r[_name('open_clip', config)]
        assert ours['fwd_calls'] == {'all_gather': 1}, ours['fwd_calls']
        assert ours['fwd_bytes']['all_gather'] == (1 + K) * tensor * (WORLD - 1)
        assert ref['fwd_calls'] == {'all_gather': 2 * K}
        assert ref['fwd_bytes']['all_gather'] == 2 * K * tensor * (WORLD - 1)
        # backward: gather_with_grad returns each gathered gradient to its rank (gloo: one scatter per rank), once
        if gather_with_grad:
            assert ours['bwd_calls'] == {'scatter': WORLD}, ours['bwd_calls']
            assert ref['bwd_calls'] == {'scatter': WORLD * 2 * K}
            assert sum(ours['bwd_bytes'].values()) == (1 + K) * tensor * (WORLD - 1)
        else: assert ours['bwd_calls'] == {} and ref['bwd_calls'] == {}
