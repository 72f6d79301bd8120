"PCA and k-means baseline runs (`saev_nb baseline train`): through `inference` and `probe1d` unchanged, against numpy."
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails, tiny_shards


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "Tiny generated shards (ADE20K's 151-class table, blocks 2 and 3) and their block-2 tokens as numpy arrays."
    from saev_nb.loaders import IndexedDataset
    t = tiny_shards(tmp_path_factory.mktemp('base'), seed=5)
    acts = {s: (ds := IndexedDataset(t[s], 2, 'content'))[np.arange(len(ds))]['acts'].double().numpy()
            for s in ('train', 'val')}
    return {**t, **{f'x_{s}': a for s, a in acts.items()}}


def nmse(x, rec): return ((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def fit(w, out, *args, call=cli):
    r = call('baseline', 'train', '--train-data.shards', w['train'], '--train-data.layer', 2,
            '--train-data.batch-size', 256, '--out', out, *args)
    assert r.stdout.strip().splitlines()[-1] == str(out)
    return r


def evaluate(w, run, call=cli):
    "`saev_nb inference` on the validation shards (in-process) and `saev_nb probe1d`: their metrics.json and table."
    r = cli_in_process('inference', '--run', run, '--data.shards', w['val'])
    ev = json.loads((Path(r.stdout.strip().splitlines()[-1])/'metrics.json').read_text())
    call('probe1d', '--run', run, '--train-shards', w['train'], '--val-shards', w['val'], '--out', run/'p1d')
    return ev, pd.read_csv(run/'p1d'/'table.csv', index_col='method')


def test_pca_run_matches_numpy_through_inference_and_probe1d(world, tmp_path):
    "Fitted by the installed script, read back by a fresh `probe1d` process (the module named in its file registers)."
    w, run, k = world, tmp_path/'pca', 3
    fit(w, run, '--method', 'pca', '--k', k)
    ev, table = evaluate(w, run)
    xt, xv = w['x_train'], w['x_val']
    mu = xt.mean(0)
    V = np.linalg.svd(xt - mu, full_matrices=False)[2][:k].T  # one epoch reads every training token once
    want = nmse(xv, mu + (xv - mu) @ V @ V.T)
    assert ev['normalized_mse'] == pytest.approx(want, rel=1e-5) and ev['l0'] == k
    assert table.index.tolist() == ['pca'] and table.loc['pca', 'l0'] == k
    assert table.loc['pca', 'nmse'] == pytest.approx(want, rel=1e-5)
    assert 0 <= table.loc['pca', 'map'] <= 1 and 'probe_r_train' in table.columns
    train_nmse = json.loads((run/'eval.json').read_text())['nmse']
    assert train_nmse == pytest.approx(nmse(xt, mu + (xt - mu) @ V @ V.T), rel=1e-6)


def test_kmeans_run_matches_numpy_through_inference_and_probe1d(world, tmp_path):
    w, run = world, tmp_path/'km'
    fit(w, run, '--method', 'kmeans', '--k', 6, call=cli_in_process)  # the installed script: the PCA test
    ev, table = evaluate(w, run, call=cli_in_process)
    C = load_file(str(run/'sae.safetensors'))['centroids']
    xv = w['x_val']
    rec = C[((xv[:, None] - C[None]) ** 2).sum(-1).argmin(1)]
    assert ev['normalized_mse'] == pytest.approx(nmse(xv, rec), rel=1e-5) and ev['l0'] == 1
    assert table.index.tolist() == ['kmeans'] and table.loc['kmeans', 'l0'] == 1
    assert table.loc['kmeans', 'nmse'] == pytest.approx(nmse(xv, rec), rel=1e-5)


def test_resume_skip_and_force(world, tmp_path):
    "A pass stopped after two batches resumes from its checkpoint and ends where an unstopped one does; reruns skip."
    import torch
    from saev_nb.baselines import (BaselineConfig, ShuffledConfig, ShuffledLoader, baseline_settings,
                                   fit_baseline_cfg, make_fitters, save_fit_checkpoint)
    w, full, run = world, tmp_path/'full', tmp_path/'resumed'
    args = ('--method', 'kmeans', '--k', 5, '--ckpt-every', 1)
    fit(w, full, *args, call=cli_in_process)
    cfg, md = fit_baseline_cfg(BaselineConfig(train_data=ShuffledConfig(shards=w['train'], layer=2, batch_size=256),
                                              method='kmeans', k=(5,), out=run))
    (f, ks), = make_fitters(cfg, md.d_model)
    loader = ShuffledLoader(cfg.train_data)
    for b, batch in zip(range(2), loader.iter_batches(loader.n_tokens)): f.update(batch['acts'].double())
    run.mkdir()
    save_fit_checkpoint(run/'checkpoint.pt', f, 2, baseline_settings(cfg, 5))
    r = cli_in_process('baseline', 'train', '--train-data.shards', w['train'], '--train-data.layer', 2,
                       '--train-data.batch-size', 256, '--out', run, *args)
    assert 'resuming the pass at batch 2' in r.stderr and not (run/'checkpoint.pt').exists()
    np.testing.assert_allclose(load_file(str(run/'sae.safetensors'))['centroids'],
                               load_file(str(full/'sae.safetensors'))['centroids'], atol=1e-9)
    again = cli_in_process('baseline', 'train', '--train-data.shards', w['train'], '--train-data.layer', 2,
                           '--train-data.batch-size', 256, '--out', run, *args)
    assert 'skipping (--force redoes it)' in again.stderr
    mtime = (run/'sae.safetensors').stat().st_mtime_ns
    forced = cli_in_process('baseline', 'train', '--train-data.shards', w['train'], '--train-data.layer', 2,
                            '--train-data.batch-size', 256, '--out', run, *args, '--force')
    assert 'skipping' not in forced.stderr and (run/'sae.safetensors').stat().st_mtime_ns != mtime


def test_bad_input_is_one_line(world, tmp_path):
    cli_fails('baseline', 'train', '--train-data.shards', world['train'], '--k', 0, '--out', tmp_path/'r',
              contains='--k 0: expected whole numbers >= 1')
    cli_in_process_fails('baseline', 'train', '--train-data.shards', world['train'], '--method', 'kmeans',
                         '--k', 10 ** 6, '--out', tmp_path/'r', contains='k-means needs at least k tokens')
    cli_in_process_fails('baseline', 'train', '--train-data.shards', tmp_path/'nope', '--out', tmp_path/'r',
                         contains='nope')
    run = tmp_path/'pca1'
    fit(world, run, '--method', 'pca', '--k', 1, call=cli_in_process)
    cli_in_process_fails('probe1d', '--run', run, '--train-shards', world['train'], '--val-shards', world['val'],
                         '--layer', 3, contains='but --layer is 3; pass --layer 2')  # probe1d's own flag, not --x.layer


def test_pca_sweep_and_selection_by_training_probe_r(world, tmp_path):
    "`--k 1 4 16 64 256 1024` in one pass (capped at d_model, said once); `best_runs` keeps the highest training R."
    from saev_nb.probe1d import best_runs
    from saev_nb.shards import Metadata, open_labels
    w, root = world, tmp_path/'runs'
    r = cli('baseline', 'train', '--train-data.shards', w['train'], '--train-data.layer', 2,
            '--train-data.batch-size', 512, '--runs-root', root, '--k', 1, 4, 16, 64, 256, 1024)
    d = w['x_train'].shape[1]
    assert r.stderr.count('warning: --k 1024: PCA has at most d_model') == 1
    runs = sorted(root.iterdir(), key=lambda p: int(p.name.split('-')[1][1:]))
    assert [int(p.name.split('-')[1][1:]) for p in runs] == sorted({min(k, d) for k in (1, 4, 16, 64, 256, 1024)})
    rows = []
    for p in runs:
        cli_in_process('probe1d', '--run', p, '--train-shards', w['train'], '--val-shards', w['val'], '--out', p/'p1d')
        t = pd.read_csv(p/'p1d'/'table.csv', index_col='method')
        rows.append({'run': p.name, 'method': t.index[0], **t.iloc[0].to_dict()})
    table = pd.DataFrame(rows)
    # training Probe R from the per-class training losses and the training prevalence, independently
    md = Metadata.load(w['train'])
    y = np.asarray(open_labels(w['train'], md)).reshape(-1).astype(int)
    pc = pd.read_csv(runs[0]/'p1d'/'per_class.csv')
    p_c = np.clip(np.bincount(y, minlength=len(pc)) / len(y), 1e-12, 1 - 1e-12)
    h = -(p_c * np.log(p_c) + (1 - p_c) * np.log(1 - p_c))
    assert table.probe_r_train.iloc[0] == pytest.approx(1 - pc.train_loss.mean() / h.mean(), rel=1e-9)
    best = best_runs(table)
    assert best.method.tolist() == ['pca'] and best.run.iloc[0] == table.run[table.probe_r_train.idxmax()]
