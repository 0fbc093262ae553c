"Run under torchrun: each rank computes qclip's distributed ClipLoss on its shard and saves value and grads."
import math, sys, torch, torch.distributed as dist, torch.nn.functional as F
from qclip.loss import ClipLoss

def main(out, local_loss, gather_with_grad):
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    B, D = 6 * world, 16
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(2, B, D, generator=g), dim=-1)  # two caption sources
    sl = slice(rank * B // world, (rank + 1) * B // world)
    i, t = img[sl].clone().requires_grad_(), txt[:, sl].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)(i, t, scale)
    loss.backward()
    torch.save({'loss': loss.detach(), 'img_grad': i.grad, 'txt_grad': t.grad, 'rank': rank, 'world': world},
               f'{out}/rank{rank}.pt')
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1], sys.argv[2] == '1', sys.argv[3] == '1')
