"Run under torchrun: DDP + qclip's distributed ClipLoss + qclip.train.clip_step on this rank's half of a fixed batch."
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from qclip.models import create_clip
from qclip.loss import ClipLoss
from qclip.train import clip_step
from qclip.distributed import init_distributed, all_reduce_mean

def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(1, 49000, (n, 2, 32), generator=g)  # tiny-vit: context 32

def main(out):
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # a different init on each rank: DDP must broadcast rank 0's
    model = create_clip('tiny-vit')
    net = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = batch()
    b = len(x) // world
    losses, grads = [], None
    for i in range(3):
        l = clip_step(net, x[rank*b:(rank+1)*b], t[rank*b:(rank+1)*b], ClipLoss(local_loss=True, gather_with_grad=True), opt, grad_clip=1.)
        losses.append(all_reduce_mean(l))
        if i == 0: grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0: torch.save(dict(losses=losses, grads=grads, state=model.state_dict()), f'{out}/ddp.pt')
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
