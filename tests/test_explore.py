"Tests of saev_nb.explore: the static site of an SAE's latents, built through the installed console script."
import json, re, shutil, subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails, tiny_shards
from saev_nb.data import read_class_names
from saev_nb.shards import Metadata
from saev_nb.visuals import html_refs

HOSTILE = '<script>alert("x")</script>&\'wall'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Tiny ViT shards (with labels.bin), a TopK SAE trained on block 3, and its inference (token_acts.npz)."
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.runs import TrainConfig
    from saev_nb.sae import SAEConfig, TopK, Vanilla
    from saev_nb.train import train
    tmp = tmp_path_factory.mktemp('explore')
    d = tiny_shards(tmp)
    data = ShuffledConfig(shards=d['train'], layer=3, batch_size=1024)
    (run,) = train(TrainConfig(train_data=data, val_data=data, sae=SAEConfig(d_model=128, exp_factor=1, activation=TopK(top_k=8)),
                               objective=Vanilla(), n_train=48 * 64 * 4, n_val=1024, lr=3e-3, n_lr_warmup=5, runs_root=tmp / 'runs'),
                   progress=False)
    cli_in_process('inference', '--run', run, '--data.shards', d['train'], env={'TQDM_DISABLE': '1'})
    md = Metadata.load(d['train'])
    (inf,) = [p for p in (run / 'inference' / md.hash).iterdir() if (p / 'token_acts.npz').exists()]
    feats = tmp / 'features.csv'
    pd.DataFrame(dict(**{'class': [1]}, name=[HOSTILE], rank=[0], latent=[5], f1=[0.75])).to_csv(feats, index=False)
    r = cli('explore', '--run', run, '--shards', d['train'], '--features', feats, '--n-pages', 3, '--top-k', 4,
            '--out', tmp / 'site', env={'TQDM_DISABLE': '1'})
    return dict(d, run=run, inf=inf, md=md, feats=feats, site=Path(r.stdout.strip().splitlines()[-1]), result=r)


class Rows(HTMLParser):
    "The overview table's rows: the `data-` attributes of each `<tr data-latent>` and its cells' `data-v`."
    def __init__(self):
        super().__init__(); self.rows = []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'tr' and 'data-latent' in a: self.rows.append({'attrs': a, 'cells': []})
        elif tag == 'td' and self.rows: self.rows[-1]['cells'].append(a.get('data-v'))


def overview_rows(site: Path) -> list[dict]:
    p = Rows(); p.feed((site / 'index.html').read_text()); return p.rows


def test_cli_writes_the_site(world):
    "Exit 0, the folder is the last stdout line, every file the pages reference exists, pages for the chosen latents."
    site = world['site']
    assert site == world['site'].resolve() or site.exists()
    assert (site / 'index.html').is_file() and (site / 'latents.csv').is_file() and (site / 'settings.json').is_file()
    pages = sorted((site / 'latents').glob('latent_*.html'))
    assert 4 <= len(pages) <= 4  # --n-pages 3 most frequent alive latents + the --features latent 5
    assert (site / 'latents' / 'latent_00005.html').is_file()
    for page in [site / 'index.html', *pages]:
        for ref in html_refs(page): assert (page.parent / ref).is_file(), (page, ref)
    text = (site / 'index.html').read_text()
    assert 'http://' not in text and 'https://' not in text  # no network: nothing fetched
    shared = list((site / 'img').glob('ex_*.png'))
    assert shared and Image.open(shared[0]).size[0] >= 192  # images big enough to see, written once under img/


def test_overview_has_one_row_per_latent_with_numpy_frequencies(world):
    "One row per latent; its frequency, max and top class with purity agree with numpy on token_acts.npz and labels.bin."
    acts = sp.load_npz(world['inf'] / 'token_acts.npz').toarray()
    n_tokens, d_sae = acts.shape
    rows = overview_rows(world['site'])
    assert [int(r['attrs']['data-latent']) for r in rows] == list(range(d_sae))
    freq = np.array([float(r['cells'][1]) for r in rows])
    np.testing.assert_allclose(freq, (acts > 0).sum(0) / n_tokens, rtol=1e-9)
    np.testing.assert_allclose(freq, np.load(world['inf'] / 'freqs.npy'), rtol=1e-5, atol=1e-9)  # inference's own
    mx = np.array([float(r['cells'][4]) if r['cells'][4] else 0.0 for r in rows])
    np.testing.assert_allclose(mx, acts.max(0), rtol=1e-6)
    info = json.loads((world['inf'] / 'config.json').read_text())
    labels = np.fromfile(world['train'] / 'labels.bin', np.uint8).reshape(world['md'].n_examples, -1).astype(int)
    if info['has_cls']: labels = np.concatenate([np.full((len(labels), 1), -1), labels], 1)
    labels = labels.ravel()
    names = read_class_names(world['root'])
    table = pd.read_csv(world['site'] / 'latents.csv')
    for l in np.flatnonzero((acts > 0).any(0))[:20]:
        cnt = np.bincount(labels[(acts[:, l] > 0) & (labels >= 0)], minlength=len(names))
        assert table.top_class[l] == names[cnt.argmax()] and abs(table.purity[l] - cnt.max() / cnt.sum()) < 1e-9


