"""The timm `Eva` families (DINOv3, PE-Core, PE-Spatial) and `siglip`: shards written by the installed command equal
timm's own `forward_intermediates`, labels equal an independent majority vote, metadata reads as saev's `Metadata`, and
the stream rebuilt through later blocks (rotary embedding, registers) equals the recorded later layer."""
import base64, dataclasses, hashlib, json, pickle, typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saev_nb.data import SegFolderConfig, tiny_dataset
from saev_nb.models import ModelError, load_vit
from saev_nb.probe import LinearProbes
from saev_nb.shards import Metadata, load_shard_info, open_labels, open_shard, validate_shards

from helpers import cli, cli_fails, cli_in_process_fails

EVA = {'dinov3': ('vit_small_patch16_dinov3', 112), 'pe-core': ('vit_pe_core_tiny_patch16_384', 128),
       'pe-spatial': ('vit_pe_spatial_tiny_patch16_512', 128)}


@pytest.fixture(scope='module')
def seg_root(): return tiny_dataset(n_train=12, n_val=6, n_classes=4)


def moved_weights(dpath: Path, name: str, side: int, seed: int = 7) -> Path:
    "A weights file of `name`: its random init plus Gaussian noise, so nothing equals the library's initialisation."
    import timm
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=0, img_size=side)
    sd = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    fpath = dpath / f'{name}.pt'
    torch.save(sd, fpath)
    return fpath


def all_acts(dpath):
    md = Metadata.load(dpath)
    return np.concatenate([np.asarray(open_shard(dpath, i, md))[:d['n_examples']]
                           for i, d in enumerate(load_shard_info(dpath))])


def majority_labels(root: Path, split: str, side: int, patch: int) -> np.ndarray:
    "Independent labels: shorter side resized to `side` (nearest), centre crop, then a per-patch bincount argmax."
    out = []
    for f in sorted((root / 'annotations' / split).iterdir()):
        im = Image.open(f)
        w, h = im.size
        nw, nh = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        lab = np.array(im.resize((nw, nh), Image.NEAREST), dtype=np.int64)
        top, left = int(round((nh - side) / 2)), int(round((nw - side) / 2))
        lab = lab[top:top + side, left:left + side]
        out.append([np.bincount(lab[r:r + patch, c:c + patch].ravel()).argmax()
                    for r in range(0, side, patch) for c in range(0, side, patch)])
    return np.array(out, dtype=np.uint8)


def record_cli(root, shards_root, family, ckpt, side, layers, split='training', *extra):
    r = cli('shards', '--shards-root', shards_root, '--family', family, '--ckpt', ckpt, '--img-size', side,
            '--layers', *layers, '--batch-size', 5, '--n-workers', 0, *extra,
            'data:img-seg-folder', '--data.root', root, '--data.split', split, env={'TQDM_DISABLE': '1'})
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('family', list(EVA))
def test_eva_shards_equal_forward_intermediates(seg_root, tmp_path, family):
    name, side = EVA[family]
    ckpt = f'{name}/{moved_weights(tmp_path, name, side)}'
    d = record_cli(seg_root, tmp_path / 'shards', family, ckpt, side, [1, -1])
    md = validate_shards(d)
    vit = load_vit(family, ckpt, img_size=side)
    grid = side // 16
    assert (md.family, md.layers, md.content_tokens_per_example, md.d_model) == (family, (1, 11), grid ** 2, vit.d_model)
    with torch.inference_mode():  # the file's weights are not the library's random init
        x = torch.randn(1, 3, side, side)
        assert not torch.allclose(vit.model.forward_features(x),
                                  load_vit(family, f'{name}/random', img_size=side).model.forward_features(x))
    from saev_nb.data import make_dataset
    ds = make_dataset(SegFolderConfig(root=seg_root), vit.img_transform, vit.seg_transform)
    x = torch.stack([ds[i]['image'] for i in range(len(ds))])
    with torch.inference_mode():
        inter = vit.trunk.forward_intermediates(x, indices=[1, 11], norm=False, output_fmt='NLC',
                                                return_prefix_tokens=True, intermediates_only=True)
    want = torch.stack([torch.cat([pre[:, :1], pat], 1) for pat, pre in inter], 1).numpy()  # CLS, registers dropped
    got = all_acts(d)
    assert got.shape == want.shape == (12, 2, 1 + grid ** 2, vit.d_model)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    for l in range(2): assert np.linalg.norm(got[:, l] - want[:, l]) / np.linalg.norm(want[:, l]) < 1e-4
    np.testing.assert_array_equal(open_labels(d), majority_labels(seg_root, 'training', side, 16))


