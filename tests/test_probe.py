"Linear probes: sweep files, batched AdamW, pixel scores, checkpoints, and the `saev_nb semseg train/validate` CLIs."
import subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from saev_nb.core import MissingFileError, UserError
from saev_nb.shards import ShardError
from saev_nb.probe import (BatchedAdamW, LinearProbes, ProbeError, ProbeSweepError, ProbeTrainConfig, ProbeValidateConfig,
                           ActsConfig, confusion, load_probe, load_probe_sweep, predict_pixels, save_probe,
                           seg_scores, stack_probes, train_probe_sweep, train_probes, validate_saved_probes)

from saev_nb.data import SegFolderConfig as ImgsConfig  # the one images config (`--imgs.root`, `--imgs.split`)

from helpers import cli, cli_fails, run, tiny_shards


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "Tiny generated data, recorded at blocks 2 and 3 of the random-init tiny ViT (train and val shards)."
    return tiny_shards(tmp_path_factory.mktemp('tiny'), seed=1)


def test_sweep_grid_and_errors(tmp_path):
    f = tmp_path/'s.toml'
    f.write_text('learning_rate = [1e-4, 1e-3, 1e-2]\nweight_decay = [0.1, 0.001]\n')
    grid = load_probe_sweep(f)
    assert len(grid) == 6 and grid[0] == {'learning_rate': 1e-4, 'weight_decay': 0.1}
    f.write_text('learning_rate = 3e-3\n')
    assert load_probe_sweep(f, weight_decay=0.5) == [{'learning_rate': 3e-3, 'weight_decay': 0.5}]
    for text, msg in [('lr = [1]\n', "unknown key 'lr'"), ('learning_rate = [\n', 'not valid TOML'), ('learning_rate = []\n', 'non-empty list'),
                      ('weight_decay = [-1.0]\n', 'non-negative'), ('learning_rate = "big"\n', 'non-negative')]:
        f.write_text(text)
        with pytest.raises(ProbeSweepError, match=msg.replace('[', r'\[')): load_probe_sweep(f)
    with pytest.raises(MissingFileError, match='not found; pass an existing TOML file to --sweep'):
        load_probe_sweep(tmp_path/'missing.toml')


def test_batched_adamw_equals_torch_adamw():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(128, 24, generator=g), torch.randint(0, 7, (128,), generator=g)
    lrs, wds = [3e-4, 3e-3, 3e-2, 1e-1], [0.0, 1e-3, 0.1, 0.5]
    stack = LinearProbes(4, 24, 7, seed=1)
    lins = []
    for i in range(4):
        lin = torch.nn.Linear(24, 7)
        with torch.no_grad(): lin.weight.copy_(stack.W_pdc[i].T); lin.bias.copy_(stack.b_pc[i])
        lins.append(lin)
    opt = BatchedAdamW([stack.W_pdc, stack.b_pc], lrs, wds)
    opts = [torch.optim.AdamW(l.parameters(), lr=lr, weight_decay=wd) for l, lr, wd in zip(lins, lrs, wds)]
    for _ in range(10):
        opt.zero_grad(); F.cross_entropy(stack(x).flatten(0, 1), y.repeat(4), reduction='none').view(4, -1).mean(1).sum().backward(); opt.step()
        for l, o in zip(lins, opts): o.zero_grad(); F.cross_entropy(l(x), y).backward(); o.step()
    for i, l in enumerate(lins):
        torch.testing.assert_close(stack.W_pdc[i].T, l.weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stack.b_pc[i], l.bias, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match='leading probe axis'): BatchedAdamW([torch.nn.Parameter(torch.zeros(3, 2))], [1e-3] * 4, [0] * 4)


def test_seg_scores_against_loops():
    g = torch.Generator().manual_seed(0)
    c, n = 6, 2000
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class 5 never occurs
    pred = torch.where(torch.rand(2, n, generator=g) < 0.6, labels, torch.randint(0, c, (2, n), generator=g))
    sc = seg_scores(confusion(pred, labels, c))
    for p in range(2):
        assert sc['acc'][p] == pytest.approx(float((pred[p] == labels).float().mean()))
        ious = []
        for k in range(1, c):
            inter, union = int(((pred[p] == k) & (labels == k)).sum()), int(((pred[p] == k) | (labels == k)).sum())
            if (labels == k).any(): ious.append(inter / union); assert sc['iou'][p, k - 1] == pytest.approx(inter / union)
            else: assert np.isnan(sc['iou'][p, k - 1])
        assert sc['miou'][p] == pytest.approx(np.mean(ious))
    assert sc['n_present'] == 4
    # labels outside 0..C-1 (e.g. 255 = ignore) are not counted
    assert int(confusion(pred[:1], torch.full((n,), 255), c).sum()) == 0


