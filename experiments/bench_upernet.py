"""Time one UperNet training iteration (forward + backward + AdamW step) with qclip's ViT backbone against mmseg's own.

Both models come from the `upernet-vit` recipe of `qclip.mm` (UperNet head + auxiliary FCN head, AdamW with
layer-wise lr decay) and differ only in the backbone and neck:

  qclip   QCLIPViT: the qclip image tower + the ViTDet simple feature pyramid (the recipe; 256 channels per level)
  mmseg   mmseg `VisionTransformer` of the same width, depth, heads, patch and image size + `Feature2Pyramid`
          (deconvolutions to strides 4-32 of the 4 blocks in out_indices, `width` channels per level), as mmseg's
          ViT/MAE UperNet configs do

`--match-channels` also times qclip with `width` channels per pyramid level, so that the UperNet head is the same
layer for layer (the extra cost is then the pyramid's 1x1/3x3 convolutions). Reps are interleaved (q, m, q, m, ...)
after warm-up, so drifts in machine load hit both; medians and the ratio qclip / mmseg are printed (goal <= 1.05).

usage:
  python experiments/bench_upernet.py                     # CPU size: timm vit_small_patch16_224 (384 x 12, 6 heads, /16) at 256 px, head 256
  python experiments/bench_upernet.py --full --device cuda  # the paper's: open_clip ViT-B-16 at 512 px, UperNet 512 channels
"""
import argparse, statistics, time
import torch

import qclip.mm as qm
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmengine.structures import PixelData
from mmengine.optim import build_optim_wrapper


def build(arch, img, head_channels, width=None, mmseg_vit=False, pyramid_channels=None, device='cpu'):
    "UperNet model + optim wrapper of the upernet-vit recipe, with qclip's or mmseg's ViT."
    opts = {'model.backbone.img_size': img, **({'model.backbone.out_channels': pyramid_channels} if pyramid_channels else {})}
    cfg = qm.mm_config('upernet-vit', dataset='synth', synth_n=[16, 8], encoder=arch, drop_path=0.0, cfg_options=opts)
    m = cfg.model
    m.data_preprocessor.size = (img, img)
    m.decode_head.channels, m.auxiliary_head.channels = head_channels, head_channels // 2
    if pyramid_channels: m.decode_head.in_channels, m.auxiliary_head.in_channels = [pyramid_channels] * 4, pyramid_channels
    if mmseg_vit:
        t = MODELS.build(dict(cfg.model.backbone)).encoder.tower  # read the sizes off the qclip tower
        t = getattr(t, 'trunk', t)
        width = t.transformer.width if hasattr(t, 'transformer') else t.embed_dim
        depth = len(t.transformer.resblocks) if hasattr(t, 'transformer') else len(t.blocks)
        heads = (t.transformer.resblocks[0].attn.num_heads if hasattr(t, 'transformer') else t.blocks[0].attn.num_heads)
        patch = (t.patch_size if hasattr(t, 'transformer') else t.patch_embed.patch_size)[0]
        q = depth // 4
        m.backbone = dict(type='VisionTransformer', img_size=(img, img), patch_size=patch, embed_dims=width, num_layers=depth,
                          num_heads=heads, mlp_ratio=4, out_indices=(q - 1, 2 * q - 1, 3 * q - 1, depth - 1), drop_path_rate=0.0,
                          norm_cfg=dict(type='LN', eps=1e-6), final_norm=False, with_cls_token=True)
        m.neck = dict(type='Feature2Pyramid', embed_dim=width, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type='BN', requires_grad=True))
        m.decode_head.in_channels, m.auxiliary_head.in_channels = [width] * 4, width
    model = MODELS.build(m).to(device).train()
    ow = build_optim_wrapper(model, dict(type='OptimWrapper', optimizer=dict(cfg.optim_wrapper.optimizer),
                                         constructor='QCLIPLayerDecayConstructor', paramwise_cfg=dict(cfg.optim_wrapper.paramwise_cfg)))
    return model, ow, sum(p.numel() for p in model.parameters())


def step(model, ow, x, samples):
    "One training iteration: forward, losses, backward, AdamW step."
    losses = model.loss(x, samples)
    loss, _ = model.parse_losses(losses)
    ow.update_params(loss)
    return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--full', action='store_true', help="the paper's size: ViT-B/16 (open_clip ViT-B-16) at 512 px, head 512")
    ap.add_argument('--arch', default=None, help='qclip encoder arch (default vit_small_patch16_224; --full: ViT-B-16)')
    ap.add_argument('--img', type=int, default=None, help='crop size (default 256; --full: 512)')
    ap.add_argument('--head-channels', type=int, default=None, help='UperNet channels (default 256; --full: 512)')
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--match-channels', action='store_true', help='also time qclip with width channels per pyramid level')
    a = ap.parse_args()
    arch = a.arch or ('ViT-B-16' if a.full else 'vit_small_patch16_224')
    img, hc = a.img or (512 if a.full else 256), a.head_channels or (512 if a.full else 256)
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    variants = {'qclip': build(arch, img, hc, device=a.device), 'mmseg': build(arch, img, hc, mmseg_vit=True, device=a.device)}
    if a.match_channels:
        w = variants['mmseg'][0].neck.upsample_4x[0].in_channels
        variants['qclip-matched'] = build(arch, img, hc, pyramid_channels=w, device=a.device)
    x = torch.randn(a.batch, 3, img, img, device=a.device)
    samples = []
    for _ in range(a.batch):
        s = SegDataSample(); s.gt_sem_seg = PixelData(data=torch.randint(0, 9, (1, img, img), device=a.device))
        s.set_metainfo(dict(img_shape=(img, img), ori_shape=(img, img), pad_shape=(img, img))); samples.append(s)
    sync = torch.cuda.synchronize if a.device.startswith('cuda') else (lambda: None)
    times = {k: [] for k in variants}
    for rep in range(a.warmup + a.reps):
        for k, (model, ow, _) in variants.items():
            sync(); t0 = time.perf_counter(); step(model, ow, x, samples); sync()
            if rep >= a.warmup: times[k].append(time.perf_counter() - t0)
    print(f"UperNet train iteration, {arch} at {img} px, batch {a.batch}, head {hc} ch, {a.device}, "
          f"{torch.get_num_threads()} threads, {a.reps} interleaved reps after {a.warmup} warm-up")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, (_, _, n) in variants.items():
        print(f"  {k:14s} median {med[k]*1000:8.1f} ms  (min {min(times[k])*1000:8.1f}, max {max(times[k])*1000:8.1f})  {n/1e6:6.1f} M params")
    print(f"  ratio qclip / mmseg = {med['qclip'] / med['mmseg']:.3f}  (goal <= 1.05)")
    if 'qclip-matched' in med: print(f"  ratio qclip-matched / mmseg = {med['qclip-matched'] / med['mmseg']:.3f}")


if __name__ == '__main__':
    main()