def test_dinov3_metadata_decodes_as_saev_metadata(dinov3_stream):
    "saev's `Metadata(**json)` (frozen kw_only dataclass, family a Literal) and its hash rule, without saev installed."
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class SaevMetadata:  # src/saev/data/shards.py at 3d73f1f, field for field
        family: typing.Literal['bird-mae', 'clip', 'dinov2', 'dinov3', 'fake-clip', 'pe-core', 'pe-spatial', 'siglip']
        ckpt: str
        layers: tuple[int, ...]
        content_tokens_per_example: int
        cls_token: bool
        d_model: int
        n_examples: int
        max_tokens_per_shard: int
        data: str
        dataset: Path
        pixel_agg: typing.Literal['majority', 'prefer-fg'] = 'majority'
        dtype: typing.Literal['float32'] = 'float32'
        protocol: typing.Literal['1.0.0', '2.1'] = '2.1'
        def __post_init__(self):
            for f in dataclasses.fields(self):
                if typing.get_origin(f.type) is typing.Literal:
                    assert getattr(self, f.name) in typing.get_args(f.type), (f.name, getattr(self, f.name))
    vit, _, d = dinov3_stream
    raw = json.loads((d / 'metadata.json').read_text())
    md = SaevMetadata(**{**raw, 'layers': tuple(raw['layers']), 'dataset': Path(raw['dataset'])})
    assert (md.family, md.ckpt, md.layers, md.content_tokens_per_example, md.cls_token, md.d_model, md.n_examples) == \
        ('dinov3', vit.ckpt, (1, 3), 49, True, 384, 6)
    assert list(raw) == [f.name for f in dataclasses.fields(SaevMetadata)]
    assert d.name == hashlib.sha256(json.dumps(raw, separators=(',', ':')).encode()).hexdigest()[:len(d.name)]
    assert d.parent.parts[-2:] == ('saev', 'shards') and base64.b64decode(raw['data'])[:1] == b'\x80'  # a pickle


def test_bad_family_requests_are_one_line(seg_root, tmp_path):
    base = ('shards', '--shards-root', tmp_path, '--n-workers', 0, 'data:img-seg-folder', '--data.root', seg_root)
    cli_fails(*base[:3], '--family', 'dinov3', '--ckpt', 'vit_small_patch16_dinov3/random', '--img-size', 100,
              *base[3:], contains='does not divide into 16-pixel patches')
    fails = lambda *a, contains: cli_in_process_fails(*a, contains=contains, env={'TQDM_DISABLE': '1'})
    fails(*base[:3], '--family', 'dinov3', '--ckpt', 'vit_small_patch14_dinov2.lvd142m/random', *base[3:],
          contains='is not a timm Eva; the dinov3 family needs one')
    fails(*base[:3], '--family', 'pe-core', '--ckpt', 'vit_pe_core_tiny_patch16_384/no/file.pt', *base[3:],
          contains='weights file not found')


def test_pretrained_eva_fails_in_one_line_without_network(monkeypatch, capfd):
    import huggingface_hub.constants as hfc
    monkeypatch.setattr(hfc, 'HF_HUB_OFFLINE', True)
    with pytest.raises(ModelError, match='could not load timm pretrained weights') as e:
        load_vit('dinov3', 'vit_small_patch16_dinov3.lvd1689m', img_size=112)
    assert '\n' not in str(e.value) and capfd.readouterr().err == ''


