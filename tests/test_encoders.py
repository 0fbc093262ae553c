"""The encoder-adapter contract (`qclip.encoders`) for every name in `IMAGE_ENCODERS` and `CLIP_MODELS`, in the style of
timm's `tests/test_models.py::test_model_forward_intermediates`: `feature_info` against the NCHW maps at two input sizes
and against the outputs of hooked blocks, layer ids against references outside qclip (MAE's `get_layer_id_for_vit`,
timm's `group_matcher`), FSDP units, input size, attention modules. Random init; both ViT-B/16 towers run at 64 px."""
import copy, functools
import pytest, timm, torch, torch.nn as nn
from timm.models import group_parameters
from qclip.encoders import adapter
from qclip.models import (CLIP_MODELS, IMAGE_ENCODERS, create_clip, create_image_encoder, feature_maps, is_vit,
                          vit_input_size)
from qclip.heads import layer_ids, set_img_size, pooled_tower
from qclip.distributed import _units

NAMES = [*IMAGE_ENCODERS, *CLIP_MODELS]
FAMILY = {'vit-b-16-mae': 'TimmViT', 'vit-tiny-mae': 'TimmViT', 'mci0': 'TimmStages', 'mci1': 'TimmStages',
          'mci2': 'TimmStages', 'ViT-B-16': 'OpenClipViT', 'tiny-vit': 'OpenClipViT', 'MobileCLIP-S1': 'TimmStages',
          'MobileCLIP-S2': 'TimmStages', 'MCi0-CLIP': 'TimmStages', 'tiny-mci': 'TimmStages',
          'tiny-vit-p16': 'OpenClipViT'}
BIG_VITS = {'ViT-B-16', 'vit-b-16-mae'}  # resampled to 64 px: at 224 px they would cost most of this file's time
SIZES = [(64, 64), (96, 64)]             # square and not, multiples of every patch size and of stride 32

@functools.lru_cache(maxsize=None)
def _built(name):
    torch.manual_seed(0)
    t = create_image_encoder(name).eval()
    if name in BIG_VITS: set_img_size(t, 64)
    return t

def _tower(name): return copy.deepcopy(_built(name))  # tests change towers in place
def _x(size, n=2): return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(0))
def _paths(m): return {id(x): n for n, x in m.named_modules()}

def test_every_registered_name_has_a_family():
    assert set(FAMILY) == set(NAMES), set(NAMES) ^ set(FAMILY)

@pytest.mark.parametrize('name', NAMES)
def test_family_and_blocks(name):
    t = _tower(name); a = adapter(t)
    assert type(a).__name__ == FAMILY[name]
    assert a.module is getattr(t, 'trunk', t)  # an open_clip TimmModel is its timm trunk
    assert a.is_vit == is_vit(t) == (FAMILY[name] != 'TimmStages')
    bs, paths = a.blocks(), _paths(a.module)
    assert len(bs) > 1 and len({id(b) for b in bs}) == len(bs) and all(id(b) in paths for b in bs)
    assert a.num_layers == len(bs)

@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('name', NAMES)
def test_feature_info_matches_the_maps(name, size):
    t = _tower(name); a = adapter(t)
    set_img_size(t, size)
    info = a.feature_info
    with torch.no_grad(): maps = feature_maps(t, _x(size), indices=len(info))
    assert len(maps) == len(info) > 1
    for f, i in zip(maps, info):  # NCHW at the stride feature_info states
        assert tuple(f.shape) == (2, i['num_chs'], size[0] // i['reduction'], size[1] // i['reduction']), (f.shape, i)
        assert torch.isfinite(f).all()
    red = [i['reduction'] for i in info]
    if a.is_vit: assert set(red) == {a.patch_size[0]} and len(info) == len(a.blocks())
    else: assert red == [4, 8, 16, 32]
    with torch.no_grad(): assert feature_maps(t, _x(size), indices=[0])[0].shape == maps[0].shape

@pytest.mark.parametrize('name', NAMES)
def test_maps_are_the_hooked_blocks(name):
    "timm's test: intermediates equal what forward hooks on the blocks (and the modules feature_info names) see."
    t = _tower(name); a = adapter(t); x = _x((64, 64))
    info, bs = a.feature_info, a.blocks()
    fmods = [a.module.get_submodule(i['module']) for i in info]
    last = list(range(len(bs))) if a.is_vit else [bs.index(s.blocks[-1]) for s in a.stages()]  # the block of each map
    if a.is_vit: assert all(m is b for m, b in zip(fmods, bs))
    seen, hs = {}, []
    for k, m in enumerate(bs): hs.append(m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(('b', k), o)))
    for k, m in enumerate(fmods): hs.append(m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(('f', k), o)))
    try:
        with torch.no_grad(): a.forward_features(x)
    finally:
        for h in hs: h.remove()
    with torch.no_grad(): maps = a.forward_intermediates(x)
    assert len(maps) == len(info) == len(last)
    for k, f in enumerate(maps):
        got = [seen['f', k], seen['b', last[k]]]
        if a.is_vit:  # tokens [N, L, C]: drop the prefix tokens, lay the patches out on the grid
            got = [o[:, a.num_prefix_tokens:].transpose(1, 2).reshape(f.shape) for o in got]
        for o in got: torch.testing.assert_close(o, f, rtol=1e-5, atol=1e-6)

def _mae_layer_id(name, num_layers):
    "MAE's util/lr_decay.py get_layer_id_for_vit (num_layers = depth + 1)."
    if name in ['cls_token', 'pos_embed']: return 0
    elif name.startswith('patch_embed'): return 0
    elif name.startswith('blocks'): return int(name.split('.')[1]) + 1
    else: return num_layers

