"1-D probe benchmark: every definition against an independent implementation, and `saev_nb probe1d` end to end."
import json, shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize

from saev_nb.probe1d import (Codes, KMeansCoder, average_precision, benchmark_method, fit_kmeans, fit_pca,
                             fit_probes, prevalence, probe_grads, purity_at, score_probes)
from helpers import cli, cli_fails, data_sae_run, tiny_shards


def ap_brute(s, y):
    "AP over distinct thresholds, in plain Python (sklearn's definition: a tie group is one threshold)."
    if y.sum() == 0: return 0.
    out, prev = 0., 0.
    for t in sorted(set(s.tolist()), reverse=True):
        sel = s >= t; tp = (y & sel).sum(); r = tp / y.sum(); out += (r - prev) * tp / sel.sum(); prev = r
    return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ap_with_ties_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 6, (5, 60), generator=g).double(); y = torch.rand(5, 60, generator=g) < 0.25
    y[4] = False  # a class without positives scores 0
    want = [ap_brute(s[i].numpy(), y[i].numpy()) for i in range(5)]
    np.testing.assert_allclose(average_precision(s, y).numpy(), want, atol=1e-12)
    try: from sklearn.metrics import average_precision_score
    except ImportError: return
    np.testing.assert_allclose(average_precision(s, y).numpy()[:4],
                               [average_precision_score(y[i].numpy(), s[i].numpy()) for i in range(4)], atol=1e-12)


def planted(n, seed):
    "Six latents: three noisy, overlapping class detectors (none separates its class) and three random ones."
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    f = np.zeros((n, 6))
    for c in range(3):
        fires = (y == c) & (rng.random(n) < 0.8) | (y != c) & (rng.random(n) < 0.15)
        f[fires, c] = rng.gamma(2., 1., fires.sum()) + (y[fires] == c)
    f[:, 3:] = np.maximum(rng.normal(size=(n, 3)) - 0.5, 0)
    return f, y


def fit_brute(f, y, lam=1e-8):
    "Each (latent, class) probe by scipy's BFGS on the penalized objective, from w = 0, b = b0: loops, numpy."
    d, C = f.shape[1], 3
    W, B, L = np.zeros((d, C)), np.zeros((d, C)), np.zeros((d, C))
    for c in range(C):
        yc = (y == c).astype(float); b0 = np.log(yc.mean() / (1 - yc.mean()))
        for j in range(d):
            x = f[:, j]
            bce = lambda p: np.mean(np.logaddexp(0, p[1] + p[0] * x) - yc * (p[1] + p[0] * x))
            obj = lambda p: bce(p) + lam / 2 * (p[0] ** 2 + (p[1] - b0) ** 2)
            r = minimize(obj, [0., b0], method='BFGS', options={'gtol': 1e-10})
            W[j, c], B[j, c], L[j, c] = r.x[0], r.x[1], bce(r.x)
    return W, B, L


def test_probes_match_independent_implementation():
    (ft, yt), (fv, yv) = planted(600, 0), planted(300, 1)
    pr = fit_probes(Codes.from_dense(torch.tensor(ft)), torch.tensor(yt), 3)
    assert pr.max_grad < 1e-8
    W, B, L = fit_brute(ft, yt)
    np.testing.assert_allclose(pr.train_loss.numpy(), L, atol=1e-6)
    df, summ = score_probes(pr, Codes.from_dense(torch.tensor(fv)), torch.tensor(yv), 3)
    latent = L.argmin(0)
    assert df.latent.tolist() == latent.tolist() == [0, 1, 2]
    val_loss, ap, purity = [], [], []
    for c, j in enumerate(latent):
        yc = (yv == c); z = B[j, c] + W[j, c] * fv[:, j]
        val_loss.append(np.mean(np.logaddexp(0, z) - yc * z))
        ap.append(ap_brute(z, yc))
        fires = np.nonzero(fv[:, j])[0]
        top = sorted(fires, key=lambda i: (-fv[i, j], i))[:16]
        purity.append(np.bincount(yv[top]).max() / len(top))
    np.testing.assert_allclose(df.val_loss, val_loss, atol=1e-4)
    np.testing.assert_allclose(df.ap, ap, atol=1e-3)
    assert df.purity.tolist() == purity
    ent = [-(p * np.log(p) + (1 - p) * np.log(1 - p)) for p in np.bincount(yv, minlength=3) / len(yv)]
    assert summ['probe_r'] == pytest.approx(1 - np.mean(val_loss) / np.mean(ent), abs=1e-4)
    assert summ['map'] == pytest.approx(np.mean(ap), abs=1e-3)
    assert summ['coverage_0.3'] == np.mean(np.array(ap) > 0.3)
    assert 0 < summ['probe_r'] < 0.9 and all(a < 1 for a in ap)  # no class is separated perfectly


