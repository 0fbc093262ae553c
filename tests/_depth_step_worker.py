"""Run under torchrun: the depth fine-tuning step (DDP, batch norm over the global batch, SiLog summed over the ranks) on
this rank's half of a fixed batch; rank 0 saves the loss and the gradients of the first step."""
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from qclip.heads import load_encoder, DenseEncoder, DepthModel, SiLogLoss
from qclip.distributed import init_distributed, global_batchnorm

def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), torch.rand(n, 1, 64, 64, generator=g) * 8 + 0.5

def model():
    torch.manual_seed(0)
    return DepthModel(DenseEncoder(load_encoder('tiny-vit')), 10.)

def main(out):
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    m = model()
    net = DDP(global_batchnorm(m), find_unused_parameters=True)
    x, g = batch()
    b = len(x) // world
    loss = SiLogLoss(sync=True)(net(x[rank*b:(rank+1)*b]), g[rank*b:(rank+1)*b])
    loss.backward()
    if rank == 0:
        torch.save(dict(loss=loss.item(), grads={n: p.grad for n, p in m.named_parameters() if p.grad is not None},
                        state=m.state_dict()), f'{out}/ddp.pt')
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
