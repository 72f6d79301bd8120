"Tests of saev_nb.evaluate: streaming metrics, sparse token activations, top-k, Pareto front, plots."
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saev_nb.evaluate import Metrics, TokenActs, csr_topk, example_max, merge_moments, pareto_mask, plot_latent_hists, plot_pareto


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
    with pytest.raises(ValueError, match='no tokens'):
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


# ---------------------------------------------------------------- inference / plots end to end (CLI)
import os, subprocess, sys
from pathlib import Path


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'saev_nb.cli', *map(str, args)], capture_output=True, text=True, timeout=300)


def _one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert 'Traceback' not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles: assert n in lines[0], lines[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "Random labelled shards and one TopK SAE trained on layer 1 by the real trainer (val = all tokens)."
    from saev_nb.shards import make_random_shards
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.sae import SAEConfig, TopK
    from saev_nb.train import TrainConfig, Vanilla, train
    tmp = tmp_path_factory.mktemp('ev')
    shards = make_random_shards(tmp / 'shards', n_examples=128, layers=(0, 1), d_model=32, content_tokens=16, labels=True)
    data = ShuffledConfig(shards=shards, layer=1, batch_size=512)
    (run,) = train(TrainConfig(train_data=data, val_data=data, sae=SAEConfig(d_model=32, d_sae=64, activation=TopK(top_k=4)), objective=Vanilla(),
                               n_train=128 * 16 * 4, n_val=128 * 16, lr=3e-3, n_lr_warmup=4, runs_root=tmp / 'runs'), progress=False)
    return tmp, shards, run


def test_inference_cli_writes_skips_and_forces(trained):
    tmp, shards, run = trained
    r = _cli('inference', '--run', run, '--data.shards', shards, '--data.layer', 1, '--data.batch-size', 512)
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out == run / 'inference' / shards.name
    for f in ('metrics.json', 'config.json', 'freqs.npy', 'mean_values.npy', 'token_acts.npz', 'histograms.png'): assert (out / f).exists(), f
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_tokens'] == 128 * 16 and m['l0'] == pytest.approx(4.0)
    # the trainer's own validation pass over the same tokens agrees with the streaming evaluation
    ev = json.loads((run / 'eval.json').read_text())
    assert m['normalized_mse'] == pytest.approx(ev['nmse'], rel=1e-5)
    acts = sp.load_npz(out / 'token_acts.npz')
    assert acts.shape == (128 * 16, 64) and np.all(np.diff(acts.indptr) == 4)
    freqs = np.load(out / 'freqs.npy')
    np.testing.assert_allclose(freqs, (acts.toarray() != 0).mean(0), rtol=1e-6)
    # rerun: skipped, files untouched; --force: recomputed (in-process, same function the CLI calls)
    from saev_nb.evaluate import InferenceConfig, inference_cli
    from saev_nb.loaders import OrderedConfig
    cfg = InferenceConfig(run=run, data=OrderedConfig(shards=shards, layer=1, batch_size=512))
    mtime = (out / 'metrics.json').stat().st_mtime_ns
    assert inference_cli(cfg) == out and (out / 'metrics.json').stat().st_mtime_ns == mtime
    assert inference_cli(InferenceConfig(run=run, data=cfg.data, force=True)) == out and (out / 'metrics.json').stat().st_mtime_ns != mtime


def test_inference_ignore_labels(trained):
    from saev_nb.evaluate import InferenceConfig, inference
    from saev_nb.loaders import OrderedConfig
    from saev_nb.shards import open_labels
    tmp, shards, run = trained
    out = inference(InferenceConfig(run=run, data=OrderedConfig(shards=shards, layer=1, batch_size=512), ignore_labels=(0, 3)), progress=False)
    labels = np.asarray(open_labels(shards)).ravel()
    ignored = np.isin(labels, [0, 3])
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_tokens'] == int((~ignored).sum())
    acts = sp.load_npz(out / 'token_acts.npz')
    assert acts[np.flatnonzero(ignored)].nnz == 0 and np.all(np.diff(acts.indptr)[~ignored] == 4)
    np.testing.assert_allclose(np.load(out / 'freqs.npy'), (acts.toarray()[~ignored] != 0).mean(0), rtol=1e-6)
    assert json.loads((out / 'config.json').read_text())['ignore_labels'] == [0, 3]


def _inproc_error(fn, cfg, *needles):
    with pytest.raises(SystemExit) as e: fn(cfg)
    msg = str(e.value.code)
    assert '\n' not in msg, msg
    for n in needles: assert n in msg, msg


def test_inference_bad_input_one_line(trained, tmp_path):
    from saev_nb.evaluate import InferenceConfig, inference_cli
    from saev_nb.loaders import OrderedConfig
    from saev_nb.shards import make_random_shards
    tmp, shards, run = trained
    (tmp_path / 'empty_run').mkdir()
    _one_line_error(_cli('inference', '--run', tmp_path / 'empty_run', '--data.shards', shards, '--data.layer', 1), 'sae.safetensors')
    cfg = lambda run, shards, layer: InferenceConfig(run=run, data=OrderedConfig(shards=shards, layer=layer, batch_size=512))
    _inproc_error(inference_cli, cfg(tmp_path / 'nope', shards, 1), 'run directory not found')
    _inproc_error(inference_cli, cfg(run, shards, 0), 'trained on layer 1', '--data.layer 1')
    narrow = make_random_shards(tmp_path / 'shards', n_examples=8, layers=(1,), d_model=16, content_tokens=16)
    _inproc_error(inference_cli, cfg(run, narrow, 1), 'd_model 16', 'd_model 32')
    _inproc_error(inference_cli, cfg(run, tmp_path / 'no_shards', 1), 'metadata.json')
    _inproc_error(inference_cli, InferenceConfig(run=run, data=OrderedConfig(shards=make_random_shards(tmp_path / 's2', n_examples=8, layers=(1,), d_model=32, labels=False), layer=1), ignore_labels=(0,)), 'no labels.bin')


def test_plots_cli(trained, tmp_path):
    tmp, shards, run = trained
    from saev_nb.evaluate import InferenceConfig, inference
    from saev_nb.loaders import OrderedConfig
    inference(InferenceConfig(run=run, data=OrderedConfig(shards=shards, layer=1, batch_size=512)), progress=False)
    r = _cli('plots', '--runs', tmp / 'runs', '--out', tmp_path / 'plots')
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    import pandas as pd
    df = pd.read_csv(out / 'runs.csv')
    assert len(df) >= 1 and {'run', 'l0', 'normalized_mse', 'on_front', 'cfg.lr'} <= set(df.columns)
    for f in ('pareto.png', 'histograms.png'): assert (out / f).read_bytes()[:4] == b'\x89PNG'
    from saev_nb.evaluate import PlotsConfig, plots_cli
    _inproc_error(plots_cli, PlotsConfig(runs=(tmp_path / 'empty',), out=tmp_path / 'p2'), 'no finished evaluation')
