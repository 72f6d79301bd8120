"Class features and suppression: F1 against brute force, exact suppression, the planted-class experiment, and the CLIs."
import json, re, shlex, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from saev_nb.probe import LinearProbes
from saev_nb.sae import SAE, SAEConfig, Relu, TopK, save_sae
from saev_nb.core import MissingFileError
from saev_nb.probe import ActsConfig
from saev_nb.data import SegFolderConfig as ImgsConfig
from saev_nb.features import F1Counts, FeaturesConfig, SuppressError, f1_counts, find_class_latents, patch_purity, top_latents
from saev_nb.suppress import (CONDITIONS, VERDICTS, SuppressConfig, bootstrap_ratio, change_counts, class_verdicts,
                              condition_delta, latent_delta, make_conditions, matched_latents, probe_predictor, run_suppression,
                              shared_latents, stream_predictor, summarize, suppress, suppress_experiment, suppression_tables,
                              tail_predictor, verdict_sentence)
from saev_nb.planted import make_planted_semseg

from helpers import SAEV_NB, cli, cli_fails, cli_in_process, run, tiny_shards


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


@pytest.mark.parametrize('mode', ['zero', 'negative'])
def test_planted_class_flips_and_controls_do_not(mode):
    w = make_planted_semseg(n_img=160, d=40, first_latent=10, batch_size=40)
    d = w.sae.d_model
    sc = f1_counts(w.batches, w.sae, len(w.class_names), progress=False).scores(max_freq=0.9)
    # the streaming counts equal counting the whole data at once
    whole = F1Counts(d, 5).update(w.sae.encode(torch.cat([b['x'] for b in w.batches]).reshape(-1, d))[1], w.labels_et.reshape(-1))
    torch.testing.assert_close(whole.scores(max_freq=0.9)['f1'], sc['f1'])
    feats = top_latents(sc, w.class_names, k=1)
    assert feats.latent.tolist() == [10, 11, 12, 13] == list(w.planted.values()) and (feats.f1 > 0.95).all()
    res = suppression_tables(w.batches, w.sae, feats, sc['freq'], w.predictor(), w.n_examples, w.class_names,
                             max_s=sc['max'], mode=mode, n_boot=300, progress=False)
    per_class, s = res.per_class, res.summary.set_index('condition')
    assert s.loc['none', 'target_change'] == 0 and s.loc['none', 'other_change'] == 0
    assert s.loc['class', 'target_change'] > 0.95 and s.loc['class', 'target_lo'] > 0.9
    for ctl in ('random-dir', 'random-latents'):
        assert s.loc[ctl, 'target_hi'] < s.loc['class', 'target_lo'], ctl
        if mode == 'zero': assert s.loc[ctl, 'target_change'] < 0.05, (ctl, s.loc[ctl, 'target_change'])  # 'negative' edits are ~4x larger
    cls = per_class[per_class.condition == 'class']
    assert (cls.iou_after < 0.05).all() and (cls.iou_before > 0.9).all()
    if mode == 'zero': assert s.loc['class', 'other_change'] < 0.02  # removing latent c touches only class-c patches
    # controls are matched in size
    assert s.loc['random-dir', 'mean_norm_change'] == pytest.approx(s.loc['class', 'mean_norm_change'], rel=1e-4)
    assert (res.verdicts.best_f1 > 0.95).all()
    if mode == 'zero':  # 'negative' edits are large enough that a random direction flips some classes too
        assert (res.verdicts.verdict == 'specific').all()
        assert verdict_sentence(res.verdicts).startswith('Of 4 classes, 4 are specific')
    assert 'Of 4 classes' in res.text() and res.text().splitlines()[0].startswith('condition')


