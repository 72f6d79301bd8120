"Tests of saev_nb.evaluate (streaming metrics, sparse token activations, top-k, inference) and saev_nb.plots (Pareto front, sweep plots)."
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saev_nb.core import UserError
from saev_nb.evaluate import TokenActs, csr_topk, example_max, plot_latent_hists
from saev_nb.plots import pareto_mask, plot_pareto
from saev_nb.metrics import Metrics, merge_moments


def _batches(n, size, *ts):
    for s in torch.arange(n).split(size): yield tuple(t[s] for t in ts)


@pytest.mark.parametrize('offset', [0.0, 1e3])
def test_metrics_match_independent_computation(offset):
    g = torch.Generator().manual_seed(0)
    n, d, s = 1000, 12, 48
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 4, d) + offset
    x_hat = x + 0.2 * torch.randn(n, d, generator=g) - 0.05
    f = torch.relu(torch.randn(n, s, generator=g) - 1.2)
    f[:, :3] = 0  # three dead latents
    keep = torch.rand(n, generator=g) > 0.25
    m = Metrics(d, s)
    for xb, xhb, fb, kb in _batches(n, 137, x, x_hat, f, keep): m.update(xb, xhb, fb, kb)
    out = m.summary()
    xk, rk, fk = x[keep].double(), (x - x_hat)[keep].double(), f[keep].double()
    sst = ((xk - xk.mean(0)) ** 2).sum().item()
    sse = (rk ** 2).sum().item()
    assert out['n_tokens'] == int(keep.sum())
    assert out['normalized_mse'] == pytest.approx(sse / sst, rel=1e-6)
    assert out['mse_per_dim'] == pytest.approx(sse / (len(xk) * d), rel=1e-9)
    assert out['mse_per_token'] == pytest.approx(sse / len(xk), rel=1e-9)
    assert out['explained_variance'] == pytest.approx(1 - ((rk - rk.mean(0)) ** 2).sum().item() / sst, rel=1e-6)
    assert out['l0'] == pytest.approx((fk > 0).sum(1).double().mean().item(), rel=1e-12)
    assert out['l1'] == pytest.approx(fk.sum(1).mean().item(), rel=1e-9)
    freqs = (fk > 0).double().mean(0).numpy()
    np.testing.assert_allclose(m.freqs, freqs, rtol=1e-12)
    mv = (fk.sum(0) / (fk > 0).sum(0)).numpy()
    np.testing.assert_allclose(m.mean_values[3:], mv[3:], rtol=1e-9)
    assert np.isnan(m.mean_values[:3]).all()
    assert out['n_dead'] == 3 and out['n_almost_dead'] == 3
    assert out['n_dense'] == int((freqs > 1e-2).sum())
    json.dumps(out)  # JSON-ready


def test_nmse_perfect_and_mean_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(700, 8, generator=g) * 2 + 3
    f = torch.relu(torch.randn(700, 16, generator=g))
    perfect = Metrics(8, 16)
    mean_only = Metrics(8, 16)
    mu = x.double().mean(0).float()
    for xb, fb in _batches(700, 64, x, f):
        perfect.update(xb, xb, fb)
        mean_only.update(xb, mu.expand_as(xb), fb)
    assert perfect.summary()['normalized_mse'] == 0.0
    assert mean_only.summary()['normalized_mse'] == pytest.approx(1.0, abs=1e-6)
    assert mean_only.summary()['explained_variance'] == pytest.approx(0.0, abs=1e-6)


