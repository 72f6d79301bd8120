"""saev_nb.models: recorded residuals against the libraries' own (independent) intermediate outputs, token layout,
checkpoint loading, bad input, and patch-label aggregation on hand-made masks."""
import numpy as np
import pytest
import torch
import open_clip
import huggingface_hub.constants as hfc

from saev_nb.models import (ModelError, Vit, load_vit, load_transforms, record, pixel_to_patch_labels, register_tiny,
                            seg_transform_like, DEFAULT_FAMILY, DEFAULT_CKPT)
from PIL import Image


@pytest.fixture(scope='module')
def tiny(): return load_vit(DEFAULT_FAMILY, DEFAULT_CKPT)


@pytest.fixture(scope='module')
def x64(): return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _clip_ref(vit, x, layers):
    "open_clip's own forward_intermediates (no hooks), NLC with the CLS prefix re-attached."
    out = vit.model.forward_intermediates(x, indices=list(layers), output_fmt='NLC', output_extra_tokens=True, intermediates_only=True)
    return [torch.cat([p, t], 1) for p, t in zip(out['image_intermediates_prefix'], out['image_intermediates'])]


@pytest.mark.parametrize('cls_token', [True, False])
def test_clip_record_matches_forward_intermediates(tiny, x64, cls_token):
    with torch.inference_mode():
        acts = record(tiny, x64, [-1, 0, 2], cls_token=cls_token)
        ref = _clip_ref(tiny, x64, [0, 2, 3])
    assert acts.shape == (3, 3, 64 + cls_token, 128)
    for i, r in enumerate(ref):
        torch.testing.assert_close(acts[:, i], r if cls_token else r[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,n_reg', [('vit_small_patch14_dinov2.lvd142m', 0), ('vit_small_patch14_reg4_dinov2.lvd142m', 4)])
@pytest.mark.parametrize('cls_token', [True, False])
def test_dinov2_record_matches_timm(name, n_reg, cls_token):
    vit = load_vit('dinov2', f'{name}/random', img_size=56)
    assert (vit.n_prefix, vit.n_patches, vit.d_model, vit.n_layers) == (1 + n_reg, 16, 384, 12)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        acts = record(vit, x, [3, -2, -1], cls_token=cls_token)
        final, inter = vit.model.forward_intermediates(x, indices=[3, 10, 11], return_prefix_tokens=True, output_fmt='NLC')
    for i, (patches, prefix) in enumerate(inter):
        want = torch.cat([prefix[:, :1], patches], 1) if cls_token else patches  # CLS is prefix token 0; registers dropped
        torch.testing.assert_close(acts[:, i], want, rtol=1e-5, atol=1e-5)


def test_record_skips_later_blocks(tiny, x64):
    calls = []
    h = tiny.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode(): record(tiny, x64, [1])
    finally: h.remove()
    assert calls == []


def test_final_patch_tokens_on_modified_residual(tiny, x64):
    with torch.inference_mode():
        r = tiny.residual(x64, 1).clone()
        r[:, 5:9] = 0  # an edit of the residual stream
        h = r
        for blk in list(tiny.model.transformer.resblocks)[2:]: h = blk(h)
        want = tiny.model.ln_post(h)[:, 1:]
        torch.testing.assert_close(tiny.final_patch_tokens(1, r), want)
        torch.testing.assert_close(tiny.final_patch_tokens(-1, tiny.residual(x64, -1)), tiny.model.ln_post(tiny.model.transformer(tiny.model._embeds(x64)))[:, 1:], rtol=1e-5, atol=1e-5)


def test_random_init_is_deterministic():
    a, b = load_vit('clip', 'saev-tiny/random'), load_vit('clip', 'saev-tiny')
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()): assert torch.equal(v, w), k


def test_default_is_the_learned_model_and_random_the_control(x64):
    "Every `--ckpt` default is the shipped learned `saev-tiny/scenes`; `saev-tiny/random` is its random-init twin."
    from saev_nb.writer import ShardsConfig
    assert (DEFAULT_FAMILY, DEFAULT_CKPT, ShardsConfig().ckpt) == ('clip', 'saev-tiny/scenes', 'saev-tiny/scenes')
    learned, control = load_vit(DEFAULT_FAMILY, DEFAULT_CKPT), load_vit('clip', 'saev-tiny/random')
    assert (learned.d_model, learned.n_layers, learned.grid) == (control.d_model, control.n_layers, control.grid)
    with torch.inference_mode(): assert not torch.allclose(learned(x64), control(x64))


def test_local_checkpoint_roundtrip(tmp_path, x64):
    register_tiny()
    torch.manual_seed(3)
    src = open_clip.create_model('saev-tiny')
    torch.save(src.state_dict(), tmp_path / 'full.pt')
    torch.save({'state_dict': src.visual.state_dict()}, tmp_path / 'visual.pt')
    from safetensors.torch import save_file
    save_file(src.visual.state_dict(), tmp_path / 'visual.safetensors')
    with torch.inference_mode():
        want = src.visual(x64)
        for f in ['full.pt', 'visual.pt', 'visual.safetensors']:
            torch.testing.assert_close(load_vit('clip', f'saev-tiny/{tmp_path / f}')(x64), want)
    dino = load_vit('dinov2', 'vit_small_patch14_dinov2.lvd142m/random', img_size=56)
    torch.save(dino.model.state_dict(), tmp_path / 'dino.pt')
    back = load_vit('dinov2', f'vit_small_patch14_dinov2.lvd142m/{tmp_path / "dino.pt"}', img_size=56)
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in dino.model.state_dict().items())
    with pytest.raises(ModelError, match='weights do not fit'): load_vit('clip', f'saev-tiny/{tmp_path / "dino.pt"}')