def test_planted_later_layer_goes_through_the_stage():
    w = make_planted_semseg(later_layer=True, seed=3)
    assert w.stage is not None and all({'resid', 'x_probe'} <= set(b) for b in w.batches)
    sc = f1_counts(w.batches, w.sae, len(w.class_names), progress=False).scores(max_freq=0.9)
    feats = top_latents(sc, w.class_names, k=1)
    res = suppression_tables(w.batches, w.sae, feats, sc['freq'], w.predictor(), w.n_examples, w.class_names, n_boot=200,
                             progress=False)
    s = res.summary.set_index('condition')
    assert s.loc['class', 'target_change'] > 0.95 and s.loc[['random-dir', 'random-latents'], 'target_change'].max() < 0.05
    # the probe reads only the stage's copies: without the stage it never predicts a class (no target rate at all)
    direct = suppression_tables(w.batches, w.sae, feats, sc['freq'], probe_predictor(w.probe), w.n_examples, w.class_names,
                                n_boot=50, progress=False)
    assert np.isnan(direct.summary.set_index('condition').loc['class', 'target_change'])
    assert set(direct.verdicts.verdict) == {'never predicted'}
    # a stage that is not the one that made x_probe is refused
    bad = dict(w.batches[0]); bad['x_probe'] = bad['x_probe'] + 1
    with pytest.raises(SuppressError, match='does not reproduce the recorded probe layer'): w.predictor()(bad['x'], bad)


def test_semseg_suppress_command_on_a_planted_world(tmp_path):
    "The installed command on known truth: class 1's latent also moves class 2, so it is the one class not specific."
    from saev_nb.planted import save_planted
    files = save_planted(make_planted_semseg(n_img=60, shared={1: 2}), tmp_path)
    r = cli('semseg', 'suppress', '--sae-ckpt', files['sae'], '--acts.shard-root', files['shards'], '--probe', files['probe'],
            '--features', files['features'], '--n-boot', 300, '--out', tmp_path/'semseg', env={'TQDM_DISABLE': '1'})
    out = r.stdout.strip().splitlines()
    assert out[-2] == ('Of 4 classes, 3 are specific (class 2, class 3, class 4), 1 moves other classes too (class 1), 0 are not '
                       'separable from the controls and 0 failed selection.'), r.stdout
    assert out[-1] == str(tmp_path/'semseg'/'suppress'/'summary.csv')
    verd = pd.read_csv(tmp_path/'semseg'/'suppress'/'verdicts.csv').set_index('name')
    assert verd.loc['class 1', 'class_other_lo'] > verd.loc['class 1', ['random_dir_other_hi', 'random_latents_other_hi']].max()
    per_class = pd.read_csv(tmp_path/'semseg'/'suppress'/'per-class.csv')
    assert per_class[['target_lo', 'target_hi', 'other_lo', 'other_hi']].notna().all().all() and len(per_class) == 16


def test_verdicts():
    "Target above both controls is not enough: a class whose latents move other classes more than a control is not specific."
    rows = []
    for c, name, (t_cls, t_dir, t_lat), (o_cls, o_dir, o_lat), n in (
            (1, 'wall', (0.9, 0.02, 0.03), (0.01, 0.01, 0.01), 40), (2, 'sky', (0.3, 0.28, 0.01), (0.0, 0.0, 0.0), 40),
            (3, 'tree', (0.5, 0.0, 0.0), (0.0, 0.0, 0.0), 40), (4, 'bed', (np.nan,) * 3, (0.0, 0.0, 0.0), 0),
            (5, 'road', (0.9, 0.02, 0.03), (0.041, 0.01, 0.05), 40)):  # other change above the direction's, not the latents'
        for cond, t, o in zip(('class', 'random-dir', 'random-latents'), (t_cls, t_dir, t_lat), (o_cls, o_dir, o_lat)):
            rows.append({'condition': cond, 'class': c, 'name': name, 'latents': str(c), 'n_target': n, 'target_change': t,
                         'target_lo': t - 0.05, 'target_hi': t + 0.05, 'other_change': o, 'other_lo': o - 0.005,
                         'other_hi': o + 0.005})
    feats = pd.DataFrame({'class': [1, 1, 2, 3, 4, 5], 'name': ['wall', 'wall', 'sky', 'tree', 'bed', 'road'],
                          'latent': [1, 5, 2, 3, 4, 5], 'f1': [0.9, 0.7, 0.8, 0.3, 0.9, 0.8]})
    v = class_verdicts(pd.DataFrame(rows), feats, min_f1=0.5).set_index('name')
    assert v.verdict.to_dict() == {'wall': 'specific', 'sky': 'not separable from the controls', 'tree': 'selection failed',
                                   'bed': 'never predicted', 'road': 'not specific (moves other classes)'}
    assert list(VERDICTS) == ['specific', 'not specific (moves other classes)', 'not separable from the controls',
                              'selection failed', 'never predicted']
    assert v.loc['wall', 'latent_f1'] == '0.90 0.70' and v.loc['wall', 'best_f1'] == 0.9
    assert v.loc['sky', 'random_dir_change'] == 0.28 and v.loc['sky', 'random_latents_hi'] == pytest.approx(0.06)
    # every condition's other-change band is in the table; latent 5 was chosen for wall and road
    assert v.loc['road', 'class_other_lo'] == pytest.approx(0.036) and v.loc['road', 'random_dir_other_hi'] == pytest.approx(0.015)
    assert v.loc['road', 'random_latents_other_change'] == 0.05
    assert v.shared_latents.to_dict() == {'wall': '', 'sky': '', 'tree': '', 'bed': '', 'road': '5'}  # per-class rows: latents '1'...'5'
    assert shared_latents(feats).to_dict('records') == [{'latent': 5, 'n_classes': 2, 'classes': 'wall, road'}]
    assert verdict_sentence(v.reset_index()) == ('Of 5 classes, 1 is specific (wall), 1 moves other classes too (road), 1 is not '
                                                 'separable from the controls (sky), 1 failed selection (tree) and 1 is never '
                                                 'predicted (bed).')