def test_sst_numerically_careful_with_large_mean():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(20_000, 4, generator=g, dtype=torch.float64) + 1e6).float()
    n, mean, m2 = 0, torch.zeros(4, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for (xb,) in _batches(len(x), 3001, x): n, mean, m2 = merge_moments(n, mean, m2, xb)
    xd = x.double()
    exact = ((xd - xd.mean(0)) ** 2).sum().item()
    assert m2.item() == pytest.approx(exact, rel=1e-9)


def test_thresholds_and_empty():
    f = torch.zeros(10_000, 3)
    f[:, 0] = 1.0  # dense
    f[:50, 1] = 2.0  # freq 5e-3: neither
    m = Metrics(2, 3, almost_dead=1e-7, dense=1e-2).update(torch.randn(10_000, 2), torch.zeros(10_000, 2), f)
    s = m.summary()
    assert (s['n_dead'], s['n_almost_dead'], s['n_dense']) == (1, 1, 1)
    with pytest.raises(UserError, match="no tokens"):
        Metrics(2, 3).update(torch.randn(4, 2), torch.randn(4, 2), torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool)).summary()


def test_token_acts_rows_match_dense():
    g = torch.Generator().manual_seed(3)
    n_ex, tpe, s = 20, 9, 30
    f = torch.relu(torch.randn(n_ex * tpe, s, generator=g) - 1)
    keep = torch.rand(n_ex * tpe, generator=g) > 0.3
    ex = torch.arange(n_ex).repeat_interleave(tpe)
    tok = torch.arange(tpe).repeat(n_ex)
    ta = TokenActs(n_ex * tpe, s)
    for exb, tokb, fb, kb in _batches(n_ex * tpe, 50, ex, tok, f, keep): ta.update(exb * tpe + tokb, fb, kb)
    acts = ta.to_csr()
    assert isinstance(acts, sp.csr_matrix) and acts.shape == (n_ex * tpe, s)
    np.testing.assert_array_equal(acts.toarray(), (f * keep[:, None]).numpy())
    assert acts[(~keep).nonzero()[0].numpy()].nnz == 0
    with pytest.raises(IndexError, match='row index out of range'):
        TokenActs(3, s).update(torch.tensor([5]), f[:1]).to_csr()


@pytest.mark.parametrize('k', [1, 4, 25])
def test_csr_topk_against_brute_force(k):
    rng = np.random.default_rng(k)
    dense = rng.uniform(size=(400, 37)).astype(np.float32)
    dense[rng.uniform(size=dense.shape) > 0.06] = 0
    dense = np.round(dense * 8) / 8  # ties
    vals, rows = csr_topk(sp.csr_matrix(dense), k)
    assert vals.shape == rows.shape == (37, k)
    for c in range(37):
        nz = np.flatnonzero(dense[:, c])
        order = nz[np.lexsort((nz, -dense[nz, c]))][:k]
        np.testing.assert_array_equal(rows[c, :len(order)], order)
        np.testing.assert_array_equal(vals[c, :len(order)], dense[order, c])
        assert (rows[c, len(order):] == -1).all() and (vals[c, len(order):] == 0).all()


def test_example_max():
    rng = np.random.default_rng(0)
    dense = rng.uniform(size=(12 * 7, 5)) * (rng.uniform(size=(12 * 7, 5)) < 0.2)
    np.testing.assert_array_equal(example_max(sp.csr_matrix(dense), 7).toarray(), dense.reshape(12, 7, 5).max(1))


def test_pareto_mask_brute_force():
    rng = np.random.default_rng(1)
    l0, nmse = rng.uniform(1, 50, 300), rng.uniform(0, 1, 300)
    brute = np.array([not np.any((l0 <= a) & (nmse <= b) & ((l0 < a) | (nmse < b))) for a, b in zip(l0, nmse)])
    np.testing.assert_array_equal(pareto_mask(l0, nmse), brute)


