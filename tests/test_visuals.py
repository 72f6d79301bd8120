"Tests of saev_nb.visuals: latent choice, highlights, top examples, the gallery on disk (and in a browser), CLI errors."
import json, re, shutil, subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails, tiny_shards, fake_inference
from saev_nb.core import UserError
from saev_nb.evaluate import save_inference
from saev_nb.metrics import Metrics
from saev_nb.visuals import (VisualsConfig, filter_report, highlight, html_refs, interesting, patch_maps, pick_latents, read_features, tile,
                             top_examples, visuals)


def test_pick_latents():
    freqs = np.array([0, 1e-3, 0.5, 1e-4, 2e-2, 1e-3])
    mv = np.array([np.nan, 1.0, 1.0, 1e-4, 2.0, 5.0])
    np.testing.assert_array_equal(interesting(freqs, mv), [False, True, False, False, True, True])
    got = pick_latents(freqs, mv, latents=[2], n_latents=10)
    assert got[0] == 2 and sorted(got[1:]) == [1, 4, 5]
    assert len(pick_latents(freqs, mv, n_latents=2, seed=3)) == 2
    with pytest.raises(UserError, match='out of range'): pick_latents(freqs, mv, latents=[6])
    assert filter_report(freqs, mv).startswith('3 of 6 latents pass the filter --log10-freq -6 -1 --log10-value -2 3 (1 dead, 0 rarer, 1 denser')


def test_highlight_scales_with_activation():
    img = Image.new('RGB', (32, 32), (100, 100, 100))
    v = np.zeros((4, 4)); v[0, 0] = 2.0; v[3, 3] = 0.5
    a = np.asarray(highlight(img, v, upper=2.0)).astype(int)
    assert (a[12:20, 12:20] == 100).all()  # non-firing patch untouched
    d_strong, d_weak = np.abs(a[4, 4] - 100).sum(), np.abs(a[28, 28] - 100).sum()
    assert d_strong > d_weak > 0


def test_tile_shows_original_next_to_highlight():
    img = Image.new('RGB', (64, 64), (100, 100, 100))
    v = np.zeros((8, 8)); v[0, 0] = 1.0
    t = np.asarray(tile(img, highlight(img, v, 1.0), None, 'ex 0'))
    assert t.shape[:2] == (192 + 22, 2 * 192 + 4)  # two 192 px panels (64 px upscaled x3) and a caption
    assert (t[:24, :24] == 100).all() and (t[:24, 196:220] != 100).any()  # left: untouched original; right: highlighted


def test_top_examples_and_patch_maps_brute_force():
    rng = np.random.default_rng(0)
    n_ex, tpe, d_sae = 30, 17, 20
    dense = rng.uniform(size=(n_ex * tpe, d_sae)) * (rng.uniform(size=(n_ex * tpe, d_sae)) < 0.1)
    acts = sp.csr_matrix(dense.astype(np.float32))
    lat = np.array([3, 11, 0])
    vals, exs = top_examples(acts, lat, tpe, 5, has_cls=True)
    maps = patch_maps(acts, lat, exs, tpe, True, (4, 4))
    per = dense.astype(np.float32).reshape(n_ex, tpe, d_sae)[:, 1:]
    for j, l in enumerate(lat):
        m = per[:, :, l].max(1)
        nz = np.flatnonzero(m)
        order = nz[np.lexsort((nz, -m[nz]))][:5]
        np.testing.assert_array_equal(exs[j, :len(order)], order)
        np.testing.assert_allclose(vals[j, :len(order)], m[order])
        for i, e in enumerate(order): np.testing.assert_array_equal(maps[j, i], per[e, :, l].reshape(4, 4))


@pytest.fixture(scope='module')
def fake_eval(tmp_path_factory): return fake_inference(tmp_path_factory.mktemp('vis'))[:2]


def test_gallery_references_existing_files(fake_eval, tmp_path):
    run, shards = fake_eval
    index = visuals(VisualsConfig(run=run, shards=shards, latents=(0, 5), n_latents=4, top_k=6, log10_freq=(-6, 0), out=tmp_path / 'g'), progress=False)
    refs = html_refs(index)
    assert refs[0] == 'legend.png' and len(refs) == 1 + 2 * 6 and all(r.startswith('grids/') for r in refs[1:])
    for r in refs[1:]:
        fpath = index.parent / r
        assert fpath.exists() and Image.open(fpath).size[0] > 400 and Image.open(fpath).size[1] > 200  # tiles big enough to see
    text = index.read_text()
    assert 'sortBy' in text and '<th onclick' in text and 'the image as the model saw it' in text
    assert (index.parent / 'latents.csv').read_text().count('\n') == 7


