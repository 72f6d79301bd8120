"Class features and suppression: F1 against brute force, exact suppression, the planted-class experiment, and the CLIs."
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from saev_nb.probe import LinearProbes
from saev_nb.sae import SAE, SAEConfig, Relu, TopK, save_sae
from saev_nb.suppress import (CONDITIONS, F1Counts, bootstrap_ratio, change_counts, condition_delta, latent_delta, make_conditions,
                              matched_latents, patch_purity, probe_predictor, run_suppression, summarize, suppress, tail_predictor, top_latents)


from helpers import cli, run, tiny_shards


def f1_brute(f, y, keep, thresholds, n_classes):
    out = np.zeros((n_classes, f.shape[1]))
    for c in range(n_classes):
        for s in range(f.shape[1]):
            for t in thresholds:
                tp = fp = fn = 0
                for a, l, k in zip(f[:, s], y, keep):
                    if not k: continue
                    tp += a > t and l == c; fp += a > t and l != c; fn += a <= t and l == c
                out[c, s] = max(out[c, s], 2 * tp / max(2 * tp + fp + fn, 1))
    return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_f1_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(240, 9, generator=g) * 0.8) * (torch.rand(240, 9, generator=g) < 0.4)
    y, keep = torch.randint(0, 6, (240,), generator=g), torch.rand(240, generator=g) > 0.3
    th = (0.0, 0.2, 0.5)
    cnt = F1Counts(9, 6, th)
    for i in range(0, 240, 70): cnt.update(f[i:i + 70], y[i:i + 70], keep[i:i + 70])
    sc = cnt.scores(max_freq=1.0)
    np.testing.assert_allclose(sc['f1'].numpy(), f1_brute(f.numpy(), y.numpy(), keep.numpy(), th, 6), atol=1e-12)
    # precision/recall at the chosen threshold agree with F1 = 2PR/(P+R)
    p, r = sc['precision'].numpy(), sc['recall'].numpy()
    with np.errstate(invalid='ignore'): f1_pr = np.where(p + r > 0, 2 * p * r / (p + r), 0)
    np.testing.assert_allclose(f1_pr, sc['f1'].numpy(), atol=1e-12)
    np.testing.assert_allclose(sc['freq'].numpy(), (f > 0).float().mean(0).numpy(), atol=1e-12)
    # dense latents are excluded, and never reach the table
    dense = sc['freq'] > 0.3
    sc2 = cnt.scores(max_freq=0.3)
    assert (sc2['f1'][:, dense] == -1).all()
    assert not set(top_latents(sc2, [str(i) for i in range(6)], k=3).latent) & set(dense.nonzero().flatten().tolist())


def test_patch_purity_against_loop():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (2, 12, 8), generator=g, dtype=torch.long).to(torch.uint8)
    from saev_nb.models import pixel_to_patch_labels
    pl = pixel_to_patch_labels(lab, 4)
    pur = patch_purity(lab, pl, (3, 2))
    for n in range(2):
        for i in range(3):
            for j in range(2):
                blk = lab[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                assert pur[n, i * 2 + j] == pytest.approx(float((blk == pl[n, i * 2 + j]).float().mean()))
    with pytest.raises(ValueError, match='patch grid'): patch_purity(lab, pl, (5, 2))


@pytest.mark.parametrize('act', [Relu(), TopK(top_k=6)])
def test_suppression_removes_exactly_the_chosen_contributions(act):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=24, d_sae=96, activation=act), seed=1)
    with torch.no_grad(): sae.b_dec.normal_(); sae.b_enc.normal_(0, 0.1)
    x = torch.randn(50, 24) * 2
    lat = [2, 17, 40, 41]
    with torch.no_grad():
        _, f = sae.encode(x)
        x2 = suppress(x, sae, lat)
        f0 = f.clone(); f0[:, lat] = 0
        torch.testing.assert_close(x2 - sae.decode(f0), x - sae.decode(f), atol=1e-5, rtol=1e-5)  # error term kept
        torch.testing.assert_close(x - x2, f[:, lat] @ sae.W_dec[lat], atol=1e-5, rtol=1e-5)
        assert torch.equal(suppress(x, sae, []), x)
        # saev's option: set the latents to -scale x their maximum
        max_s = f.amax(0)
        x3 = suppress(x, sae, lat, mode='negative', scale=2.0, max_s=max_s)
        fn = f.clone(); fn[:, lat] = -2.0 * max_s[lat]
        torch.testing.assert_close(x3 - sae.decode(fn), x - sae.decode(f), atol=1e-4, rtol=1e-4)
        # through a normalizer: edit in normalized space, map back
        from saev_nb.loaders import Normalizer
        nz = Normalizer(torch.randn(24), 0.3)
        _, fz = sae.encode(nz(x))
        torch.testing.assert_close(nz(suppress(x, sae, lat, normalizer=nz)), nz(x) - fz[:, lat] @ sae.W_dec[lat], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='needs max_s'): latent_delta(f, sae.W_dec, lat, mode='negative')
    with pytest.raises(ValueError, match="expected 'zero' or 'negative'"): latent_delta(f, sae.W_dec, lat, mode='clamp')