def test_simultaneous_bands_cover_every_class_together():
    "Sup-t bands over 10 classes cover all 10 true rates at once in about 95% of worlds; pointwise intervals do not."
    g = torch.Generator().manual_seed(0)
    p = torch.linspace(0.05, 0.6, 10)[:, None]
    joint = pointwise = 0
    n_rep = 60
    for rep in range(n_rep):
        n = torch.randint(5, 20, (10, 200), generator=g).double()
        k = torch.binomial(n, p.expand_as(n).double(), generator=g)
        _, lo, hi = bootstrap_ratio(k, n, n_boot=400, seed=rep, family=np.zeros(10))
        joint += bool(((lo <= p[:, 0].numpy()) & (p[:, 0].numpy() <= hi)).all())
        _, lo, hi = bootstrap_ratio(k, n, n_boot=400, seed=rep)
        pointwise += bool(((lo <= p[:, 0].numpy()) & (p[:, 0].numpy() <= hi)).all())
    assert joint >= 0.85 * n_rep, joint  # nominal 95% of 60 = 57
    assert pointwise < joint and pointwise <= 0.8 * n_rep, pointwise  # nominal 0.95**10 = 60% of 60 = 36


def _planted_verdicts(w, k=1, n_boot=1000):
    sc = f1_counts(w.batches, w.sae, len(w.class_names), progress=False).scores(max_freq=0.9)
    feats = top_latents(sc, w.class_names, k=k)
    return feats, suppression_tables(w.batches, w.sae, feats, sc['freq'], w.predictor(), w.n_examples, w.class_names,
                                     n_boot=n_boot, progress=False)


@pytest.mark.parametrize('later_layer', [False, True])
def test_planted_latent_that_also_moves_another_class_is_not_specific(later_layer):
    "Class 1's latent also carries class 2: its target change beats the controls, but it is not specific; the rest are."
    w = make_planted_semseg(n_img=100, shared={1: 2}, later_layer=later_layer, seed=4)
    feats, res = _planted_verdicts(w)
    assert feats.latent.tolist() == list(w.planted.values())
    v = res.verdicts.set_index('name')
    assert v.verdict.to_dict() == {'class 1': 'not specific (moves other classes)', 'class 2': 'specific', 'class 3': 'specific',
                                   'class 4': 'specific'}
    assert v.loc['class 1', 'class_lo'] > max(v.loc['class 1', 'random_dir_hi'], v.loc['class 1', 'random_latents_hi'])
    assert v.loc['class 1', 'class_other_lo'] > 0.15 > max(v.loc['class 1', ['random_dir_other_hi', 'random_latents_other_hi']])
    # the per-class table holds both rates' bands for every condition
    pc = res.per_class
    assert {'target_lo', 'target_hi', 'other_lo', 'other_hi'} <= set(pc.columns) and pc[['other_lo', 'other_hi']].notna().all().all()
    assert 'moves other classes too (class 1)' in verdict_sentence(res.verdicts)