def test_plots_write_png(tmp_path):
    import pandas as pd
    df = pd.DataFrame(dict(run=['a', 'b', 'c'], l0=[1.0, 5.0, 20.0], normalized_mse=[0.5, 0.6, 0.1]))
    plot_pareto(df, tmp_path / 'p.png')
    freqs = np.array([0, 1e-3, 1e-2, 0.5]); mv = np.array([np.nan, 1.0, 2.0, 0.3])
    plot_latent_hists(freqs, mv, 'x', tmp_path / 'h.png')
    for f in ('p.png', 'h.png'): assert (tmp_path / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------- inference / plots end to end (installed CLI)
import os, shutil, subprocess
from pathlib import Path

import pandas as pd
from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails, tiny_shards


def _train(shards, layer, runs_root, d_model, sweep=None, **kw):
    "Train tiny TopK SAEs in-process with the real trainer (a sweep file gives several runs in one data pass)."
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.sae import SAEConfig, TopK
    from saev_nb.runs import TrainConfig
    from saev_nb.sae import Vanilla
    from saev_nb.train import train
    data = ShuffledConfig(shards=shards, layer=layer, batch_size=512)
    cfg = TrainConfig(train_data=data, val_data=data, sae=SAEConfig(d_model=d_model, d_sae=64, activation=TopK(top_k=4)), objective=Vanilla(),
                      n_train=kw.pop('n_train', 128 * 16 * 4), n_val=kw.pop('n_val', 128 * 16), lr=3e-3, n_lr_warmup=1, runs_root=runs_root, sweep=sweep, **kw)
    return train(cfg, progress=False)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "Random labelled shards (layers 0, 1) and two TopK SAEs (a two-point lr sweep) trained on layer 1; val = all tokens."
    from saev_nb.shards import make_random_shards
    tmp = tmp_path_factory.mktemp('ev')
    shards = make_random_shards(tmp / 'shards', n_examples=128, layers=(0, 1), d_model=32, content_tokens=16, labels=True)
    (tmp / 'sweep.toml').write_text('lr = [3e-3, 1e-3]\n')
    runs = _train(shards, 1, tmp / 'runs', 32, sweep=tmp / 'sweep.toml')
    assert len(runs) == 2
    return tmp, shards, runs


def _key_dir(run, shards, key='layer1-content'):
    return run / 'inference' / shards.name / key


def test_inference_cli_writes_skips_and_forces(trained):
    tmp, shards, (run, _) = trained
    r = cli('inference', '--run', run, '--data.shards', shards, '--data.layer', 1, '--data.batch-size', 512)
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out == _key_dir(run, shards) and len(r.stdout.strip().splitlines()) == 2
    for f in ('metrics.json', 'config.json', 'freqs.npy', 'mean_values.npy', 'token_acts.npz', 'histograms.png'): assert (out / f).exists(), f
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_tokens'] == 128 * 16 and m['l0'] == pytest.approx(4.0)
    # the summary line before the path: NMSE, L0, dead, dense (item 13 of issue 22)
    summary = r.stdout.strip().splitlines()[0]
    assert summary.startswith(f"{run.name}: nmse={m['normalized_mse']:.4f}  l0=4.0  dead={m['n_dead']}  dense={m['n_dense']}"), summary
    # the trainer's own validation pass over the same tokens agrees with the streaming evaluation
    ev = json.loads((run / 'eval.json').read_text())
    assert m['normalized_mse'] == pytest.approx(ev['nmse'], rel=1e-5)
    acts = sp.load_npz(out / 'token_acts.npz')
    assert acts.shape == (128 * 16, 64) and np.all(np.diff(acts.indptr) == 4)
    np.testing.assert_allclose(np.load(out / 'freqs.npy'), (acts.toarray() != 0).mean(0), rtol=1e-6)
    # rerun: says it skips and why, files untouched; --force recomputes
    mtime = (out / 'metrics.json').stat().st_mtime_ns
    r = cli_in_process('inference', '--run', run, '--data.shards', shards, '--data.layer', 1)
    assert r.stderr.strip().splitlines()[-1] == (f'{out}: already evaluated on {shards.name[:8]} (layer 1, content tokens, '
                                                 'ignore_labels []); skipping (--force redoes it)')  # the one skip line
    assert Path(r.stdout.strip().splitlines()[-1]) == out and (out / 'metrics.json').stat().st_mtime_ns == mtime
    assert r.stdout.startswith(f'{run.name}: nmse=')  # a skipped evaluation still says its numbers
    cli_in_process('inference', '--run', run, '--data.shards', shards, '--force')
    assert (out / 'metrics.json').stat().st_mtime_ns != mtime


def test_inference_layer_defaults_and_negative_layers(trained):
    "No --data.layer: the training layer; -1 resolves as `shards --layers` does (here the last recorded block, no model)."
    tmp, shards, (run, _) = trained
    assert Path(cli_in_process('inference', '--run', run, '--data.shards', shards).stdout.strip().splitlines()[-1]) == _key_dir(run, shards)
    assert Path(cli_in_process('inference', '--run', run, '--data.shards', shards, '--data.layer', -1).stdout.strip().splitlines()[-1]) == _key_dir(run, shards)
    cli_in_process_fails('inference', '--run', run, '--data.shards', shards, '--data.layer', -2, contains='trained on layer 1, but --data.layer is -2 (block 0)')


def test_inference_negative_layer_uses_the_models_blocks(tmp_path):
    "On shards of the tiny ViT (4 blocks, layers 2 and 3 recorded) -1 is block 3 and -2 block 2, the model's own resolver."
    from saev_nb.models import load_vit
    from saev_nb.shards import Metadata
    d = tiny_shards(tmp_path)
    md = Metadata.load(d['train'])
    vit = load_vit(md.family, md.ckpt)
    assert [md.resolve_layer(l) for l in (-1, -2)] == list(vit.resolve_layers([-1, -2]))[::-1] == [3, 2]
    (run,) = _train(d['train'], 3, tmp_path / 'runs', md.d_model, n_train=48 * 64 * 2, n_val=1024)
    out = Path(cli_in_process('inference', '--run', run, '--data.shards', d['val'], '--data.layer', -1).stdout.strip().splitlines()[-1])
    assert out == run / 'inference' / d['val'].name / 'layer3-content'
    cli_in_process_fails('inference', '--run', run, '--data.shards', d['val'], '--data.layer', -2, contains='--data.layer is -2 (block 2); pass --data.layer 3')
    cli_in_process_fails('inference', '--run', run, '--data.shards', d['val'], '--data.layer', -5, contains='out of range for 4 blocks')


def test_inference_several_runs_in_one_call(trained):
    tmp, shards, runs = trained
    r = cli_in_process('inference', '--run', *runs, '--data.shards', shards, '--ignore-labels', 2)
    lines = r.stdout.strip().splitlines()
    outs = [Path(l) for l in lines[len(runs):]]  # a summary line per run, then the folders
    assert outs == [_key_dir(p, shards, 'layer1-content-ignore2') for p in runs]
    assert [l.split(':')[0] for l in lines[:len(runs)]] == [p.name for p in runs]
    assert all((o / 'metrics.json').exists() for o in outs)
    # one bad run in the list stops the call before any work
    (tmp / 'runs' / 'unfinished').mkdir(exist_ok=True)
    cli_in_process_fails('inference', '--run', runs[0], tmp / 'runs' / 'unfinished', '--data.shards', shards, '--ignore-labels', 3, contains='unfinished/sae.safetensors: missing')
    assert not _key_dir(runs[0], shards, 'layer1-content-ignore3').exists()


def test_inference_outputs_keyed_by_settings(trained):
    "Other ignore_labels, tokens or thresholds write next to the earlier results instead of overwriting them."
    from saev_nb.shards import open_labels
    tmp, shards, (run, _) = trained
    base = Path(cli_in_process('inference', '--run', run, '--data.shards', shards).stdout.strip().splitlines()[-1])
    before = (base / 'metrics.json').read_bytes()
    out = Path(cli_in_process('inference', '--run', run, '--data.shards', shards, '--ignore-labels', 0, 3).stdout.strip().splitlines()[-1])
    assert out == _key_dir(run, shards, 'layer1-content-ignore0_3') and (base / 'metrics.json').read_bytes() == before
    labels = np.asarray(open_labels(shards)).ravel()
    ignored = np.isin(labels, [0, 3])
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_tokens'] == int((~ignored).sum())
    acts = sp.load_npz(out / 'token_acts.npz')
    assert acts[np.flatnonzero(ignored)].nnz == 0 and np.all(np.diff(acts.indptr)[~ignored] == 4)
    np.testing.assert_allclose(np.load(out / 'freqs.npy'), (acts.toarray()[~ignored] != 0).mean(0), rtol=1e-6)
    assert json.loads((out / 'config.json').read_text())['ignore_labels'] == [0, 3]
    thr = Path(cli_in_process('inference', '--run', run, '--data.shards', shards, '--dense', 0.5, '--no-save-acts').stdout.strip().splitlines()[-1])
    assert thr.name == 'layer1-content-dead1e-07-dense0.5' and (base / 'metrics.json').read_bytes() == before


def test_content_sae_on_cls_tokens_refused_or_flagged(trained):
    tmp, shards, (run, _) = trained
    cli_in_process_fails('inference', '--run', run, '--data.shards', shards, '--data.tokens', 'cls', contains='trained on content tokens, but --data.tokens is cls')
    r = cli_in_process('inference', '--run', run, '--data.shards', shards, '--data.tokens', 'cls', '--other-tokens')
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out.name == 'layer1-cls' and 'warning' in r.stderr
    m = json.loads((out / 'metrics.json').read_text())
    assert m['flag'] == 'SAE trained on content tokens, evaluated on cls tokens' and m['n_tokens'] == 128


def test_inference_bad_input_one_line(trained, tmp_path):
    from saev_nb.evaluate import InferenceConfig, EvalDataConfig, inference
    from saev_nb.shards import make_random_shards
    tmp, shards, (run, _) = trained
    (tmp_path / 'empty_run').mkdir()
    cli_fails('inference', '--run', tmp_path / 'empty_run', '--data.shards', shards, contains='sae.safetensors: missing')
    narrow = make_random_shards(tmp_path / 'shards', n_examples=8, layers=(1,), d_model=16, content_tokens=16)
    cli_in_process_fails('inference', '--run', run, '--data.shards', narrow, contains='d_model=16 but the SAE')
    # the same checks in-process (the CLI turns each UserError into the one line above)
    no_labels = make_random_shards(tmp_path / 's2', n_examples=8, layers=(1,), d_model=32, labels=False)
    cfg = lambda r, s, **kw: InferenceConfig(run=r, data=EvalDataConfig(shards=s, **kw.pop('data', {})), **kw)
    with pytest.raises(UserError, match='run directory not found'): inference(cfg(tmp_path / 'nope', shards))
    with pytest.raises(UserError, match=r'trained on layer 1, but --data.layer is 0; pass --data.layer 1'): inference(cfg(run, shards, data=dict(layer=0)))
    with pytest.raises(UserError, match='metadata.json'): inference(cfg(run, tmp_path / 'no_shards'))
    with pytest.raises(UserError, match='no labels.bin'): inference(cfg(run, no_labels, ignore_labels=(0,)))


def _mount_tmpfs(dpath, kb):
    dpath.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which('mount') is None: pytest.skip('a full disk is simulated with a small tmpfs mount, which needs root')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kb}k', 'tmpfs', str(dpath)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'cannot mount a tmpfs here ({r.stderr.strip()}): no full-disk test')


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / 'small_disk'
    _mount_tmpfs(mnt, 64)
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)