def test_siglip_family_loads_through_open_clip():
    for ckpt in ('ViT-B-16-SigLIP/random', 'ViT-B-16-SigLIP2/random'):
        vit = load_vit('siglip', ckpt)
        assert (vit.family, vit.is_timm, vit.has_cls, vit.n_patches) == ('siglip', True, False, 196)


@pytest.fixture(scope='module')
def dinov3_stream(seg_root, tmp_path_factory):
    "Validation shards of a DINOv3-S/16 (moved weights) at blocks 1 and 3, and the batch suppression reads from them."
    from saev_nb.suppress import suppression_batches
    dpath = tmp_path_factory.mktemp('d3')
    name, side = EVA['dinov3']
    ckpt = f'{name}/{moved_weights(dpath, name, side)}'
    d = record_cli(seg_root, dpath / 'saev' / 'shards', 'dinov3', ckpt, side, [1, 3], 'validation')
    vit = load_vit('dinov3', ckpt, img_size=side)
    return vit, next(suppression_batches(d, 1, 3, 4096, vit=vit)[0]), d


def test_dinov3_stream_rebuilt_through_later_blocks_equals_the_recorded_layer(dinov3_stream):
    from saev_nb.suppress import tail_predictor
    vit, b, _ = dinov3_stream
    assert b['resid'].shape[1] == 5 + 49  # CLS + 4 registers (from the images) + patches
    torch.testing.assert_close(b['resid'][:, 5:], b['x'], rtol=1e-4, atol=1e-4)  # images rebuild the stored layer 1
    with torch.no_grad(): out = vit.run_blocks(b['resid'], 2, 3)[:, 5:]
    assert float((out - b['x_probe']).norm() / b['x_probe'].norm()) < 1e-4
    probe = LinearProbes(1, vit.d_model, 5)
    pred = tail_predictor(vit, probe, 1, 3)(b['x'], b)  # checks against x_probe on its first batch
    assert pred.shape == b['labels'].shape
    with torch.no_grad():  # what blocks 2..3 add to the stream: without the rotary embedding it is not reproduced
        h = b['resid']
        for blk in vit.blocks[2:4]: h = blk(h)
    want = b['x_probe'] - b['x']
    assert float((out - b['x'] - want).norm() / want.norm()) < 1e-3
    assert float((h[:, 5:] - b['x'] - want).norm() / want.norm()) > 1e-2


def test_planted_control_passes_through_dinov3_blocks(dinov3_stream):
    "A direction planted at block 1 on one class's patches is read at block 3; removing it flips exactly those patches."
    from saev_nb.suppress import tail_predictor
    vit, b, _ = dinov3_stream
    x, y = b['x'], b['labels'].long()
    c = int(torch.bincount(y[y > 0]).argmax())
    m = (y == c)[..., None].float()
    s0, s1, strength = 7, 8, 6 * float(x.std())
    e0, e1 = torch.zeros(vit.d_model), torch.zeros(vit.d_model)
    e0[s0], e1[s1] = 1.0, 1.0
    planted = x + strength * m * e0
    with torch.no_grad():
        run = lambda z: vit.run_blocks(torch.cat([b['resid'][:, :5], z], 1), 2, 3)[:, 5:]
        diff = (run(planted) - run(x))[m[..., 0].bool()].mean(0)  # what the planted direction became at block 3
        score = lambda z: run(z) @ diff
        mid = float((score(planted)[m[..., 0].bool()].mean() + score(x)[m[..., 0].bool()].mean()) / 2)
    probe = LinearProbes(1, vit.d_model, 2)
    with torch.no_grad():
        probe.W_pdc.zero_(); probe.b_pc.zero_()
        probe.W_pdc[0, :, 1] = diff; probe.b_pc[0, 1] = -mid
    predict = tail_predictor(vit, probe, 1, 3)
    predict(x, b)  # the first call checks the unedited stream against the recorded block 3
    on = m[..., 0].bool()
    before = predict(planted, b)
    assert before[on].float().mean() > 0.95
    removed = predict(planted - strength * m * e0, b)  # suppress the planted latent
    control = predict(planted - strength * m * e1, b)  # the same norm along another coordinate
    assert removed[on].float().mean() < 0.05 and control[on].float().mean() > 0.95