def test_planted_noisy_world_still_finds_every_class():
    "Power: noise, 32 images, latents carrying their class on 70% of its patches; every planted class is still specific."
    w = make_planted_semseg(n_img=32, noise=1.0, carried=0.7, batch_size=8, seed=5)
    feats, res = _planted_verdicts(w)
    assert feats.latent.tolist() == list(w.planted.values()) and (feats.f1 < 0.9).all()
    v = res.verdicts
    assert (v.class_change < 0.9).all() and (v.class_change > 0.5).all() and v.random_dir_change.max() > 0.02
    assert (v.verdict == 'specific').all(), v[['name', 'class_lo', 'random_dir_hi', 'random_latents_hi', 'verdict']]
    with pytest.raises(ValueError, match='two different classes'): make_planted_semseg(shared={1: 5})
    with pytest.raises(ValueError, match='later_layer=False'): make_planted_semseg(carried=0.5, later_layer=True)


def test_conditions_and_counts():
    freq = torch.tensor([0.0, 0.01, 0.011, 0.2, 0.21, 0.5, 0.012, 0.19])
    rng = np.random.default_rng(0)
    m = matched_latents([1, 3], freq, exclude={1, 3}, rng=rng, n_pool=2)
    assert m[0] in (2, 6) and m[1] in (4, 7)
    with pytest.raises(SuppressError, match='no latent left'): matched_latents([1, 2, 3], freq, exclude=set(range(8)) - {5}, rng=rng)
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
    from saev_nb.probe import probe_train_cli
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
    for layer, sub in ((3, 'p3'), (2, 'p2')):
        run(probe_train_cli, '--train-acts.shards', sh['training'], '--train-acts.layer', layer, '--val-acts.shards',
            sh['validation'], '--imgs.root', root, '--learning-rate', 1e-2, '--n-epochs', 5, '--batch-size', 512, '--out', out/sub)
    return {'root': root, 'train': sh['training'], 'val': sh['validation'], 'run': run_dpath, 'out': out}


def test_features_prints_commands_that_run(pipeline, tmp_path):
    p = pipeline
    args = ('--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--imgs.root', p['root'],
            '--max-freq', 0.6, '--purity', 0.8, '--out', tmp_path)
    r = cli('semseg', 'visuals', *args)  # saev's name for the class-feature step
    *head, inf_cmd, vis_cmd, table = r.stdout.strip().splitlines()
    feats = pd.read_csv(table)
    assert Path(table) == tmp_path/'features'/'features.csv' and head[0].endswith('next:')
    assert set(feats.columns) >= {'class', 'name', 'latent', 'f1', 'precision', 'recall', 'frequency'}
    assert set(feats['class']) <= {1, 2, 3, 4} and len(feats) > 0 and (feats.f1 > 0).all()
    assert inf_cmd == shlex.join(['saev_nb', 'inference', '--run', str(p['run']), '--data.shards', str(p['val']),
                                  '--data.layer', '2'])
    assert vis_cmd.startswith(shlex.join(['saev_nb', 'visuals', '--run', str(p['run']), '--shards', str(p['val']),
                                          '--latents']) + ' ')
    assert '<' not in inf_cmd + vis_cmd
    # the printed commands run as printed, in a shell, and leave a gallery of the chosen latents
    env = {**__import__('os').environ, 'PATH': f"{SAEV_NB.parent}:{__import__('os').environ['PATH']}"}
    sh = subprocess.run(['bash', '-ec', f'{inf_cmd}\n{vis_cmd}'], capture_output=True, text=True, env=env, timeout=600)
    assert sh.returncode == 0, sh.stderr[-3000:]
    index = Path(sh.stdout.strip().splitlines()[-1])
    assert index.name == 'index.html' and index.is_file()
    shown = set(pd.read_csv(index.parent/'latents.csv').latent)
    assert shown == set(feats.latent)
    # after inference, features prints only the visuals command; a re-run says it skips and why
    r2 = cli_in_process('semseg', 'features', *args)  # in-process: the same `main`, no start-up
    assert 'skipping' in r2.stderr and r2.stdout.strip().splitlines()[-2:] == [vis_cmd, table]


def test_features_names_the_real_cause(pipeline, tmp_path):
    p = pipeline
    cfg = FeaturesConfig(sae_ckpt=p['run']/'sae.safetensors', acts=ActsConfig(p['train']), imgs=ImgsConfig(p['root']),
                         max_freq=1e-4, out=tmp_path)
    with pytest.raises(SuppressError, match=r'every latent that fires on a class patch is denser than --max-freq 0.0001'):
        find_class_latents(cfg, progress=False)
    assert not (tmp_path/'features'/'features.csv').exists()
    cli_fails('semseg', 'features', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['train'],
              '--imgs.root', p['root'], '--purity', 1.01, '--out', tmp_path, contains='label purity of at least --purity 1.01',
              env={'TQDM_DISABLE': '1'})  # progress bars are allowed on stderr; the error itself is one line


