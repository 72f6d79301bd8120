"Tests of saev_nb.visuals: latent choice, highlights, top examples, the gallery on disk, CLI errors."
import subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from saev_nb.evaluate import Metrics, save_inference
from saev_nb.visuals import VisualsConfig, highlight, html_refs, interesting, patch_maps, pick_latents, top_examples, visuals


def test_pick_latents():
    freqs = np.array([0, 1e-3, 0.5, 1e-4, 2e-2, 1e-3])
    mv = np.array([np.nan, 1.0, 1.0, 1e-4, 2.0, 5.0])
    np.testing.assert_array_equal(interesting(freqs, mv), [False, True, False, False, True, True])
    got = pick_latents(freqs, mv, latents=[2], n_latents=10)
    assert got[0] == 2 and sorted(got[1:]) == [1, 4, 5]
    assert len(pick_latents(freqs, mv, n_latents=2, seed=3)) == 2
    with pytest.raises(IndexError, match='out of range'): pick_latents(freqs, mv, latents=[6])


def test_highlight_scales_with_activation():
    img = Image.new('RGB', (32, 32), (100, 100, 100))
    v = np.zeros((4, 4)); v[0, 0] = 2.0; v[3, 3] = 0.5
    a = np.asarray(highlight(img, v, upper=2.0)).astype(int)
    assert (a[12:20, 12:20] == 100).all()  # non-firing patch untouched
    d_strong, d_weak = np.abs(a[4, 4] - 100).sum(), np.abs(a[28, 28] - 100).sum()
    assert d_strong > d_weak > 0


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
def fake_eval(tmp_path_factory):
    "Shard metadata pointing at the tiny generated data set + an inference folder of random sparse activations."
    from saev_nb.data import tiny_dataset
    from saev_nb.shards import Metadata
    from saev_nb.models import load_vit
    root = tiny_dataset()
    vit = load_vit('clip', 'saev-tiny/random')
    n_ex, p = 64, vit.n_patches
    md = Metadata(family='clip', ckpt='saev-tiny/random', layers=(2,), content_tokens_per_example=p, cls_token=True, d_model=vit.d_model,
                  n_examples=n_ex, max_tokens_per_shard=n_ex * (p + 1), data={'kind': 'SegFolderConfig', 'root': str(root), 'split': 'training'},
                  dataset=str(root))
    tmp = tmp_path_factory.mktemp('vis')
    shards = tmp / 'shards' / md.hash
    shards.mkdir(parents=True); md.dump(shards)
    run = tmp / 'runs' / 'r0'; run.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(n_ex * p, 32, generator=g) - 2.0)
    m = Metrics(8, 32).update(torch.randn(n_ex * p, 8, generator=g), torch.zeros(n_ex * p, 8), f)
    save_inference(run / 'inference' / md.hash, m, sp.csr_matrix(f.numpy()), dict(run=str(run), tokens_per_example=p, has_cls=False))
    return run, shards


def test_gallery_references_existing_files(fake_eval, tmp_path):
    run, shards = fake_eval
    index = visuals(VisualsConfig(run=run, shards=shards, latents=(0, 5), n_latents=4, top_k=6, log10_freq=(-6, 0), out=tmp_path / 'g'))
    refs = html_refs(index)
    assert len(refs) == 6 and all(r.startswith('grids/') for r in refs)
    for r in refs:
        fpath = index.parent / r
        assert fpath.exists() and Image.open(fpath).size[0] > 100
    text = index.read_text()
    assert 'sortBy' in text and '<th onclick' in text
    assert (index.parent / 'latents.csv').read_text().count('\n') == 7


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'saev_nb.cli', 'visuals', *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_writes_gallery(fake_eval, tmp_path):
    run, shards = fake_eval
    r = _cli('--run', run, '--shards', shards, '--latents', 0, 1, 2, '--n-latents', 2, '--top-k', 4, '--out', tmp_path / 'c')
    assert r.returncode == 0, r.stderr
    index = Path(r.stdout.strip().splitlines()[-1])
    assert index.name == 'index.html' and all((index.parent / x).exists() for x in html_refs(index))


def _inproc_error(cfg, *needles):
    from saev_nb.visuals import visuals_cli
    with pytest.raises(SystemExit) as e: visuals_cli(cfg)
    msg = str(e.value.code)
    assert '\n' not in msg, msg
    for n in needles: assert n in msg, msg


def test_cli_bad_input_one_line(fake_eval, tmp_path):
    run, shards = fake_eval
    r = _cli('--run', tmp_path / 'no_run', '--shards', shards)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'saev_nb inference' in r.stderr
    _inproc_error(VisualsConfig(run=run, shards=tmp_path / 'no_shards'), 'metadata.json')
    _inproc_error(VisualsConfig(run=run, shards=shards, latents=(999,)), 'out of range')
    _inproc_error(VisualsConfig(run=run, shards=shards, dataset=tmp_path / 'moved'), 'moved', '--dataset')