def test_predict_pixels_is_bilinear_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 16, 5, generator=g)
    out = predict_pixels(logits, (4, 4), (32, 32))
    ref = F.interpolate(logits[1, 0].view(4, 4, 5).permute(2, 0, 1)[None], size=(32, 32), mode='bilinear', align_corners=False).argmax(1)[0]
    assert out.shape == (3, 2, 32, 32) and torch.equal(out[1, 0], ref)
    with pytest.raises(ValueError, match='patch grid'): predict_pixels(logits, (3, 4), (32, 32))


def test_checkpoint_roundtrip_and_stack(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{'acts': torch.randn(64, 8, generator=g) * 10 + 3, 'labels': torch.randint(0, 4, (64,), generator=g)} for _ in range(5)]
    hp = [{'learning_rate': 1e-2, 'weight_decay': 0.0}, {'learning_rate': 1e-3, 'weight_decay': 0.1}]
    probes, losses = train_probes(batches, hp, 8, 4, progress=False)
    assert losses.shape == (5, 2)
    ones = [load_probe(save_probe(probes, i, tmp_path/f'{i}'/'probe.safetensors', hp[i]))[0] for i in range(2)]
    x = torch.randn(10, 8, generator=g) * 10
    torch.testing.assert_close(stack_probes(ones)(x), probes(x), atol=1e-4, rtol=1e-4)
    (tmp_path/'bad.safetensors').write_bytes(b'not a checkpoint')
    with pytest.raises(ProbeError, match='not a safetensors file'): load_probe(tmp_path/'bad.safetensors')
    save_file = __import__('safetensors.torch', fromlist=['save_file']).save_file
    save_file({'w': torch.zeros(2)}, str(tmp_path/'other.safetensors'))
    with pytest.raises(ProbeError, match='not a saev_nb probe checkpoint'): load_probe(tmp_path/'other.safetensors')
    with pytest.raises(MissingFileError, match='not found; train probes'): load_probe(tmp_path/'none.safetensors')
    with pytest.raises(UserError, match='not a regular file'): load_probe('/dev/zero')
    with pytest.raises(ProbeError, match='no batches'): train_probes([], hp, 8, 4, progress=False)


def test_cli_train_then_validate(tiny, tmp_path):
    sweep = tmp_path/'sweep.toml'
    sweep.write_text('learning_rate = [3e-3, 1e-2]\nweight_decay = [1e-3, 1e-1]\n')
    out = tmp_path/'semseg'
    args = ('semseg', 'train', '--train-acts.shard-root', tiny['train'], '--val-acts.shard-root', tiny['val'],
            '--imgs.root', tiny['root'], '--sweep', sweep, '--n-epochs', 6, '--batch-size', 512, '--out', out)
    r = cli(*args)
    best_line, path_line = r.stdout.strip().splitlines()
    res_fpath = Path(path_line)
    assert res_fpath == out/'logs'/'results.csv' and (out/'logs'/'hparam-sweeps.png').stat().st_size > 1000
    df = pd.read_csv(res_fpath)
    assert len(df) == 4 and {'probe', 'learning_rate', 'weight_decay', 'acc', 'mean_iou', 'n_classes_present', 'wall', 'building', 'flag'} <= set(df.columns)
    assert df.shape[1] == 6 + 150 and (df.n_classes_present == 4).all()
    assert df[['wall', 'building', 'sky', 'floor']].notna().all().all() and df['tree'].isna().all()  # only classes 1..4 occur
    assert ((df.acc > 0) & (df.acc <= 1)).all()
    # the command names the best probe, its pixel mIoU (not the patch IoU `semseg suppress` prints) and its checkpoint
    best = df.loc[df.mean_iou.idxmax()]
    assert best_line.startswith(f"best probe {best['probe']}: pixel mIoU {best['mean_iou']:.3f}, pixel accuracy {best['acc']:.3f}"), best_line
    assert best_line.endswith(str(out/'checkpoints'/best['probe']/'probe.safetensors'))
    # the probe beats predicting the most frequent class of the validation pixels
    from saev_nb.probe import pixel_labels
    from saev_nb.shards import Metadata
    lab, _, _ = pixel_labels(Metadata.load(tiny['val']), ImgsConfig(tiny['root']))
    majority = float(torch.bincount(lab.flatten().long()).max()) / lab.numel()
    assert df.acc.max() > majority + 0.05, (df.acc.max(), majority)
    assert len(list((out/'checkpoints').glob('*/probe.safetensors'))) == 4
    # a second identical run says it skips and why, and prints the same result
    before = res_fpath.stat().st_mtime_ns
    r2 = cli(*args)
    assert 'skipping' in r2.stderr and 'same settings' in r2.stderr and r2.stdout == r.stdout
    assert res_fpath.stat().st_mtime_ns == before
    # validate re-scores the saved probes to the same numbers, into its own folder: training's results.csv is kept
    rv = cli('semseg', 'validate', '--imgs.root', tiny['root'], '--acts.shard-root', tiny['val'], '--out', out)
    v_line, v_path = rv.stdout.strip().splitlines()
    assert v_line.startswith('best probe ') and ': pixel mIoU ' in v_line
    assert Path(v_path).parent.parent == out/'validate' and res_fpath.stat().st_mtime_ns == before
    df2 = pd.read_csv(v_path)
    np.testing.assert_allclose(df2.sort_values('probe').acc.values, df.sort_values('probe').acc.values, atol=2e-3)
    again = validate_saved_probes(ProbeValidateConfig(ActsConfig(tiny['val']), ImgsConfig(tiny['root']), out=out), progress=False)
    assert 'skipping' in again.skipped and again.fpath == Path(v_path)