@pytest.mark.parametrize('family,ckpt,msg', [
    ('resnet', 'saev-tiny/random', "unknown family 'resnet'"),
    ('clip', 'ViT-Q-99/random', "unknown open_clip model 'ViT-Q-99'"),
    ('clip', 'ViT-B-16/not-a-tag', "unknown pretrained tag 'not-a-tag'"),
    ('clip', 'saev-tiny/no/such/file.pt', 'weights file not found'),
    ('dinov2', 'vit_small_patch14_dinov9/random', 'unknown timm model'),
    ('dinov2', 'vit_small_patch14_dinov2.lvd142m/nope.pt', 'weights file not found'),
])
def test_bad_checkpoints(family, ckpt, msg):
    with pytest.raises(ModelError, match=msg) as e: load_vit(family, ckpt)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('family,ckpt,kind', [('clip', 'ViT-B-16/openai', 'open_clip'), ('dinov2', 'vit_small_patch14_dinov2.lvd142m', 'timm')])
def test_pretrained_download_failure_is_one_clear_line(monkeypatch, capfd, family, ckpt, kind):
    monkeypatch.setattr(hfc, 'HF_HUB_OFFLINE', True)  # this machine has no network; fail fast instead of DNS timeouts
    with pytest.raises(ModelError, match=f'could not load {kind} pretrained weights') as e: load_vit(family, ckpt)
    assert '\n' not in str(e.value) and 'pass a local file' in str(e.value)
    assert capfd.readouterr().err == ''  # the libraries' own log lines are muted: the error is the only line


def test_layers_and_user_numbers_checked(tiny):
    assert tiny.resolve_layers([-2, 0]) == (0, 2)
    with pytest.raises(ModelError, match=r'layer 4 out of range for 4 blocks \(valid: -4..3\)'): tiny.resolve_layers([4])
    with pytest.raises(ModelError, match='layer -5 out of range'): tiny.resolve_layers([-5])
    with pytest.raises(ModelError, match='same block twice'): tiny.resolve_layers([3, -1])
    with pytest.raises(ModelError, match='d_model=768 given'): tiny.check(d_model=768)
    with pytest.raises(ModelError, match='content_tokens_per_example=256 given'): tiny.check(content_tokens=256)
    tiny.check(d_model=128, content_tokens=64)


def test_siglip_through_open_clip_timm_trunk():
    vit = load_vit('clip', 'ViT-B-16-SigLIP/random')
    assert (vit.is_timm, vit.has_cls, vit.n_prefix, vit.n_patches, vit.d_model) == (True, False, 0, 196, 768)
    with pytest.raises(ModelError, match='no CLS token'): vit.token_idx(True)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        acts = record(vit, x, [1], cls_token=False)
        ref = vit.trunk.forward_intermediates(x, indices=[1], output_fmt='NLC', intermediates_only=True)
    torch.testing.assert_close(acts[:, 0], ref[0], rtol=1e-5, atol=1e-5)


def test_transforms_share_geometry():
    img_tf, seg_tf = load_transforms('dinov2', 'vit_small_patch14_reg4_dinov2.lvd142m/random', img_size=112)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    lab = Image.fromarray(np.random.default_rng(0).integers(0, 9, (150, 200), dtype=np.uint8), mode='L')
    x, y = img_tf(img), seg_tf(lab)
    assert x.shape == (3, 112, 112) and y.shape == (112, 112) and y.dtype == torch.uint8
    assert set(torch.unique(y).tolist()) <= set(range(9))  # NEAREST: no new label values
    with pytest.raises(ModelError, match='no label counterpart'): seg_transform_like(lambda im: im)


def test_pixel_to_patch_labels_hand_made():
    mask = torch.tensor([[1, 1, 2, 3, 0, 0],
                         [1, 0, 3, 2, 0, 7],
                         [0, 0, 0, 5, 4, 4],
                         [0, 0, 0, 0, 4, 6]], dtype=torch.uint8)
    # patches (2x2, row-major): [1,1,1,0] [2,3,3,2] [0,0,0,7] / [0,0,0,0] [0,5,0,0] [4,4,4,6]
    assert pixel_to_patch_labels(mask, 2).tolist() == [[1, 2, 0, 0, 0, 4]]  # tie 2/3 -> lower id 2
    assert pixel_to_patch_labels(mask, 2, 'prefer-fg').tolist() == [[1, 2, 7, 0, 5, 4]]
    batch = torch.stack([mask, torch.flip(mask, [1])])
    out = pixel_to_patch_labels(batch, 2)
    assert out.shape == (2, 6) and out.dtype == torch.uint8 and out[0].tolist() == [1, 2, 0, 0, 0, 4]
    assert pixel_to_patch_labels(torch.full((1, 4, 4), 150, dtype=torch.uint8), 4).tolist() == [[150]]
    with pytest.raises(ValueError, match='not a multiple of patch size'): pixel_to_patch_labels(mask, 4)
    with pytest.raises(ValueError, match="expected 'majority' or 'prefer-fg'"): pixel_to_patch_labels(mask, 2, 'mode')


def test_pixel_to_patch_labels_matches_loop():
    rng = np.random.default_rng(0)
    lab = torch.from_numpy(rng.integers(0, 12, (4, 28, 42), dtype=np.uint8))
    lab[0, :14, :14] = 0
    for agg in ['majority', 'prefer-fg']:
        want = []
        for b in range(4):
            for i in range(0, 28, 14):
                for j in range(0, 42, 14):
                    c = np.bincount(lab[b, i:i + 14, j:j + 14].numpy().ravel(), minlength=256)
                    if agg == 'prefer-fg' and c[1:].sum(): c[0] = 0
                    want.append(c.argmax())
        assert pixel_to_patch_labels(lab, 14, agg).flatten().tolist() == want
