"Run under torchrun: each rank computes qclip's distributed DistillClipLoss on its shard and saves value and grads."
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from qclip.loss import DistillClipLoss
from qclip.distributed import CommCounter

def data(world):
    g = torch.Generator().manual_seed(0)
    B, D = 6 * world, 16
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(2, B, D, generator=g), dim=-1)  # two caption sources
    t_img = torch.randn(B, 1536, generator=g)
    t_txt = t_img[None] + 2 * torch.randn(2, B, 1536, generator=g)
    return img, txt, t_img, t_txt, torch.tensor(20.)

def main(out, local_loss):
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    img, txt, t_img, t_txt, scale = data(world)
    B = img.shape[0]
    sl = slice(rank * B // world, (rank + 1) * B // world)
    i, t = img[sl].clone().requires_grad_(), txt[:, sl].clone().requires_grad_()
    with CommCounter() as cc:
        loss_fn = DistillClipLoss(0.25, 0.75, local_loss=local_loss, gather_with_grad=True)
        loss = loss_fn(i, t, scale, t_img[sl], t_txt[:, sl])
    loss.backward()
    torch.save({'loss': loss.detach(), 'img_grad': i.grad, 'txt_grad': t.grad, 'calls': cc.calls, 'bytes': cc.bytes},
               f'{out}/rank{rank}.pt')
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1], sys.argv[2] == '1')