def test_inference_on_full_disk_says_disk_full(trained, small_disk):
    tmp, shards, (run, _) = trained
    run_copy = small_disk / run.name
    shutil.copytree(run, run_copy, ignore=shutil.ignore_patterns('inference', 'checkpoint.pt', 'metrics.jsonl'))
    line = cli_fails('inference', '--run', run_copy, '--data.shards', shards, contains='disk full', env={'TQDM_DISABLE': '1'})  # no progress bar before the line
    assert str(run_copy / 'inference') in line


def test_train_on_full_disk_says_disk_full(trained, small_disk):
    tmp, shards, _ = trained
    sae = dict(d_model=32, d_sae=2048)  # 2 x 32 x 2048 float32 = 512 KB of weights: no room on a 64 KB disk
    line = cli_fails('train', '--train-data.shards', shards, '--train-data.layer', 1, '--val-data.shards', shards, '--val-data.layer', 1,
                     '--train-data.batch-size', 512, '--val-data.batch-size', 512, '--n-train', 4096, '--n-val', 512, '--sae.d-model', sae['d_model'], '--sae.d-sae', sae['d_sae'],
                     '--n-lr-warmup', 2, '--runs-root', small_disk / 'runs', '--ckpt-every', 2, 'objective:vanilla', contains='disk full', env={'TQDM_DISABLE': '1'})
    assert str(small_disk / 'runs') in line