def saev_flex_size(w: int, h: int, n: int, p: int = 16) -> tuple[int, int]:
    "Independent: among all (cols, rows) with cols * rows == n, the one whose cols / rows is closest to w / h."
    cols = min((c for c in range(1, n + 1) if n % c == 0), key=lambda c: abs(c / (n // c) - w / h))
    return cols * p, (n // cols) * p


def test_dinov3_saev_geometry_flag(seg_root, tmp_path):
    "`--flex-resize`: no crop, the aspect-closest grid of exactly P patches per image, masks NEAREST, RoPE on that grid."
    name, n = 'vit_small_patch16_dinov3', 6
    ckpt = f'{name}/{moved_weights(tmp_path, name, 112)}'
    d = record_cli(seg_root, tmp_path / 'shards', 'dinov3', ckpt, 112, [2], 'training', '--flex-resize',
                   '--content-tokens-per-example', n)
    md = validate_shards(d)
    assert (md.family, md.content_tokens_per_example, md.layers) == ('dinov3', n, (2,))
    vit = load_vit('dinov3', ckpt, img_size=112)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    want, labels, sizes = [], [], set()
    for f in sorted((seg_root / 'images' / 'training').iterdir()):
        im = Image.open(f).convert('RGB')
        size = saev_flex_size(*im.size, n)
        sizes.add(size)
        x = (torch.from_numpy(np.array(im.resize(size, Image.LANCZOS))).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.inference_mode():
            (pat, pre), = vit.trunk.forward_intermediates(x[None], indices=[2], norm=False, output_fmt='NLC',
                                                         return_prefix_tokens=True, intermediates_only=True)
        want.append(torch.cat([pre[:, :1], pat], 1)[0].numpy())
        lab = np.array(Image.open(seg_root / 'annotations' / 'training' / f'{f.stem}.png').resize(size, Image.NEAREST))
        labels.append([np.bincount(lab[r:r + 16, c:c + 16].ravel()).argmax()
                       for r in range(0, size[1], 16) for c in range(0, size[0], 16)])
    assert sizes == {(32, 48), (48, 32)}  # both grids occur (2x3 and 3x2): batches mix them
    want, got = np.stack(want)[:, None], all_acts(d)
    assert got.shape == want.shape == (12, 1, 1 + n, 384)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    np.testing.assert_array_equal(open_labels(d), np.array(labels, dtype=np.uint8))


def test_flex_resize_refusals_are_one_line(seg_root, tmp_path):
    base = ('shards', '--shards-root', tmp_path, '--n-workers', 0, '--flex-resize')
    data = ('data:img-seg-folder', '--data.root', seg_root)
    fails = lambda *a, contains: cli_in_process_fails(*a, contains=contains, env={'TQDM_DISABLE': '1'})
    fails(*base, '--family', 'dinov3', '--ckpt', 'vit_small_patch16_dinov3/random', *data,
          contains='--flex-resize needs --content-tokens-per-example')
    fails(*base, '--family', 'pe-core', '--ckpt', 'vit_pe_core_tiny_patch16_384/random', '--img-size', 128,
          '--content-tokens-per-example', 6, *data, contains='drop --flex-resize')


@pytest.mark.parametrize('family,ckpt,geometry', [
    ('dinov3', 'vit_small_patch16_dinov3/random', (256, (16, 16), 5, 261, 257)),  # saev's 256 patches, 4 registers
    ('pe-core', 'vit_pe_core_tiny_patch16_384/random', (384, (24, 24), 1, 577, 577)),
    ('pe-spatial', 'vit_pe_spatial_tiny_patch16_512/random', (512, (32, 32), 1, 1025, 1025)),
])
def test_default_geometry_of_each_eva_family(family, ckpt, geometry):
    "The models notebook's geometry table at the models' default sizes: image side, grid, prefix, tokens, recorded."
    v = load_vit(family, ckpt)
    assert (v.img_size[0], v.grid, v.n_prefix, v.n_prefix + v.n_patches, len(v.token_idx(True))) == geometry