def test_features_then_suppress(pipeline, capsys):
    from saev_nb.features import features_cli
    p = pipeline
    run(features_cli, '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shards', p['train'], '--imgs.root', p['root'],
        '--max-freq', 0.6, '--purity', 0.8, '--out', p['out']/'p3')
    lines = capsys.readouterr().out.strip().splitlines()
    feats = pd.read_csv(lines[-1])
    assert lines[-2].startswith(shlex.join(['saev_nb', 'visuals', '--run', str(p['run']), '--shards', str(p['train']),
                                            '--latents']) + ' ')
    # through the remaining block (SAE on 2, probe on 3), by the console command; the first batch checks the model reproduces block 3
    args = ('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--n-boot', 200,
            '--out', p['out']/'p3')
    r = cli(*args)
    out = r.stdout.strip().splitlines()
    summ = pd.read_csv(out[-1]).set_index('condition')
    assert out[0].startswith('condition') and [l.split()[0] for l in out[1:5]] == list(CONDITIONS)
    assert out[0].endswith('patch IoU before -> after')  # not the pixel mIoU `semseg train` prints for the same probe
    assert 'warning' not in r.stderr  # latents chosen on the training shards, scored on the validation ones
    assert out[-2].startswith(f"Of {feats['class'].nunique()} classes, ")
    assert list(summ.index) == list(CONDITIONS)
    assert summ.loc['none', 'target_change'] == 0 and summ.loc['none', 'other_change'] == 0
    assert summ.loc['class', 'mean_norm_change'] == pytest.approx(summ.loc['random-dir', 'mean_norm_change'], rel=1e-3)
    for col in ('target_change', 'other_change'): assert ((summ[col] >= 0) & (summ[col] <= 1)).all()
    sdir = p['out']/'p3'/'suppress'
    assert (sdir/'suppression.png').stat().st_size > 1000 and len(pd.read_csv(sdir/'per-class.csv')) == 4 * feats['class'].nunique()
    verd = pd.read_csv(sdir/'verdicts.csv')
    assert len(verd) == feats['class'].nunique() and set(verd.verdict) <= set(VERDICTS)
    assert {'class_other_lo', 'class_other_hi', 'random_dir_other_hi', 'random_latents_other_hi', 'shared_latents'} <= set(verd.columns)
    assert json.loads((sdir/'conditions.json').read_text())['intervals'].startswith('95% bootstrap bands')
    assert json.loads((sdir/'conditions.json').read_text())['probe_layer'] == 3
    # a re-run says it skips and why, and prints the same summary
    r2 = cli_in_process(*args)  # in-process: the same `main`, no start-up
    assert 'skipping' in r2.stderr and r2.stdout == r.stdout
    # the probe on the SAE's own layer reads the edit directly
    out2 = p['out']/'p2'
    find_class_latents(FeaturesConfig(sae_ckpt=p['run']/'sae.safetensors', acts=ActsConfig(p['train']), imgs=ImgsConfig(p['root']),
                                      max_freq=0.6, out=out2), progress=False)
    res = suppress_experiment(SuppressConfig(sae_ckpt=p['run']/'sae.safetensors', acts=ActsConfig(p['val']), mode='negative',
                                             n_boot=100, out=out2), progress=False)
    assert json.loads((out2/'suppress'/'conditions.json').read_text())['probe_layer'] == 2 and res.skipped == ''