def test_plots_cli_names_runs_by_swept_values(trained, tmp_path):
    from saev_nb.plots import PlotsConfig, collect_runs, eval_title, plot_pareto
    tmp, shards, runs = trained
    cli_in_process('inference', '--run', *runs, '--data.shards', shards)
    (tmp / 'runs' / 'unfinished').mkdir(exist_ok=True)
    (tmp / 'runs' / 'unfinished' / 'config.json').write_text('{}')
    r = cli_in_process('plots', '--runs', tmp / 'runs', '--out', tmp_path / 'plots')
    out = Path(r.stdout.strip().splitlines()[-1])
    assert 'skipped unfinished: not finished' in r.stderr and 'swept: lr' in r.stderr
    df = pd.read_csv(out / 'runs.csv')
    assert {'run', 'label', 'swept', 'evaluated', 'l0', 'normalized_mse', 'on_front', 'cfg.lr'} <= set(df.columns)
    plain = df[df.key == 'layer1-content'].sort_values('cfg.lr')
    assert list(plain.label) == [f'{runs[1].name}  lr=0.001', f'{runs[0].name}  lr=0.003'] and set(df.swept) == {'lr'}
    assert set(plain.evaluated) == {f'{shards.name[:8]}, layer 1, content tokens'}
    assert any(f.startswith('pareto') and f.endswith('.png') for f in os.listdir(out)) and (out / 'histograms.png').read_bytes()[:4] == b'\x89PNG'
    # the legend shows each run's swept values and the title the shards and the layer
    fig = plot_pareto(plain, title=eval_title(plain))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(any(l.startswith(lab) for l in legend) for lab in plain.label)
    assert 'layer 1' in fig.axes[0].get_title() and shards.name[:8] in fig.axes[0].get_title()
    cli_fails('plots', '--runs', tmp_path / 'empty', '--out', tmp_path / 'p2', contains='no finished run')