def test_hostile_class_name_is_escaped(world):
    "A class name from the user's features.csv is shown, escaped, on the overview and on its latent's page."
    esc = '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;wall'
    for page in (world['site'] / 'index.html', world['site'] / 'latents' / 'latent_00005.html'):
        text = page.read_text()
        assert '<script>alert' not in text and esc in text, page


def test_same_site_again_is_skipped_and_force_rebuilds(world, tmp_path):
    "Resumable (core.Step): the same settings skip with one line; --force rebuilds; the folder is the last line."
    site = tmp_path / 's'
    args = ('explore', '--run', world['run'], '--shards', world['train'], '--n-pages', 1, '--top-k', 2, '--out', site)
    assert Path(cli_in_process(*args, env={'TQDM_DISABLE': '1'}).stdout.strip()) == site
    mtime = (site / 'index.html').stat().st_mtime_ns
    r = cli_in_process(*args)
    assert r.stderr.strip().endswith('skipping (--force redoes it)') and len(r.stderr.strip().splitlines()) == 1
    assert (site / 'index.html').stat().st_mtime_ns == mtime and Path(r.stdout.strip()) == site
    cli_in_process(*args, '--force', env={'TQDM_DISABLE': '1'})
    assert (site / 'index.html').stat().st_mtime_ns != mtime


def test_bad_input_is_one_line(world, tmp_path):
    "Exit 2 and one stderr line naming the fix."
    cli_fails('explore', '--run', tmp_path / 'no_run', '--shards', world['train'], contains='saev_nb inference --run')
    cli_in_process_fails('explore', '--run', world['run'], '--shards', world['train'], '--layer', 2, '--out', tmp_path / 'a',
                         contains='--data.layer 2')
    cli_in_process_fails('explore', '--run', world['run'], '--shards', tmp_path / 'no_shards', contains='metadata.json')
    (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
    cli_in_process_fails('explore', '--run', world['run'], '--shards', world['train'], '--features', tmp_path / 'bad.csv',
                         '--out', tmp_path / 'b', contains='missing')
    cli_in_process_fails('explore', '--run', world['run'], '--shards', world['train'], '--latents', 9999,
                         '--out', tmp_path / 'c', contains='out of range')


def test_pages_render_in_chromium(world):
    "Headless Chromium draws the overview (plots, table) and a latent page (images) with no script error."
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if chromium is None: pytest.skip('chromium is not installed: no browser check of the site')
    site = world['site']
    for page, name in ((site / 'index.html', 'overview'), (site / 'latents' / 'latent_00005.html', 'latent')):
        shot = site / f'screenshot_{name}.png'  # kept next to the site for a look
        r = subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--enable-logging=stderr',
                            f'--screenshot={shot}', '--window-size=1280,900', page.resolve().as_uri()],
                           capture_output=True, text=True, timeout=120, check=True)
        assert 'Uncaught' not in r.stderr, r.stderr[-2000:]
        img = np.asarray(Image.open(shot).convert('RGB')).astype(int)
        colourful = (img.max(2) - img.min(2)) > 60
        assert colourful.mean() > (0.005 if name == 'overview' else 0.1), (name, colourful.mean())
    # the filter: hide dense latents and keep log10 freq >= -3; the page counts the rows left and prints their command
    check = site / 'filter_check.html'
    check.write_text((site / 'index.html').read_text().replace('</body>', "<script>document.getElementById('nodense')"
                     ".checked=true;document.getElementById('f0').value='-3';applyFilter();</script></body>"))
    dom = subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--dump-dom', check.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    table = pd.read_csv(site / 'latents.csv')
    want = table[~table.dense & (np.log10(table.freq.where(table.freq > 0)) >= -3)].latent.tolist()
    assert int(re.search(r'id="nshown">(\d+)<', dom).group(1)) == len(want) and len(want) < len(table)
    cmd = re.search(r'id="cmd"[^>]*>([^<]*)<', dom).group(1)
    assert cmd.startswith('saev_nb explore --run') and cmd.split('--latents ')[1].split() == [str(l) for l in want][:200]


def test_probe1d_columns_shown_when_its_table_exists(world, tmp_path):
    "The `probe1d` benchmark's per_class.csv, found in the run's probe1d/<shards>-layer<L>/: its best class and AP per latent."
    layer = world['inf'].name.split('-')[0]
    table = world['run'] / 'probe1d' / f"{world['train'].name}-{layer}" / 'per_class.csv'
    table.parent.mkdir(parents=True)
    try:
        pd.DataFrame(dict(**{'class': [1, 2]}, name=['wall', 'sky'], latent=[4, 4], w=[1.0, 1.0], ap=[0.5, 0.8])).to_csv(table, index=False)
        r = cli_in_process('explore', '--run', world['run'], '--shards', world['train'], '--n-pages', 0, '--out', tmp_path / 's',
                           env={'TQDM_DISABLE': '1'})
        shown = pd.read_csv(Path(r.stdout.strip()) / 'latents.csv').set_index('latent')
        assert shown.loc[4, 'probe1d name'] == 'sky' and shown.loc[4, 'probe1d ap'] == 0.8 and shown['probe1d ap'].notna().sum() == 1
        assert '<th onclick="sortBy(this)">probe1d ap</th>' in (tmp_path / 's' / 'index.html').read_text()
    finally: shutil.rmtree(table.parent.parent)