def planted_world(n_img=160, n_tok=16, d=40, seed=0):
    "Identity SAE; class c (1..4) written on latent c+9 with strength 3; a probe reading those coordinates."
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d, d_sae=d, activation=Relu()))
    with torch.no_grad(): sae.W_enc.copy_(torch.eye(d)); sae.W_dec.copy_(torch.eye(d)); sae.b_enc.zero_(); sae.b_dec.zero_()
    y = torch.randint(0, 5, (n_img, n_tok), generator=g)
    x = 0.3 * torch.randn(n_img, n_tok, d, generator=g)
    x[..., 10:14] += 3 * F.one_hot(y, 5)[..., 1:].float()
    probe = LinearProbes(1, d, 5)
    with torch.no_grad():
        probe.W_pdc.zero_(); probe.b_pc.zero_(); probe.b_pc[0, 0] = 1.5
        for c in range(1, 5): probe.W_pdc[0, c + 9, c] = 1.0
    batches = [{'x': x[i:i + 40], 'labels': y[i:i + 40], 'ids': torch.arange(i, min(i + 40, n_img))} for i in range(0, n_img, 40)]
    return sae, probe, batches, x, y


@pytest.mark.parametrize('mode', ['zero', 'negative'])
def test_planted_class_flips_and_controls_do_not(mode):
    sae, probe, batches, x, y = planted_world()
    d = x.shape[-1]
    cnt = F1Counts(d, 5)
    with torch.no_grad():
        for b in batches: cnt.update(sae.encode(b['x'].reshape(-1, d))[1], b['labels'].reshape(-1))
    sc = cnt.scores(max_freq=0.9)
    feats = top_latents(sc, ['other', 'a', 'b', 'c', 'd'], k=1)
    assert feats.latent.tolist() == [10, 11, 12, 13] and (feats.f1 > 0.95).all()
    conds = make_conditions(feats, sc['freq'], d, seed=0)
    counts = run_suppression(batches, sae, conds, probe_predictor(probe), x.shape[0], progress=False, mode=mode, max_s=sc['max'])
    per_class, summary = summarize(counts, conds, ['other', 'a', 'b', 'c', 'd'], n_boot=300)
    s = summary.set_index('condition')
    assert s.loc['none', 'target_change'] == 0 and s.loc['none', 'other_change'] == 0
    assert s.loc['class', 'target_change'] > 0.95 and s.loc['class', 'target_lo'] > 0.9
    for ctl in ('random-dir', 'random-latents'):
        assert s.loc[ctl, 'target_hi'] < s.loc['class', 'target_lo'], ctl
        if mode == 'zero': assert s.loc[ctl, 'target_change'] < 0.15, (ctl, s.loc[ctl, 'target_change'])  # 'negative' edits are ~4x larger
    cls = per_class[per_class.condition == 'class']
    assert (cls.iou_after < 0.05).all() and (cls.iou_before > 0.9).all()
    if mode == 'zero': assert s.loc['class', 'other_change'] < 0.02  # removing latent c touches only class-c patches
    # controls are matched in size
    assert s.loc['random-dir', 'mean_norm_change'] == pytest.approx(s.loc['class', 'mean_norm_change'], rel=1e-4)