def test_bad_input(tiny, tmp_path):
    cfg = lambda **kw: ProbeTrainConfig(**{'train_acts': ActsConfig(tiny['train']), 'val_acts': ActsConfig(tiny['val']),
                                           'imgs': ImgsConfig(tiny['root']), 'out': tmp_path, **kw})
    with pytest.raises(ShardError, match=r'layer 1 was not recorded \(layers: \[2, 3\]\)'):
        train_probe_sweep(cfg(train_acts=ActsConfig(tiny['train'], 1)))
    from saev_nb.shards import make_random_shards
    nolab = make_random_shards(tmp_path/'nolab', labels=False)
    with pytest.raises(MissingFileError, match='labels.bin: missing'): train_probe_sweep(cfg(train_acts=ActsConfig(nolab)))
    with pytest.raises(ProbeError, match='family is .random. but the training shards have .clip.'): train_probe_sweep(cfg(val_acts=ActsConfig(nolab)))
    with pytest.raises(MissingFileError, match=r'no \*/probe.safetensors inside'):
        validate_saved_probes(ProbeValidateConfig(ActsConfig(tiny['val']), ImgsConfig(tiny['root']), ckpts=tmp_path))
    from saev_nb.probe import pixel_labels
    from saev_nb.shards import Metadata
    with pytest.raises(ProbeError, match='48 images but the shards hold 16 examples'):
        pixel_labels(Metadata.load(tiny['val']), ImgsConfig(tiny['root'], 'training'))


def test_bad_input_is_one_line_from_the_console_script(tiny, tmp_path):
    cli_fails('semseg', 'validate', '--imgs.root', tiny['root'], '--acts.shard-root', tiny['val'], '--ckpts', tmp_path,
              contains=r'no */probe.safetensors inside')
    cli_fails('semseg', 'train', '--train-acts.shard-root', tiny['train'], '--train-acts.layer', 1, '--val-acts.shard-root',
              tiny['val'], '--imgs.root', tiny['root'], '--out', tmp_path, contains='layer 1 was not recorded')
    (tmp_path/'bad.toml').write_text('lr = [1]\n')
    cli_fails('semseg', 'train', '--train-acts.shard-root', tiny['train'], '--val-acts.shard-root', tiny['val'],
              '--imgs.root', tiny['root'], '--sweep', tmp_path/'bad.toml', '--out', tmp_path, contains="unknown key 'lr'")


def test_sweep_from_dev_zero_is_one_line(tmp_path):
    "`--sweep /dev/zero` (or a fifo, a folder) is refused at once, not read without end (issue 23, item 9)."
    line = cli_fails('semseg', 'train', '--sweep', '/dev/zero', '--out', tmp_path, contains='/dev/zero: not a regular file')
    assert 'expected a probe sweep' in line and '--sweep' in line, line
    cli_fails('semseg', 'train', '--sweep', tmp_path, '--out', tmp_path/'o', contains=f'{tmp_path}: a folder, expected')


def test_shipped_probe_sweep_is_saevs_grid(tiny, tmp_path):
    "sweeps/semseg-probes.toml is saev's 6 x 3 grid, and `semseg train --sweep` takes it: 18 probes, one per pair."
    fpath = Path(__file__).resolve().parents[1]/'sweeps'/'semseg-probes.toml'
    grid = load_probe_sweep(fpath)
    lrs, wds = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [1e-1, 1e-3, 1e-5]
    assert grid == [{'learning_rate': lr, 'weight_decay': wd} for lr in lrs for wd in wds]
    out = tmp_path/'semseg'
    r = cli('semseg', 'train', '--train-acts.shard-root', tiny['train'], '--val-acts.shard-root', tiny['val'],
            '--imgs.root', tiny['root'], '--sweep', fpath, '--n-epochs', 1, '--batch-size', 1024, '--out', out,
            env={'TQDM_DISABLE': '1'})
    df = pd.read_csv(r.stdout.strip().splitlines()[-1])
    assert sorted(zip(df.learning_rate, df.weight_decay)) == sorted((lr, wd) for lr in lrs for wd in wds)
    assert r.stdout.startswith('best probe ') and ': pixel mIoU ' in r.stdout