def test_pair_fit_matches_the_plain_pass_and_skips_converged_probes():
    "Sparse codes, 9 classes (one absent): the fast fit's loss and gradient re-checked by the plain all-probes pass."
    rng = np.random.default_rng(3)
    n, d, C = 3000, 40, 9
    y = np.minimum(rng.zipf(1.6, n) - 1, C - 2)  # class 8 never occurs
    f = np.where(rng.random((n, d)) < rng.uniform(0.005, 0.3, d), rng.exponential(1., (n, d)), 0.)
    f[np.arange(n), y] += (rng.random(n) < 0.6) * rng.gamma(2., 1., n)  # latent c detects class c, not perfectly
    f[:, 39] = 0.  # a latent that never fires
    codes, yt = Codes.from_dense(torch.tensor(f)), torch.tensor(y)
    pr = fit_probes(codes, yt, C)
    b0 = torch.logit(prevalence(yt, C))[None].expand(d, C)
    s, g = probe_grads(codes, yt, pr.w, pr.b, b0, torch.arange(C), 1e-8)
    assert pr.max_grad < 1e-8 and float(g.max()) < 1e-8
    np.testing.assert_allclose(pr.train_loss.numpy(), s['loss'].numpy(), atol=1e-13)
    assert pr.w[:, 8].abs().max() == 0 and pr.w[39].abs().max() == 0  # absent class, silent latent: w = 0
    assert 0 < pr.n_visited < pr.n_iter * len(codes.vals) * 8 / 2  # converged probes leave: under half the passes
    small = fit_probes(codes, yt, C, chunk=7)  # blocks of a few values: the same fit
    np.testing.assert_allclose(small.w.numpy(), pr.w.numpy(), atol=1e-9)
    assert small.train_loss.argmin(0).tolist() == pr.train_loss.argmin(0).tolist()


def test_never_firing_latent_keeps_w_zero():
    f = torch.zeros(20, 2, dtype=torch.float64); f[:10, 0] = 1.
    pr = fit_probes(Codes.from_dense(f), torch.tensor([0] * 5 + [1] * 15), 2)
    assert pr.w[1].tolist() == [0., 0.]


def test_purity_uses_only_firing_patches():
    f = torch.zeros(40, 1); f[7, 0] = 2.  # fires once: 1 of 1, not 16 slots padded with patch 0
    lab = torch.arange(40) % 3
    assert purity_at(Codes.from_dense(f), lab, torch.tensor([0])).tolist() == [1.]


