"""The timm `Eva` families (DINOv3, PE-Core, PE-Spatial) and `siglip`: shards written by the installed command equal
timm's own `forward_intermediates`, labels equal an independent majority vote, metadata reads as saev's `Metadata`, and
the stream rebuilt through later blocks (rotary embedding, registers) equals the recorded later layer."""
import base64, dataclasses, hashlib, json, pickle, typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saev_nb.data import SegFolderConfig, tiny_dataset
from saev_nb.models import ModelError, load_vit
from saev_nb.probe import LinearProbes
from saev_nb.shards import Metadata, load_shard_info, open_labels, open_shard, validate_shards

from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails

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


def test_suppress_command_on_dinov3_blocks(dinov3_stream, tmp_path):
    """`semseg suppress` by the installed command, SAE on block 1 and probe on block 3 of a DINOv3: the stream rebuilt
    from the images (registers, rotary grid) reproduces the recorded block 3, and a direction planted at block 1 on one
    class's patches (block 3 recorded from it) is what the class latent removes: its patches flip, the control's
    do not."""
    import subprocess
    from saev_nb.probe import save_probe
    from saev_nb.sae import SAE, SAEConfig, Relu, save_sae
    from saev_nb.shards import shard_name
    vit, b, src = dinov3_stream
    d = tmp_path / 'saev' / 'shards' / src.name
    d.parent.mkdir(parents=True)
    subprocess.run(['cp', '-r', '--sparse=always', str(src), str(d)], check=True)
    md = Metadata.load(d)
    x, y = b['x'], b['labels'].long()
    assert x.shape[0] == md.n_examples == 6  # one batch holds every image
    c = int(torch.bincount(y[y > 0]).argmax())
    on, s0, strength = y == c, 7, 12 * float(x.std())
    planted = x.clone()
    planted[..., s0] += strength * on
    with torch.no_grad():
        run = lambda z: vit.run_blocks(torch.cat([b['resid'][:, :5], z], 1), 2, 3)[:, 5:]
        at3 = run(planted)
        diff = (at3 - run(x))[on].mean(0)  # what the planted direction became at block 3
        score = at3 @ diff
    assert float(score[~on].max()) < float(score[on].min())  # the probe below reads class c exactly on its patches
    stored = np.memmap(d / shard_name(0), dtype=np.float32, mode='r+', shape=md.shard_shape)
    stored[:6, 0, 1:], stored[:6, 1, 1:] = planted.numpy(), at3.numpy()  # block 1 planted, block 3 recorded from it
    stored.flush(); del stored
    # the SAE: latent 0 reads the planted coordinate and writes it back; 15 weak random latents for the controls
    sae = SAE(SAEConfig(d_model=384, d_sae=16, activation=Relu()), seed=0)
    v = planted[..., s0] / strength
    tau = (float(v[~on].max()) + float(v[on].min())) / 2
    with torch.no_grad():
        sae.b_dec.zero_(); sae.b_enc.zero_(); sae.W_enc[:, 0] = 0; sae.W_enc[s0, 0] = 1 / strength
        sae.b_enc[0] = -tau
        sae.W_dec.mul_(0.05 * float(x.std()) / sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_dec[0] = 0; sae.W_dec[0, s0] = strength / float((v[on] - tau).mean())
    save_sae(sae, tmp_path / 'sae.safetensors')
    probe = LinearProbes(1, 384, 151)
    with torch.no_grad():
        probe.W_pdc.zero_(); probe.b_pc.fill_(-1e3); probe.b_pc[0, 0] = 0
        probe.W_pdc[0, :, c] = diff; probe.b_pc[0, c] = -(float(score[~on].max()) + float(score[on].min())) / 2
    save_probe(probe, 0, tmp_path / 'probe.safetensors', {'layer': 3, 'family': 'dinov3', 'ckpt': md.ckpt})
    feats = tmp_path / 'features' / 'features.csv'  # the planted latent, chosen for class c by `semseg features`
    cli_in_process('semseg', 'features', '--sae-ckpt', tmp_path / 'sae.safetensors', '--acts.shards', d,
                   '--acts.layer', 1, '--imgs.root', md.dataset, '--k', 1, '--max-freq', 1, '--out', tmp_path,
                   env={'TQDM_DISABLE': '1'})
    assert 0 in set(pd.read_csv(feats).query('`class` == @c').latent)
    r = cli('semseg', 'suppress', '--sae-ckpt', tmp_path / 'sae.safetensors', '--acts.shards', d, '--acts.layer', 1,
            '--probe', tmp_path / 'probe.safetensors', '--features', feats, '--n-boot', 20, '--out', tmp_path,
            env={'TQDM_DISABLE': '1'})  # the first batch checks the rebuilt block 3 against the recorded one
    pc = pd.read_csv(tmp_path / 'suppress' / 'per-class.csv').query('`class` == @c').set_index('condition')
    assert json.loads((tmp_path / 'suppress' / 'conditions.json').read_text())['probe_layer'] == 3
    assert pc.loc['none', 'n_target'] == int(on.sum()) and pc.loc['none', 'target_change'] == 0
    assert pc.loc['class', 'target_change'] >= 0.95 and pc.loc['random-dir', 'target_change'] <= 0.05, pc


def saev_flex_size(w: int, h: int, n: int, p: int = 16) -> tuple[int, int]:
    "Independent: among all (cols, rows) with cols * rows == n, the one whose cols / rows is closest to w / h."
    cols = min((c for c in range(1, n + 1) if n % c == 0), key=lambda c: abs(c / (n // c) - w / h))
    return cols * p, (n // cols) * p


@pytest.fixture(scope='module')
def flex_shards(seg_root, tmp_path_factory):
    "Training shards of a DINOv3-S/16 (moved weights) at block 2 in saev's geometry, 6 patches per image: (ckpt, dir)."
    dpath = tmp_path_factory.mktemp('flex')
    name = 'vit_small_patch16_dinov3'
    ckpt = f'{name}/{moved_weights(dpath, name, 112)}'
    return ckpt, record_cli(seg_root, dpath / 'shards', 'dinov3', ckpt, 112, [2], 'training', '--flex-resize',
                            '--content-tokens-per-example', 6)


def test_dinov3_saev_geometry_flag(seg_root, flex_shards):
    "`--flex-resize`: no crop, the aspect-closest grid of exactly P patches per image, masks NEAREST, RoPE on its grid."
    (ckpt, d), n = flex_shards, 6
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


def test_flex_geometry_is_carried_downstream(seg_root, flex_shards, tmp_path):
    """`geometry.json` records the flex geometry; `vit_for_shards` (per-image grids) with `recorded_images` rebuilds the
    stored tokens and labels, `visuals` draws the shards' images in that geometry, and a step that needs one grid for
    every image refuses in one line naming the directory."""
    from saev_nb.data import make_dataset
    from saev_nb.models import pixel_to_patch_labels
    from saev_nb.sae import SAE, SAEConfig, Relu, save_sae
    from saev_nb.shards import ImageGeometry, ShardError, recorded_geometry, recorded_images, vit_for_shards
    from saev_nb.visuals import GalleryExamples, highlight
    _, d = flex_shards
    md = Metadata.load(d)
    assert recorded_geometry(d) == ImageGeometry('flex', 112)
    vit = vit_for_shards(md, per_image_grid=True)
    ds = make_dataset(recorded_images(md), vit.img_transform, vit.seg_transform)
    with torch.inference_mode():
        got = np.stack([vit.residual(ds[i]['image'][None], 2)[0, vit.token_idx(True)].numpy() for i in range(len(ds))])
    want = all_acts(d)[:, 0]
    assert got.shape == want.shape == (12, 7, 384) and np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    labels = np.stack([pixel_to_patch_labels(ds[i]['labels'], 16)[0].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(labels, open_labels(d))
    ex = GalleryExamples(md)  # the gallery's images and label maps: the recorded geometry, a grid per image
    assert ex.grid_hw is None and {ex(i)[0].size for i in range(12)} == {(48, 32), (32, 48)}
    np.testing.assert_array_equal([pixel_to_patch_labels(ex(i)[1], 16)[0].numpy() for i in range(12)], open_labels(d))
    assert highlight(ex(0)[0], np.arange(6.0), 5.0).size == ex(0)[0].size
    with pytest.raises(ShardError, match=f'{d}: recorded with --flex-resize .* without --flex-resize for it'):
        vit_for_shards(md)
    # the commands: inference and visuals draw the gallery; `semseg features` (one pixel-label size) refuses
    save_sae(SAE(SAEConfig(d_model=384, d_sae=16, activation=Relu()), seed=0), tmp_path / 'sae.safetensors')
    env = {'TQDM_DISABLE': '1'}
    cli_in_process('inference', '--run', tmp_path / 'sae.safetensors', '--data.shards', d, env=env)
    index = Path(cli_in_process('visuals', '--run', tmp_path / 'sae.safetensors', '--shards', d, '--n-latents', 2,
                     '--log10-freq', -9, 0, '--log10-value', -9, 9, '--out', tmp_path / 'g', env=env)
                 .stdout.strip().splitlines()[-1])
    assert index.is_file() and len(list((tmp_path / 'g' / 'grids').glob('latent_*_preview.png'))) == 2
    cli_in_process('explore', '--run', tmp_path / 'sae.safetensors', '--shards', d, '--latents', 0, '--n-pages', 0,
                   '--out', tmp_path / 'site', env=env)  # the explorer's pages: each image's own grid, no change there
    shown = {Image.open(f).size for f in (tmp_path / 'site' / 'latents' / 'latent_00000').glob('ex_*.png')}
    assert shown and all(2 * w == 3 * h or 3 * w == 2 * h for w, h in shown), shown  # 2 x 3 or 3 x 2 patches
    cli_in_process_fails('semseg', 'features', '--sae-ckpt', tmp_path / 'sae.safetensors', '--acts.shards', d,
                         '--imgs.root', seg_root, '--out', tmp_path, contains=f'{d}: recorded with --flex-resize',
                         env=env)
    cli_in_process_fails('semseg', 'train', '--train-acts.shards', d, '--val-acts.shards', d, '--out',
                         tmp_path / 'probe', contains=f'{d}: recorded with --flex-resize', env=env)  # before training
    assert not list((tmp_path / 'probe').rglob('*.safetensors'))


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