def test_plots_falls_back_to_eval_json(tmp_path):
    "Runs that were trained but never evaluated are shown with the trainer's eval.json numbers, and plots says so."
    from saev_nb.shards import make_random_shards
    shards = make_random_shards(tmp_path / 'shards', n_examples=64, layers=(1,), d_model=32, content_tokens=16)
    (tmp_path / 'sweep.toml').write_text('seed = [1, 2]\n')
    runs = _train(shards, 1, tmp_path / 'runs', 32, sweep=tmp_path / 'sweep.toml', n_train=64 * 16 * 2, n_val=512)
    r = cli('plots', '--runs', tmp_path / 'runs', '--out', tmp_path / 'plots')
    assert "showing their trainer's validation numbers (eval.json)" in r.stderr
    df = pd.read_csv(tmp_path / 'plots' / 'runs.csv')
    assert set(df.source) == {'eval.json'} and len(df) == 2 and set(df.swept) == {'seed'}
    assert sorted(df.normalized_mse) == sorted(json.loads((p / 'eval.json').read_text())['nmse'] for p in runs)


def test_slurm_flags_without_slurm_are_one_line(trained):
    "With --slurm-acct where no sbatch is on PATH, inference and train stop before any work with one line."
    import sys
    tmp, shards, (run, _) = trained
    env = {'PATH': str(Path(sys.executable).parent)}  # the venv only: no sbatch
    cli_fails('inference', '--run', run, '--data.shards', shards, '--data.tokens', 'all', '--other-tokens', '--slurm-acct', 'acct',
              env=env, contains='Slurm is not available here (no sbatch on PATH)')
    assert not _key_dir(run, shards, 'layer1-all').exists()