def _reference_ids(a):
    "Layer ids from outside qclip's adapters."
    names, L = [n for n, _ in a.module.named_parameters()], a.num_layers
    if type(a).__name__ == 'TimmViT': return {n: _mae_layer_id(n, L + 1) for n in names}
    if type(a).__name__ == 'TimmStages':  # timm's fine groups: stem, then each block with its stage's downsampling
        g = group_parameters(a.module, a.module.group_matcher(coarse=False))
        ids = {n: i for i, ns in g.items() for n in ns}
        return {n: ids[n] if ids[n] <= L else L + 1 for n in names}  # final_conv: timm's own last group
    stem = ('conv1.', 'class_embedding', 'positional_embedding', 'ln_pre.')  # open_clip ViT, the BEiT/MAE rule
    block = lambda n: int(n.split('.')[2]) + 1 if n.startswith('transformer.resblocks.') else L + 1
    return {n: 0 if n.startswith(stem) else block(n) for n in names}

@pytest.mark.parametrize('name', NAMES)
def test_layer_ids(name):
    t = _tower(name); a = adapter(t); L = a.num_layers
    ids = {n: a.layer_id(n) for n, _ in a.module.named_parameters()}
    assert ids == _reference_ids(a)
    assert set(ids.values()) == set(range(L + 2))  # every layer 0..L+1 holds parameters, nothing outside
    paths = _paths(a.module)
    for i, b in enumerate(a.blocks()):  # monotone over the blocks: block i is layer i + 1
        assert {ids[f'{paths[id(b)]}.{n}'] for n, _ in b.named_parameters()} == {i + 1}
    full, L2 = layer_ids(t)  # the consumer asks the adapter: the same ids under the wrapper's prefix
    pre = 'trunk.' if a.module is not t else ''
    assert L2 == L and len(full) == len(list(t.parameters()))
    assert all(full[pre + n] == v for n, v in ids.items())
    assert all(v == L + 1 for n, v in full.items() if not n.startswith(pre))  # the wrapper's projection head

@pytest.mark.parametrize('name', NAMES)
def test_fsdp_units(name):
    t = _tower(name); a = adapter(t)
    units, bs = a.fsdp_units(), a.blocks()
    assert units and len({id(u) for u in units}) == len(units)
    assert all(any(True for _ in u.parameters()) for u in units)
    allowed = {id(b) for b in bs} | ({id(s) for s in a.stages()} if hasattr(a, 'stages') else set())
    assert all(id(u) in allowed for u in units)  # blocks, or stages of blocks
    assert {id(b) for b in bs if any(True for _ in b.parameters())} <= {id(u) for u in units}
    assert [id(u) for u in _units(t)] == [id(u) for u in units]  # fsdp_wrap asks the adapter

@pytest.mark.parametrize('name', ['tiny-vit', 'tiny-mci'])
def test_fsdp_units_of_a_clip_model(name):
    m = create_clip(name); units = _units(m)
    tower = adapter(m.visual).fsdp_units()
    assert [id(u) for u in units[:len(tower)]] == [id(u) for u in tower]
    path = _paths(m)  # then the text tower's blocks, by their list's name
    assert len(units) > len(tower)
    assert all(path[id(u)].split('.')[0] in ('transformer', 'text') for u in units[len(tower):])

@pytest.mark.parametrize('name', NAMES)
def test_set_img_size(name):
    t = _tower(name); a = adapter(t); new = (96, 64)
    assert set_img_size(t, new) is t
    with torch.no_grad(): y = t(_x(new))  # the whole tower (pooling, projection) runs at the new size
    assert y.shape[0] == 2 and torch.isfinite(y).all()
    if a.is_vit:
        assert a.img_size == vit_input_size(t) == new and not a.dynamic_img_size
        with pytest.raises(ValueError, match='laid out for 96x64 inputs, not 64x64'): feature_maps(t, _x((64, 64)))
    else: assert a.img_size is None and vit_input_size(t) is None and a.dynamic_img_size

@pytest.mark.parametrize('name', NAMES)
def test_attentions(name):
    t = _tower(name); a = adapter(t)
    if not a.is_vit:
        with pytest.raises(TypeError, match='has no per-block attention modules'): a.attentions()
        return
    att = a.attentions()
    assert len(att) == len(a.blocks()) and all(att[i] in list(b.modules()) for i, b in enumerate(a.blocks()))
    assert all(m.num_heads > 1 for m in att)  # attention modules, not some other part of the block
    order, hs = [], [m.register_forward_hook(lambda m, i, o, k=k: order.append(k)) for k, m in enumerate(att)]
    try:
        with torch.no_grad(): t(_x(a.img_size, 1))
    finally:
        for h in hs: h.remove()
    assert order == list(range(len(att)))  # one attention per block, run in block order

@pytest.mark.parametrize('name', NAMES)
def test_pooled(name):
    t = _tower(name); a = adapter(t)
    m, dim = pooled_tower(t)
    assert m is a.module
    with torch.no_grad(): y = m(_x(a.img_size or (64, 64)))
    assert y.shape == (2, dim)

def test_unknown_towers_fail_naming_the_type():
    with pytest.raises(TypeError, match=r'tower=CLIP \(open_clip.model\) is of no known encoder family'):
        adapter(create_clip('tiny-vit'))
    with pytest.raises(TypeError, match='tower=Linear'): adapter(nn.Linear(2, 2))
    assert adapter(nn.Linear(2, 2), missing_ok=True) is None and not is_vit(nn.Linear(2, 2))
    assert type(adapter(timm.create_model('resnet18', pretrained=False, num_classes=0))).__name__ == 'TimmNet'