def test_cli_writes_gallery(fake_eval, tmp_path):
    run, shards = fake_eval
    r = cli('visuals', '--run', run, '--shards', shards, '--latents', 0, 1, 2, '--n-latents', 2, '--top-k', 4, '--out', tmp_path / 'c')
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index.name == 'index.html' and all((index.parent / x).exists() for x in html_refs(index))


def test_cli_warns_when_no_latent_passes_the_filter(fake_eval, tmp_path):
    run, shards = fake_eval
    r = cli_in_process('visuals', '--run', run, '--shards', shards, '--latents', 3, '--log10-freq', -9, -8, '--top-k', 2, '--out', tmp_path / 'w')
    assert 'warning: no latent passes the frequency filter' in r.stderr and '--log10-freq -9 -8' in r.stderr and '32 rarer' not in r.stderr
    assert 'denser than the frequency range' in r.stderr
    assert 'no latent passes the frequency filter' in Path(r.stdout.strip()).read_text()  # on the page too
    cli_in_process_fails('visuals', '--run', run, '--shards', shards, '--log10-freq', -9, -8, '--out', tmp_path / 'w2', contains='nothing to show')


def test_cli_bad_input_one_line(fake_eval, tmp_path):
    run, shards = fake_eval
    cli_fails('visuals', '--run', tmp_path / 'no_run', '--shards', shards, contains='saev_nb inference --run')
    (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
    cli_in_process_fails('visuals', '--run', run, '--shards', shards, '--class-latents', tmp_path / 'bad.csv', contains="columns ['f1', 'latent', 'name'] missing")
    # the same checks in-process (the CLI turns each UserError into one line)
    with pytest.raises(UserError, match='metadata.json'): visuals(VisualsConfig(run=run, shards=tmp_path / 'no_shards'))
    with pytest.raises(UserError, match='out of range'): visuals(VisualsConfig(run=run, shards=shards, latents=(999,)))
    with pytest.raises(UserError, match='moved.*--dataset'): visuals(VisualsConfig(run=run, shards=shards, dataset=tmp_path / 'moved'))


@pytest.fixture(scope='module')
def real_gallery(tmp_path_factory):
    "Tiny ViT shards, a TopK SAE trained on block 3, its inference, `semseg features` through the CLI, and the gallery with its classes."
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.sae import SAEConfig, TopK
    from saev_nb.runs import TrainConfig
    from saev_nb.sae import Vanilla
    from saev_nb.train import train
    tmp = tmp_path_factory.mktemp('gal')
    d = tiny_shards(tmp)
    data = ShuffledConfig(shards=d['train'], layer=3, batch_size=1024)
    (run,) = train(TrainConfig(train_data=data, val_data=data, sae=SAEConfig(d_model=128, exp_factor=4, activation=TopK(top_k=16)), objective=Vanilla(),
                               n_train=48 * 64 * 10, n_val=2048, lr=3e-3, n_lr_warmup=5, runs_root=tmp / 'runs'), progress=False)
    cli_in_process('inference', '--run', run, '--data.shards', d['train'])  # in-process: the same `main`, no start-up
    r = cli_in_process('semseg', 'features', '--sae-ckpt', run / 'sae.safetensors', '--acts.shard-root', d['train'], '--imgs.root', d['root'], '--k', 1, '--out', tmp / 'semseg')
    feats = Path(r.stdout.strip().splitlines()[-1])
    r = cli_in_process('visuals', '--run', run, '--shards', d['train'], '--class-latents', feats, '--n-latents', 3, '--top-k', 8)
    return Path(r.stdout.strip().splitlines()[-1]), feats


def test_gallery_labels_the_class_latents(real_gallery):
    index, feats = real_gallery
    table = pd.read_csv(feats)
    assert len(table) and {'latent', 'name', 'f1'} <= set(table.columns)
    shown = pd.read_csv(index.parent / 'latents.csv')
    labelled = shown[shown['class'].notna()].set_index('latent')['class']
    assert set(labelled.index) == set(table.latent)
    best = table.sort_values('f1', ascending=False).groupby('latent').first()
    for l, row in best.iterrows(): assert labelled[l].startswith(f"{row['name']} (F1 {row.f1:.2f})")
    page = index.read_text()
    assert all(n in page for n in table.name)
    assert read_features(feats, 512) == {int(l): v for l, v in labelled.items()}
    # the label maps' colour key: one swatch per class shown, in `label_image`'s colour, with the class name
    from saev_nb.visuals import label_palette
    key = re.search(r'<p class="classes">(.*?)</p>', page).group(1)
    swatches = re.findall(r'background:#([0-9a-f]{6})"></span>([^<]*)</span>', key)
    pal = {'%02x%02x%02x' % tuple(int(v) for v in c): i for i, c in enumerate(label_palette()[:5])}
    named = {name: pal.get(colour) for colour, name in swatches}
    for _, row in table.drop_duplicates('class').iterrows(): assert named[row['name']] == row['class'], (named, row)


def test_gallery_screenshot_in_chromium(real_gallery, tmp_path):
    "The page as a browser draws it: headless Chromium screenshots it; the table, legend and previews are on screen."
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if chromium is None: pytest.skip('chromium is not installed (apt-get install -y chromium): no browser check of the gallery')
    index, _ = real_gallery
    shot = tmp_path / 'gallery.png'
    subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', f'--screenshot={shot}', '--window-size=1400,1000',
                    index.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    assert img.shape == (1000, 1400, 3)
    colourful = (img.max(2) - img.min(2)) > 60  # the images (and legend) are saturated; text and borders are grey
    assert colourful[:, 500:].mean() > 0.2, 'previews not drawn (broken image links?)'
    assert colourful[100:200].any(), 'highlight legend not drawn'
    shutil.copy(shot, index.parent / 'screenshot.png')  # kept next to the page for a look


def test_find_inference_picks_the_plain_evaluation(fake_eval, tmp_path):
    "With several evaluations on one shard set, visuals reads the content-token one without ignored labels, or asks."
    from saev_nb.shards import Metadata
    from saev_nb.visuals import find_inference
    run, shards = fake_eval
    md = Metadata.load(shards)
    base = run / 'inference' / md.hash
    other = base / 'layer2-content-ignore0'
    shutil.copytree(base / 'layer2-content', other)
    try:
        assert find_inference(run, md, shards) == base / 'layer2-content'
        assert find_inference(run, md, shards, other) == other
        shutil.move(base / 'layer2-content', tmp_path / 'moved')
        assert find_inference(run, md, shards) == other  # the only one left
        shutil.copytree(other, base / 'layer2-cls')
        with pytest.raises(UserError, match='several evaluations .*pass --inference'): find_inference(run, md, shards)
    finally:
        for d in (other, base / 'layer2-cls'): shutil.rmtree(d, ignore_errors=True)
        if (tmp_path / 'moved').exists(): shutil.move(tmp_path / 'moved', base / 'layer2-content')


@pytest.mark.parametrize('family,ckpt,img_size', [('clip', 'saev-tiny/random', None),
                                                  ('dinov2', 'vit_small_patch14_dinov2.lvd142m/random', 56)])
def test_display_and_label_transforms_share_the_models_geometry(family, ckpt, img_size):
    """open_clip's and timm's preprocessing through the one walker (`models.geometry_steps`): the image `visuals` shows
    is the model input before normalisation, and the label map lands on the same pixels (10 vertical stripes)."""
    from torchvision import transforms as T
    from saev_nb.models import load_transforms, geometry_steps
    from saev_nb.visuals import display_transform
    img_tf, seg_tf = load_transforms(family, ckpt, img_size=img_size)
    assert [type(t).__name__ for t in geometry_steps(img_tf)] == ['Resize', 'CenterCrop']
    stripe_hw = np.broadcast_to(np.arange(200) * 10 // 200, (150, 200)).astype(np.uint8)
    img, lab = Image.fromarray(np.repeat(stripe_hw[..., None] * 25, 3, axis=2)), Image.fromarray(stripe_hw, mode='L')
    x_chw, shown, y_hw = img_tf(img), display_transform(img_tf)(img), seg_tf(lab)
    assert x_chw.shape[1:] == y_hw.shape == shown.size[::-1]
    norm = next(t for t in img_tf.transforms if type(t).__name__ == 'Normalize')
    mean, std = (torch.as_tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (norm.mean, norm.std))
    torch.testing.assert_close(T.functional.to_tensor(shown), x_chw * std + mean, atol=1e-5, rtol=0)
    r_hw = torch.from_numpy(np.asarray(shown)[..., 0].astype(np.int64))
    assert ((r_hw - 25 * y_hw.long()).abs() <= 2).float().mean() > 0.85  # stripe interiors agree (edges blur)
    with pytest.raises(UserError, match='RandomHorizontalFlip is not a known geometric step'):
        display_transform(T.Compose([T.RandomHorizontalFlip()]))


def test_second_call_warns_that_it_replaces_the_page(fake_eval, tmp_path):
    "A second `visuals` into the same folder replaces index.html and says so, in one line naming it."
    run, shards = fake_eval
    args = ('visuals', '--run', run, '--shards', shards, '--n-latents', 0, '--top-k', 2, '--out', tmp_path/'g')
    r1 = cli(*args, '--latents', 0, 1, env={'TQDM_DISABLE': '1'})
    assert 'warning' not in r1.stderr
    r2 = cli(*args, '--latents', 2, env={'TQDM_DISABLE': '1'})
    index = tmp_path/'g'/'index.html'
    assert r2.stderr.strip().splitlines() == [f'warning: {index}: replacing the gallery an earlier `saev_nb visuals` wrote '
                                              'here (and its grids); pass --out DIR to keep both']
    assert Path(r2.stdout.strip()) == index and list(pd.read_csv(tmp_path/'g'/'latents.csv').latent) == [2]


def test_visuals_takes_a_saev_checkpoint_file(fake_eval, tmp_path):
    "`--run sae.pt`: the evaluations of a bare checkpoint live in its folder (as `saev_nb inference` writes them)."
    from saev_nb.shards import Metadata
    run, shards = fake_eval
    md = Metadata.load(shards)
    pt = tmp_path/'saev run'/'sae.pt'
    shutil.copytree(run/'inference', pt.parent/'inference')
    pt.write_bytes(b'')  # visuals reads only the evaluation
    cfg_fpath = pt.parent/'inference'/md.hash/'layer2-content'/'config.json'
    cfg_fpath.write_text(json.dumps({**json.loads(cfg_fpath.read_text()), 'sae': str(pt.resolve())}))
    r = cli('visuals', '--run', pt, '--shards', shards, '--latents', 0, '--n-latents', 0, '--top-k', 2, env={'TQDM_DISABLE': '1'})
    index = Path(r.stdout.strip())
    assert index == pt.parent/'visuals'/md.hash/'index.html' and index.is_file()
    assert 'SAE latents of saev run' in index.read_text()
    cli_fails('visuals', '--run', tmp_path/'other'/'sae.pt', '--shards', shards,
              contains=f"run `saev_nb inference --run {tmp_path/'other'/'sae.pt'} --data.shards {shards}` first")


def test_same_gallery_again_is_skipped_and_force_redraws(fake_eval, tmp_path):
    """A gallery is a resumable step: the same settings from the same files skip with the one line; --force, other
    settings or a recomputed token matrix draw it again; settings.json is written last."""
    run, shards = fake_eval
    args = ('visuals', '--run', run, '--shards', shards, '--latents', 0, '--n-latents', 0, '--top-k', 2, '--out', tmp_path / 'g')
    index = Path(cli_in_process(*args).stdout.strip())
    settings = json.loads((tmp_path / 'g' / 'settings.json').read_text())
    assert settings['latents'] == [0] and settings['top_k'] == 2 and settings['token_acts_file'][0] > 0
    mtime = index.stat().st_mtime_ns
    r = cli_in_process(*args)
    assert r.stderr.strip() == f"{tmp_path / 'g'}: gallery already made with the same settings (settings.json); skipping (--force redoes it)"
    assert Path(r.stdout.strip()) == index and index.stat().st_mtime_ns == mtime
    r = cli_in_process(*args, '--force')
    assert 'skipping' not in r.stderr and index.stat().st_mtime_ns != mtime
    (tmp_path / 'g' / 'grids' / 'latent_00000.png').unlink()  # a grid lost: drawn again
    assert 'skipping' not in cli_in_process(*args).stderr and (tmp_path / 'g' / 'grids' / 'latent_00000.png').exists()
    acts = run / 'inference' / shards.name / 'layer2-content' / 'token_acts.npz'
    acts.touch()  # as a recomputed evaluation leaves it
    assert 'skipping' not in cli_in_process(*args).stderr