def test_conditions_and_counts():
    freq = torch.tensor([0.0, 0.01, 0.011, 0.2, 0.21, 0.5, 0.012, 0.19])
    rng = np.random.default_rng(0)
    m = matched_latents([1, 3], freq, exclude={1, 3}, rng=rng, n_pool=2)
    assert m[0] in (2, 6) and m[1] in (4, 7)
    with pytest.raises(ValueError, match='no latent left'): matched_latents([1, 2, 3], freq, exclude=set(range(8)) - {5}, rng=rng)
    feats = pd.DataFrame({'class': [3, 3], 'rank': [0, 1], 'latent': [1, 3]})
    conds = make_conditions(feats, freq, 6)
    assert list(conds[3]) == list(CONDITIONS) and torch.isclose(conds[3]['random-dir']['direction'].norm(), torch.tensor(1.0))
    f = torch.rand(5, 8); W = torch.randn(8, 6)
    torch.testing.assert_close(condition_delta(conds[3]['random-dir'], f, W).norm(dim=1), condition_delta(conds[3]['class'], f, W).norm(dim=1))
    pb, pa, y = torch.tensor([[3, 3, 1, 1]]), torch.tensor([[3, 1, 1, 3]]), torch.tensor([[3, 1, 1, 1]])
    assert change_counts(pb, pa, y, 3)[0, :10].tolist() == [2, 1, 2, 1, 1, 2, 1, 2, 3, 3]


def test_bootstrap_interval_covers_truth():
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(20):
        n = torch.randint(5, 20, (1, 300), generator=g).double()
        k = torch.binomial(n, torch.full_like(n, 0.3), generator=g)
        est, lo, hi = bootstrap_ratio(k, n, n_boot=400, seed=rep)
        hits += lo[0] <= 0.3 <= hi[0]
    assert hits >= 16


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    "Tiny generated data, shards at blocks 2 and 3, a data-initialised SAE on block 2, probes on blocks 2 and 3."
    from saev_nb.loaders import IndexedDataset
    t = tiny_shards(tmp_path_factory.mktemp('pipe'), seed=2)
    d, root, sh = t['dpath'], t['root'], {'training': t['train'], 'validation': t['val']}
    ds = IndexedDataset(sh['training'], 2, 'content')
    x = ds[torch.arange(len(ds))]['acts']
    sae = SAE(SAEConfig(d_model=x.shape[1], d_sae=256, activation=Relu()), seed=0)
    sae.init_b_dec(x); sae.init_from_data(x, 0.9, seed=0)
    run_dpath = d/'runs'/'r0'
    save_sae(sae, run_dpath/'sae.safetensors')
    (run_dpath/'config.json').write_text(json.dumps({'train_data': {'shards': str(sh['training']), 'layer': 2}}))
    out = d/'semseg'
    from saev_nb.probe import train_cli
    for layer, sub in ((3, 'p3'), (2, 'p2')):
        run(train_cli, '--train-acts.shard-root', sh['training'], '--train-acts.layer', layer, '--val-acts.shard-root', sh['validation'],
            '--imgs.root', root, '--learning-rate', 1e-2, '--n-epochs', 5, '--batch-size', 512, '--out', out/sub)
    return {'root': root, 'train': sh['training'], 'val': sh['validation'], 'run': run_dpath, 'out': out}