# ---------------------------------------------------------------- issue 22: saev checkpoints, summaries, readable plots
def test_inference_on_a_saev_checkpoint_file_or_its_folder(trained, tmp_path):
    "`--run` takes a saev `sae.pt` (the file, or a folder holding only it): results beside it, the run's own numbers."
    from saev_nb.sae import save_saev_checkpoint
    from saev_nb.runs import load_run
    tmp, shards, (run, _) = trained
    pt = save_saev_checkpoint(load_run(run).sae, tmp_path / 'saev' / 'sae.pt')
    r = cli('inference', '--run', pt, '--data.shards', shards, '--data.layer', 1, '--data.batch-size', 512)
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out == tmp_path / 'saev' / 'inference' / shards.name / 'layer1-content'
    m = json.loads((out / 'metrics.json').read_text())
    assert r.stdout.startswith(f"saev: nmse={m['normalized_mse']:.4f}")
    ours = json.loads((Path(cli_in_process('inference', '--run', run, '--data.shards', shards).stdout.strip().splitlines()[-1]) / 'metrics.json').read_text())
    assert m['normalized_mse'] == pytest.approx(ours['normalized_mse'], rel=1e-6) and m['l0'] == pytest.approx(ours['l0'])
    info = json.loads((out / 'config.json').read_text())
    assert info['run'] == str((tmp_path / 'saev').resolve()) and info['sae'] == str(pt.resolve())
    # the folder that holds it works the same (finished: skipped), and a checkpoint alone must be told its layer
    r = cli_in_process('inference', '--run', pt.parent, '--data.shards', shards, '--data.layer', 1)
    assert Path(r.stdout.strip().splitlines()[-1]) == out and 'already evaluated' in r.stderr
    cli_fails('inference', '--run', pt, '--data.shards', shards, contains='sae.pt: a checkpoint without a training config names no layer')
    (tmp_path / 'nothing').mkdir()
    cli_in_process_fails('inference', '--run', tmp_path / 'nothing', '--data.shards', shards, contains='or pass a checkpoint file')


