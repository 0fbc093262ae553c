"""Run under torchrun: each rank computes qclip's distributed ClipLoss on its shard, and open_clip's ClipLoss (one
call per caption source, summed) on the same shard; saves values, gradients and what each sent (`CommCounter`)."""
import itertools, math, sys, torch, torch.distributed as dist, torch.nn.functional as F
import open_clip.loss
from qclip.loss import ClipLoss
from qclip.distributed import CommCounter

def data(world, K):
    g = torch.Generator().manual_seed(0)
    B, D = 6 * world, 16
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(K, B, D, generator=g), dim=-1)  # K caption sources
    return img, txt, torch.tensor(math.log(1 / 0.07)).exp()

def run(impl, img, txt, scale, local_loss, gather_with_grad, rank, world):
    B = img.shape[0]
    sl = slice(rank * B // world, (rank + 1) * B // world)
    i, t = img[sl].clone().requires_grad_(), txt[:, sl].clone().requires_grad_()
    with CommCounter() as fwd:
        if impl == 'qclip': loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)(i, t, scale)
        else:
            ref = open_clip.loss.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                          world_size=world)
            loss = sum(ref(i, t[k], scale) for k in range(len(t)))
    with CommCounter() as bwd: loss.backward()
    return dict(loss=loss.detach(), img_grad=i.grad, txt_grad=t.grad, fwd_calls=fwd.calls, fwd_bytes=fwd.bytes,
                bwd_calls=bwd.calls, bwd_bytes=bwd.bytes)

def main(out):
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {}
    for local_loss, gather_with_grad, K in itertools.product([True, False], [True, False], [1, 2]):
        img, txt, scale = data(world, K)
        for impl in ('qclip', 'open_clip'):
            res[f'{impl}-{int(local_loss)}{int(gather_with_grad)}{K}'] = run(impl, img, txt, scale, local_loss,
                                                                              gather_with_grad, rank, world)
    torch.save(res, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
