"""What the contrastive loss sends between processes per training step, at world sizes 2 and 4 (gloo, this CPU).

For each loss, one forward + backward per rank with `local_loss` and `gather_with_grad` (the paper scripts' setting)
on [b, D] features per rank, counted with `qclip.distributed.CommCounter` (calls and bytes each rank sends, per
collective; with gloo the gradient of an all-gather returns through `world` scatters):

- `open_clip`: `open_clip.loss.ClipLoss`, called once per caption source and summed (what a user would write)
- `qclip before`: qclip's previous `ClipLoss.gather` (open_clip's `gather_features(x, x)` per tensor: each sent twice)
- `qclip`: `qclip.loss.ClipLoss` / `DistillClipLoss` now (image + K captions in one all-gather, each tensor once)

Times are medians of `--reps` steps (gloo over loopback on a shared CPU: a rough guide; the bytes are exact).

    .venv/bin/python experiments/bench_loss_comm.py                      # b=256, D=512 (ViT-B/16), worlds 2 and 4
    .venv/bin/python experiments/bench_loss_comm.py --worlds 2 --batch 64 --reps 3

Measured (b=256, D=512, teacher 1536; MiB each rank sends per step, forward + backward; collective calls):

    world  loss            K=1: calls  MiB    K=2: calls  MiB
      2    open_clip             6    2.00         12    4.00
      2    qclip before          8    3.00         12    4.50
      2    qclip                 3    2.00          3    3.00
      2    distill before       12    9.00         18   13.50
      2    distill qclip         4    5.00          4    7.50
      4    open_clip            10    6.00         20   12.00
      4    qclip before         12    9.00         18   13.50
      4    qclip                 5    6.00          5    9.00
      4    distill before       16   27.00         24   40.50
      4    distill qclip         6   15.00          6   22.50
"""
import argparse, json, math, statistics, sys, time
from pathlib import Path
import torch, torch.nn.functional as F, torch.distributed as dist

def _losses(dt:int):
    import open_clip.loss
    from open_clip.loss import gather_features
    from qclip.loss import ClipLoss, DistillClipLoss

    class Before(ClipLoss):  # the previous implementation, for reference
        def gather_many(self, xs):
            if self.world_size == 1: return list(xs)
            return [gather_features(x, x, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                    rank=self.rank, world_size=self.world_size)[0] for x in xs]
    class DistillBefore(DistillClipLoss): gather_many = Before.gather_many

    kw = dict(local_loss=True, gather_with_grad=True)
    def open_clip_k(img, txt, scale, *teacher):
        ref = open_clip.loss.ClipLoss(rank=dist.get_rank(), world_size=dist.get_world_size(), **kw)
        return sum(ref(img, t, scale) for t in txt)
    return {'open_clip': open_clip_k, 'qclip before': Before(**kw), 'qclip': ClipLoss(**kw),
            'distill before': DistillBefore(0.25, 0.75, teacher_dims=(dt // 2, dt - dt // 2), **kw),
            'distill qclip': DistillClipLoss(0.25, 0.75, teacher_dims=(dt // 2, dt - dt // 2), **kw)}

def measure(batch:int, dim:int, teacher_dim:int, reps:int)->dict:
    "On every rank: calls, bytes and time per step of each loss, for K = 1 and 2 caption sources."
    from qclip.distributed import CommCounter
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    out = {}
    for name, loss_fn in _losses(teacher_dim).items():
        for K in (1, 2):
            img = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
            txt = F.normalize(torch.randn(K, batch, dim), dim=-1).requires_grad_()
            teacher = (torch.randn(batch, teacher_dim), torch.randn(K, batch, teacher_dim)) if 'distill' in name else ()
            scale = torch.tensor(math.log(1 / 0.07)).exp()
            times = []
            for r in range(reps + 1):
                dist.barrier(); t0 = time.perf_counter()
                with CommCounter() as cc:
                    loss = loss_fn(img, txt, scale, *teacher)
                    loss.backward()
                if r: times.append(time.perf_counter() - t0)  # the first is a warm-up
                img.grad = txt.grad = None
            out[f'{name}|{K}'] = dict(calls=cc.calls, bytes=cc.bytes, total_bytes=cc.total_bytes,
                                      calls_total=sum(cc.calls.values()), time_s=statistics.median(times))
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--worlds', type=int, nargs='+', default=[2, 4])
    ap.add_argument('--batch', type=int, default=256, help='rows per rank')
    ap.add_argument('--dim', type=int, default=512)
    ap.add_argument('--teacher-dim', type=int, default=1536, help="DataCompDR's stored teacher embeddings (2 x 768)")
    ap.add_argument('--reps', type=int, default=5); ap.add_argument('--out', default='')
    a = ap.parse_args()
    from qclip.distributed import launch
    rows = []
    print(f'per rank: [{a.batch}, {a.dim}] float32 features ({a.batch * a.dim * 4 / 2**20:.2f} MiB each), '
          f'teacher [{a.batch}, {a.teacher_dim}]; local_loss + gather_with_grad; one forward + backward')
    print(f"{'world':>5} {'loss':<16}{'K':>2} {'calls fwd+bwd':>14} {'MiB sent':>9} {'vs open_clip':>13} "
          f"{'ms/step':>8}")
    for W in a.worlds:
        res = launch(measure, dict(batch=a.batch, dim=a.dim, teacher_dim=a.teacher_dim, reps=a.reps), nproc_per_node=W)
        for key, r in res.items():
            name, K = key.split('|')
            ref = res.get(f'open_clip|{K}')
            rows.append(dict(world=W, loss=name, K=int(K), **r))
            rel = f"{r['total_bytes'] / ref['total_bytes']:.2f}x" if ref and 'distill' not in name else '-'
            print(f"{W:>5} {name:<16}{K:>2} {r['calls_total']:>14} {r['total_bytes'] / 2**20:>9.2f} {rel:>13} "
                  f"{1e3 * r['time_s']:>8.1f}  {r['calls']}")
    if a.out: Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))

if __name__ == '__main__': main()