def test_cli_features_then_suppress(pipeline, capsys):
    from saev_nb.suppress import features_cli
    p = pipeline
    run(features_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['train'], '--imgs.root', p['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', p['out']/'p3')
    lines = capsys.readouterr().out.strip().splitlines()
    feats = pd.read_csv(lines[-1])
    assert set(feats.columns) >= {'class', 'name', 'latent', 'f1', 'precision', 'recall', 'frequency'}
    assert set(feats['class']) <= {1, 2, 3, 4} and len(feats) > 0 and (feats.f1 > 0).all()
    assert lines[-2].startswith(f"saev_nb visuals --run {p['run']} --shards {p['train']} --latents ")
    # through the remaining block (SAE on 2, probe on 3), by the console command; the first batch checks the model reproduces block 3
    r = cli('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--n-boot', 200, '--out', p['out']/'p3')
    summ = pd.read_csv(r.stdout.strip().splitlines()[-1]).set_index('condition')
    assert list(summ.index) == list(CONDITIONS)
    assert summ.loc['none', 'target_change'] == 0 and summ.loc['none', 'other_change'] == 0
    assert summ.loc['class', 'mean_norm_change'] == pytest.approx(summ.loc['random-dir', 'mean_norm_change'], rel=1e-3)
    for col in ('target_change', 'other_change'): assert ((summ[col] >= 0) & (summ[col] <= 1)).all()
    sdir = p['out']/'p3'/'suppress'
    assert (sdir/'suppression.png').stat().st_size > 1000 and len(pd.read_csv(sdir/'per-class.csv')) == 4 * feats['class'].nunique()
    assert json.loads((sdir/'conditions.json').read_text())['probe_layer'] == 3
    # the probe on the SAE's own layer reads the edit directly
    from saev_nb.suppress import suppress_cli
    out2 = p['out']/'p2'
    run(features_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['train'], '--imgs.root', p['root'], '--max-freq', 0.6, '--out', out2)
    run(suppress_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--mode', 'negative', '--n-boot', 100, '--out', out2)
    assert json.loads((out2/'suppress'/'conditions.json').read_text())['probe_layer'] == 2


def test_cli_bad_input(pipeline, tmp_path):
    from saev_nb.suppress import features_cli, suppress_cli
    p = pipeline
    with pytest.raises(SystemExit, match='^saev_nb semseg suppress: .*logs/results.csv: missing'):
        run(suppress_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--out', tmp_path)
    probe = next((p['out']/'p3'/'checkpoints').glob('*/probe.safetensors'))
    with pytest.raises(SystemExit, match='^saev_nb semseg suppress: .*no feature table'):
        run(suppress_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--probe', probe, '--out', tmp_path)
    with pytest.raises(SystemExit, match='^saev_nb semseg features: .*SAE was trained on layer 2'):
        run(features_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--acts.layer', 3, '--imgs.root', p['root'], '--out', tmp_path)
    save_sae(SAE(SAEConfig(d_model=16, d_sae=32, activation=Relu())), tmp_path/'small'/'sae.safetensors')
    with pytest.raises(SystemExit, match='^saev_nb semseg features: .*the SAE expects 16'):
        run(features_cli, '--sae-ckpt', tmp_path/'small'/'sae.safetensors', '--acts.shard-root', p['train'], '--imgs.root', p['root'], '--out', tmp_path)


def test_tail_predictor_detects_a_different_model(pipeline):
    from saev_nb.models import load_vit
    from saev_nb.suppress import shard_batches
    vit = load_vit('clip', 'saev-tiny/random')
    probe = LinearProbes(1, vit.d_model, 151)
    batches, _ = shard_batches(p := pipeline['val'], 2, 3, 4096)
    b = next(batches)
    pred = tail_predictor(vit, probe, 2, 3)(b['x'], b)
    assert pred.shape == b['labels'].shape
    with torch.no_grad():
        for q in vit.blocks[3].parameters(): q.add_(0.5)
    with pytest.raises(ValueError, match='does not reproduce the recorded layer 3'): tail_predictor(vit, probe, 2, 3)(b['x'], b)