def test_bad_input(pipeline, tmp_path):
    p = pipeline
    sup = lambda **kw: suppress_experiment(SuppressConfig(**{'sae_ckpt': p['run']/'sae.safetensors', 'acts': ActsConfig(p['val']),
                                                             'out': tmp_path, **kw}), progress=False)
    with pytest.raises(MissingFileError, match='logs/results.csv: missing'): sup()
    probe = next((p['out']/'p3'/'checkpoints').glob('*/probe.safetensors'))
    with pytest.raises(MissingFileError, match='not found; run `saev_nb semseg features` first'): sup(probe=probe)
    with pytest.raises(MissingFileError, match='no SAE checkpoint'): sup(sae_ckpt=tmp_path/'none.safetensors')
    feat = lambda **kw: find_class_latents(FeaturesConfig(**{'sae_ckpt': p['run']/'sae.safetensors', 'acts': ActsConfig(p['val']),
                                                             'imgs': ImgsConfig(p['root']), 'out': tmp_path, **kw}))
    with pytest.raises(SuppressError, match='SAE was trained on layer 2'): feat(acts=ActsConfig(p['val'], 3))
    save_sae(SAE(SAEConfig(d_model=16, d_sae=32, activation=Relu())), tmp_path/'small'/'sae.safetensors')
    with pytest.raises(SuppressError, match='expects 16'): feat(sae_ckpt=tmp_path/'small'/'sae.safetensors')
    cli_fails('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'], '--out', tmp_path,
              contains='logs/results.csv: missing')


def _small_semseg_inputs(tmp_path):
    "A real shard set and a bare SAE checkpoint of its width (cheap: the flag checks run before either is read)."
    from saev_nb.shards import make_random_shards
    sd = make_random_shards(tmp_path/'shards', n_examples=4, layers=(0,), d_model=8, content_tokens=4)
    save_sae(SAE(SAEConfig(d_model=8, d_sae=16, activation=Relu())), tmp_path/'run'/'sae.safetensors')
    return ('--sae-ckpt', tmp_path/'run'/'sae.safetensors', '--acts.shard-root', sd)


def test_semseg_visuals_bad_flags_are_one_line(tmp_path):
    "What a user gets wrong on `semseg visuals`: --out naming the table instead of its folder, no thresholds, k 0."
    from helpers import cli_in_process_fails
    args = ('semseg', 'visuals', *_small_semseg_inputs(tmp_path))
    table = tmp_path/'features.csv'; table.write_text('kept\n')
    cli_fails(*args, '--out', table, contains=f'{table}: a file, but --out names the output folder')
    assert table.read_text() == 'kept\n'
    out = tmp_path/'semseg'
    cli_in_process_fails(*args, '--out', out, '--thresholds', contains='--thresholds: none given')
    cli_in_process_fails(*args, '--out', out, '--k', 0, contains='--k 0: use >= 1 latent kept per class')
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without a GPU')
def test_semseg_visuals_device_cuda_without_gpu_is_one_line(tmp_path):
    out = tmp_path/'semseg'
    cli_fails('semseg', 'visuals', *_small_semseg_inputs(tmp_path), '--out', out, '--device', 'cuda',
              contains='--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or run on a GPU node')
    assert not out.exists()


def test_tail_predictor_detects_a_different_model(pipeline):
    from saev_nb.models import load_vit
    from saev_nb.suppress import suppression_batches
    vit = load_vit('clip', 'saev-tiny/random')
    probe = LinearProbes(1, vit.d_model, 151)
    batches, _ = suppression_batches(pipeline['val'], 2, 3, 4096, vit=vit)
    b = next(batches)
    assert b['resid'].shape[1] == 1 + b['x'].shape[1] and torch.equal(b['resid'][:, 1:], b['x'])
    pred = tail_predictor(vit, probe, 2, 3)(b['x'], b)
    assert pred.shape == b['labels'].shape
    with torch.no_grad():
        for q in vit.blocks[3].parameters(): q.add_(0.5)
    with pytest.raises(SuppressError, match='does not reproduce the recorded probe layer'): tail_predictor(vit, probe, 2, 3)(b['x'], b)


def test_tail_without_the_rotary_grid_is_refused():
    "A DINOv3 tail run without its rotary embedding misses the stream by ~3e-4 but what the blocks add by ~3e-2: refused."
    from saev_nb.models import load_vit
    from saev_nb.suppress import check_stream, stream_tolerance
    vit = load_vit('dinov3', 'vit_small_patch16_dinov3/random', img_size=112)
    torch.manual_seed(7)
    with torch.no_grad():
        for q in vit.parameters(): q.add_(0.02 * torch.randn_like(q))  # moved off the init: the blocks add something
        resid = vit.residual(torch.randn(2, 3, 112, 112), 1)
        rec = vit.run_blocks(resid, 2, 3)[:, 5:]  # what recording block 3 stores
        plain = resid
        for blk in vit.blocks[2:4]: plain = blk(plain)  # the same blocks, no rotary grid
    b = {'resid': resid, 'x_probe': rec}
    assert float((plain[:, 5:] - rec).norm() / rec.norm()) < 1e-3  # what the old whole-stream check allowed
    probe = LinearProbes(1, vit.d_model, 3)
    assert tail_predictor(vit, probe, 1, 3)(resid[:, 5:], b).shape == (2, 49)  # with the grid: accepted
    no_rope = stream_predictor(list(vit.blocks[2:4]), probe, what='blocks 2..3 without rope', n_prefix=5)
    with pytest.raises(SuppressError, match=r'relative error 0\.0\d+ on what the blocks add to the stream'):
        no_rope(resid[:, 5:], b)
    # bfloat16 shards round the stream by more than the missing rotary embedding changes it: not refused there
    check_stream(plain[:, 5:], rec, resid[:, 5:], stream_tol=stream_tolerance('bfloat16'))