def test_latent_page_lists_nearest_latents_by_decoder_cosine(world):
    "The page of latent 5 names its 8 nearest latents by decoder cosine, as numpy computes them from the checkpoint."
    from safetensors.numpy import load_file
    w = next(v for k, v in load_file(world['run'] / 'sae.safetensors').items() if k.endswith('W_dec')).astype(np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = w @ w[5]; cos[5] = -np.inf
    page = (world['site'] / 'latents' / 'latent_00005.html').read_text()
    shown = re.search(r'Nearest latents \(decoder cosine\)</h2><p>(.*?)</p>', page).group(1)
    got = [int(n) for n in re.findall(r'(?:>|;)(\d+)(?:</a>)? \(', shown)]
    assert got == list(np.argsort(-cos, kind='stable')[:8]), (got, shown)


@pytest.fixture(scope='module')
def planted_site(tmp_path_factory):
    "The planted semseg world in files (explore.planted_world_files), its inference, and its site with the probe's view."
    from saev_nb.explore import planted_world_files
    tmp = tmp_path_factory.mktemp('planted')
    run, shards, probe, planted = planted_world_files(tmp)
    cli_in_process('inference', '--run', run, '--data.shards', shards, env={'TQDM_DISABLE': '1'})
    semseg = tmp / 'semseg'  # the layout `semseg train` writes: --probe names the folder, its best-mIoU probe is read
    (semseg / 'checkpoints' / 'planted').mkdir(parents=True); (semseg / 'logs').mkdir()
    shutil.copy(probe, semseg / 'checkpoints' / 'planted' / 'probe.safetensors')
    (semseg / 'logs' / 'results.csv').write_text('probe,mean_iou\nother,0.1\nplanted,1.0\n')
    (semseg / 'checkpoints' / 'other').mkdir()  # not the best: never read
    r = cli('explore', '--run', run, '--shards', shards, '--probe', semseg, '--latents', *planted.values(), '--n-pages', 0,
            '--top-k', 3, '--out', tmp / 'site', env={'TQDM_DISABLE': '1'})
    return dict(run=run, shards=shards, planted=planted, site=Path(r.stdout.strip().splitlines()[-1]))


def test_planted_world_class_column_and_probe_change(planted_site):
    """Each planted latent: its class with purity 1.0 in the overview; on its page the probe's segmentation at x0 flips
    exactly its class's patches."""
    site, planted = planted_site['site'], planted_site['planted']
    table = pd.read_csv(site / 'latents.csv').set_index('latent')
    names = read_class_names(Metadata.load(planted_site['shards']).dataset)
    fired = {c: l for c, l in planted.items() if table.n_fire[l] > 0}
    assert len(fired) >= 4
    for c, l in fired.items():
        assert table.top_class[l] == names[c] and table.purity[l] == 1.0, (c, l, table.loc[l])
        page = site / 'latents' / f'latent_{l:05d}.html'
        for ref in html_refs(page): assert (page.parent / ref).is_file(), (page, ref)
        text = page.read_text()
        assert "The probe's segmentation as latent" in text and 'semseg/checkpoints/planted/probe.safetensors' in text
        changes = pd.read_csv(site / 'latents' / f'latent_{l:05d}' / 'probe.csv')
        x0 = changes[changes.step == 0].set_index('class')
        assert x0.n_patches[c] > 0 and x0.n_changed[c] == x0.n_patches[c]  # the planted class's patches flip
        assert x0.n_changed.drop(c).sum() == 0  # the others do not
        assert changes[changes.step > 0].n_changed.sum() == 0  # halved, as is or doubled: the class stays
        assert f'<td style="text-align:left">{names[c]}</td><td>{x0.n_patches[c]}</td><td>100%</td>' in text
    shared = sorted((site / 'img').glob('pred_*.png'))  # the probe's maps as is: once per image, shared by the pages
    pages = ''.join(p.read_text() for p in (site / 'latents').glob('latent_*.html'))
    assert shared and all(f'../img/{p.name}' in pages for p in shared)


def test_probe_bad_input_is_one_line(planted_site, tmp_path):
    "A --probe folder without probes, or a file that is not a probe: exit 2, one line naming the fix."
    args = ('explore', '--run', planted_site['run'], '--shards', planted_site['shards'], '--n-pages', 1)
    cli_in_process_fails(*args, '--probe', tmp_path / 'nothing', '--out', tmp_path / 'a', contains='logs/results.csv: missing')
    (tmp_path / 'bad.safetensors').write_text('not a probe')
    cli_in_process_fails(*args, '--probe', tmp_path / 'bad.safetensors', '--out', tmp_path / 'b', contains='bad.safetensors')