def test_pca_and_kmeans_nmse_l0_match_numpy():
    rng = np.random.default_rng(0)
    xt = rng.normal(size=(300, 8)) * np.linspace(3, .1, 8); xv = rng.normal(size=(100, 8)) * np.linspace(3, .1, 8)
    yt, yv = rng.integers(0, 2, 300), rng.integers(0, 2, 100)
    tr, va = (torch.tensor(xt).float(), torch.tensor(yt)), (torch.tensor(xv).float(), torch.tensor(yv))
    _, s = benchmark_method(fit_pca(tr[0], 3), tr, va, 2)
    mu = xt.astype(np.float32).astype(float).mean(0)
    V = np.linalg.svd(xt.astype(np.float32).astype(float) - mu, full_matrices=False)[2][:3].T
    xv32 = xv.astype(np.float32).astype(float)
    rec = mu + (xv32 - mu) @ V @ V.T
    nmse = ((xv32 - rec) ** 2).sum() / ((xv32 - xv32.mean(0)) ** 2).sum()
    assert s['nmse'] == pytest.approx(nmse, rel=1e-6) and s['l0'] == 3
    km = fit_kmeans(tr[0], 5)
    _, s = benchmark_method(km, tr, va, 2)
    C = km.centroids.numpy()
    rec = C[((xv32[:, None] - C[None]) ** 2).sum(-1).argmin(1)]
    assert s['nmse'] == pytest.approx(((xv32 - rec) ** 2).sum() / ((xv32 - xv32.mean(0)) ** 2).sum(), rel=1e-6)
    assert s['l0'] == 1


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Tiny generated shards (class table: ADE20K's 151) and an SAE from the data, firing on its top 10% of patches."
    t = tiny_shards(tmp_path_factory.mktemp('p1d'), seed=3)
    run, _, _ = data_sae_run(t, d_sae=32, fire_quantile=0.9)
    return {**t, 'run': run}


@pytest.fixture(scope='module')
def run_out(world, tmp_path_factory):
    "`saev_nb probe1d` of the world's run, once: (the command's result, its output folder)."
    w, out = world, tmp_path_factory.mktemp('p1d_out') / 'out'
    r = cli('probe1d', '--run', w['run'], '--train-shards', w['train'], '--val-shards', w['val'], '--out', out)
    return r, out


def test_cli_writes_table_and_resumes(world, run_out):
    w, (r, out) = world, run_out
    assert r.stdout.strip().splitlines()[-1] == str(out)
    table = pd.read_csv(out / 'table.csv', index_col='method')
    assert table.index.tolist() == ['sae', 'pca', 'kmeans']
    assert {'nmse', 'l0', 'probe_r', 'map', 'purity_16', 'coverage_0.3'} <= set(table.columns)
    assert table.loc['kmeans', 'l0'] == 1 and table.loc['pca', 'l0'] == table.loc['pca', 'k']
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_classes'] == 151 and m['max_grad'] < 1e-8 and 0 <= m['map'] <= 1
    pc = pd.read_csv(out / 'per_class.csv')
    assert pc.columns.tolist() == ['class', 'name', 'latent', 'w', 'b', 'train_loss', 'val_loss', 'ap', 'purity']
    assert (out / 'pca' / 'per_class.csv').is_file() and (out / 'kmeans' / 'metrics.json').is_file()
    r2 = cli('probe1d', '--run', w['run'], '--train-shards', w['train'], '--val-shards', w['val'], '--out', out)
    assert 'skipping' in r2.stderr and r2.stdout.strip().splitlines()[-1] == str(out)


def test_cli_bad_input(world, tmp_path):
    w = world
    cli_fails('probe1d', '--run', w['run'], '--train-shards', tmp_path / 'nope', '--val-shards', w['val'],
              contains='nope')
    unlabelled = tmp_path / w['val'].name
    shutil.copytree(w['val'], unlabelled); (unlabelled / 'labels.bin').unlink()
    cli_fails('probe1d', '--run', w['run'], '--train-shards', w['train'], '--val-shards', unlabelled,
              contains='labels.bin')
    cli_fails('probe1d', '--run', tmp_path / 'norun', '--train-shards', w['train'], '--val-shards', w['val'],
              contains='not found')


def test_cli_on_saev_checkpoint_equals_run(world, run_out, tmp_path):
    "`--run <saev sae.pt>` (the run's weights, written as saev writes them) chooses the run's latents, same metrics."
    from saev_nb.runs import load_run
    from saev_nb.sae import save_saev_checkpoint
    w, (_, run_dpath) = world, run_out
    pt = save_saev_checkpoint(load_run(w['run']).sae, tmp_path / 'saev' / 'sae.pt')
    assert pt.read_bytes().split(b'\n', 1)[0].startswith(b'{"schema": 5')  # saev's header line, then torch.save
    out = tmp_path / 'pt'
    r = cli('probe1d', '--run', pt, '--train-shards', w['train'], '--val-shards', w['val'], '--layer', 2,
            '--out', out, env={'TQDM_DISABLE': '1'})
    assert r.stdout.strip().splitlines()[-1] == str(out)
    a, b = (pd.read_csv(d / 'per_class.csv') for d in (out, run_dpath))
    assert a.latent.tolist() == b.latent.tolist() and a.purity.tolist() == b.purity.tolist()
    cols = ['w', 'b', 'train_loss', 'val_loss', 'ap']
    np.testing.assert_allclose(a[cols].values, b[cols].values, rtol=1e-5, atol=1e-6)
    ta, tb = (pd.read_csv(d / 'table.csv', index_col='method') for d in (out, run_dpath))
    assert ta.index.tolist() == tb.index.tolist() == ['sae', 'pca', 'kmeans']
    assert ta.loc['pca', 'k'] == tb.loc['pca', 'k'] and ta.loc['sae', 'k'] == tb.loc['sae', 'k'] == 32
    cols = ['nmse', 'l0', 'probe_r', 'map', 'purity_16', 'coverage_0.3']
    np.testing.assert_allclose(ta[cols].values.astype(float), tb[cols].values.astype(float), rtol=1e-5, atol=1e-6)