def test_stream_rebuilt_from_images_matches_the_shards(pipeline):
    "A model whose prefix the shards lack (registers, or no CLS stored) gets its stream from the images: same tokens."
    from saev_nb.models import load_vit
    from saev_nb.suppress import suppression_batches
    import saev_nb.suppress as S
    vit = load_vit('clip', 'saev-tiny/random')
    ref = next(suppression_batches(pipeline['val'], 2, 3, 4096, vit=vit)[0])
    class Reg:  # pretend the model has one register token: the stream must then come from the images
        def __init__(self, v): self.v, self.n_prefix, self.img_transform = v, 2, v.img_transform
        def residual(self, x, layer):
            h = self.v.residual(x, layer)
            return torch.cat([h[:, :1], torch.zeros_like(h[:, :1]), h[:, 1:]], 1)
    b = next(suppression_batches(pipeline['val'], 2, 3, 4096, vit=Reg(vit))[0])
    assert b['resid'].shape[1] == ref['resid'].shape[1] + 1
    torch.testing.assert_close(b['resid'][:, 2:], ref['x'], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b['resid'][:, 0], ref['resid'][:, 0], atol=1e-4, rtol=1e-4)


def test_suppress_warns_when_features_were_chosen_on_the_scored_shards(pipeline, tmp_path):
    "Latents selected on the validation shards, then scored on them: one warning line naming the table; train -> val: none."
    p = pipeline
    probe = next((p['out']/'p2'/'checkpoints').glob('*/probe.safetensors'))
    cli_in_process('semseg', 'features', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'],
                   '--imgs.root', p['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', tmp_path)
    feat = tmp_path/'features'/'features.csv'
    from saev_nb.shards import Metadata
    assert json.loads((feat.parent/'settings.json').read_text())['shards'] == Metadata.load(p['val']).hash
    r = cli('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'],
            '--probe', probe, '--n-boot', 50, '--out', tmp_path, env={'TQDM_DISABLE': '1'})
    warn = [l for l in r.stderr.splitlines() if l.startswith('warning: ')]
    assert len(warn) == 1 and warn[0].startswith(f'warning: {feat}: the class latents were chosen on {p["val"]}'), r.stderr
    assert 'select them on training shards' in warn[0]
    assert r.stdout.strip().splitlines()[0].endswith('patch IoU before -> after')
    # latents chosen on the training shards and scored on the validation ones: no warning
    cli_in_process('semseg', 'features', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['train'],
                   '--imgs.root', p['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', tmp_path/'tr')
    train_feats = tmp_path/'tr'/'features'/'features.csv'
    r2 = cli_in_process('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'],
                        '--probe', probe, '--features', train_feats, '--n-boot', 50, '--out', tmp_path/'ok',
                        env={'TQDM_DISABLE': '1'})
    assert 'warning' not in r2.stderr and 'chosen on' not in r2.stderr


def _help_text(*cmd) -> str:
    "A command's --help with the box drawing removed and the whitespace collapsed."
    return ' '.join(re.sub(r'[\u2500-\u257f]', ' ', cli(*cmd, '--help').stdout).split())


@pytest.mark.parametrize('cmd', [('semseg', 'suppress'), ('semseg', 'features')])
def test_help_gives_one_default_for_the_layer(cmd):
    "`--acts.layer` of the SAE steps defaults to the SAE's training layer (the one shard-set config); said once."
    text = _help_text(*cmd)
    assert text.count("None: the SAE's training layer where an SAE reads these shards") == 1, text
    assert 'the last recorded one' not in text and "default layer: the SAE's training layer" not in text