def test_plots_of_a_guide_like_sweep_are_readable(tmp_path):
    """Six runs of a guide-like sweep (two widths x three coefficients, `[data] scale_mean`) beside one run of another
    command (width from exp_factor): the legend is beside the axes, the axes keep most of the figure, and the labels
    name only what differs: no NaN, no `val_data` twin of a `train_data` key."""
    from saev_nb.plots import collect_runs, layout_report, plot_pareto, plot_sweep_hists
    from saev_nb.shards import make_random_shards
    shards = make_random_shards(tmp_path / 'shards', n_examples=64, layers=(1,), d_model=32, content_tokens=16)
    (tmp_path / 'guide.toml').write_text('[sae]\nsparsity_coeff = [1e-4, 2e-4, 3e-4]\nd_sae = [64, 128]\n[data]\nscale_mean = true\n')
    runs = _train(shards, 1, tmp_path / 'runs', 32, sweep=tmp_path / 'guide.toml', n_train=64 * 16 * 2, n_val=512)
    assert len(runs) == 6
    from dataclasses import replace
    from saev_nb.runs import load_run_config
    from saev_nb.train import train
    c = load_run_config(runs[0])  # another command: no sweep, raw activations, its width from exp_factor (d_sae unset)
    train(replace(c, sweep=None, sae=replace(c.sae, d_sae=None, exp_factor=2), objective=replace(c.objective, sparsity_coeff=4e-4),
                  train_data=replace(c.train_data, scale_mean=False), val_data=replace(c.val_data, scale_mean=False)), progress=False)
    cli_in_process('inference', '--run', *(tmp_path / 'runs').iterdir(), '--data.shards', shards)
    r = cli('plots', '--runs', tmp_path / 'runs', '--out', tmp_path / 'plots')
    out = Path(r.stdout.strip().splitlines()[-1])
    df = pd.read_csv(out / 'runs.csv')
    assert len(df) == 7 and set(df.swept) == {'train_data.scale_mean, objective.sparsity_coeff, d_sae'}, set(df.swept)
    for lab in df.label:
        assert 'nan' not in lab and 'val_data' not in lab and 'exp_factor' not in lab, lab
    assert {l.split('  ', 1)[1] for l in df.label if 'd_sae=128' in l} == {
        f'scale_mean=True, sparsity_coeff={c}, d_sae=128' for c in ('0.0001', '0.0002', '0.0003')}
    assert any(l.endswith('scale_mean=False, sparsity_coeff=0.0004, d_sae=64') for l in df.label)  # the other command's run
    # the figures: the legend beside the axes, never over them; the axes hold at least half of the figure
    df = collect_runs([tmp_path / 'runs'])
    for fig in (plot_pareto(df, title='a title'), plot_sweep_hists(df, title='a title')):
        lay = layout_report(fig)
        assert not lay['legend_overlaps'] and lay['inside'] and lay['axes_frac'] >= 0.5, lay
    from PIL import Image
    w, h = Image.open(out / 'pareto.png').size
    assert 600 <= w <= 1800 and 400 <= h <= 800, (w, h)  # a figure sized for its axes and legend, not a 20 px strip


# ---------------------------------------------------------------- issue 24: inference is a resumable `core.Step`
def test_inference_settings_written_last_and_compared_key_by_key(trained):
    """config.json holds the settings (compared key by key) and the description (not compared); without it, or with
    another setting in it, the folder is not finished and is recomputed; the results are the same bytes."""
    tmp, shards, (run, _) = trained
    out = Path(cli_in_process('inference', '--run', run, '--data.shards', shards).stdout.strip().splitlines()[-1])
    info = json.loads((out / 'config.json').read_text())
    assert {'layer', 'tokens', 'ignore_labels', 'tokens_per_example', 'n_examples', 'run', 'shards', 'sae', 'd_sae'} <= set(info)
    before = {f: (out / f).read_bytes() for f in ('metrics.json', 'token_acts.npz', 'freqs.npy')}
    (out / 'config.json').write_text(json.dumps({**info, 'run': 'moved elsewhere'}))  # the description is not compared
    assert 'skipping' in cli_in_process('inference', '--run', run, '--data.shards', shards).stderr
    (out / 'config.json').unlink()  # as a run stopped before its last write leaves it
    r = cli_in_process('inference', '--run', run, '--data.shards', shards)
    assert 'skipping' not in r.stderr and json.loads((out / 'config.json').read_text()) == info
    assert {f: (out / f).read_bytes() for f in before} == before
    (out / 'config.json').write_text(json.dumps({**info, 'n_examples': 7}))  # other settings: not this evaluation
    assert 'skipping' not in cli_in_process('inference', '--run', run, '--data.shards', shards).stderr
    assert json.loads((out / 'config.json').read_text()) == info


def test_plots_moved_to_their_own_module():
    "The sweep plots live in saev_nb.plots, their one home (the command line names it); evaluate holds inference only."
    import saev_nb.evaluate as evaluate, saev_nb.plots as plots
    from saev_nb.cli import COMMANDS
    assert not hasattr(evaluate, 'plots_cli') and not hasattr(evaluate, 'PlotsConfig')
    assert COMMANDS['plots'][0] == 'saev_nb.plots:plots_cli' and callable(plots.plots_cli)
