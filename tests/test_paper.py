"""The paper notebook: runs end to end through papermill with small parameters, its preset sets the preprint's values,
and the committed copy carries clean outputs that show the positive control passing and the per-class verdicts."""
import json, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT/'papers'/'semseg.ipynb'


def outputs_text(nb: dict) -> list[tuple[str, str]]:
    "(kind, text) of every output of every code cell: stream name or mime type, and its text."
    out = []
    for c in nb['cells']:
        for o in c.get('outputs', []) if c['cell_type'] == 'code' else []:
            if o['output_type'] == 'stream': out.append((o['name'], ''.join(o['text'])))
            elif o['output_type'] == 'error': out.append(('error', o['ename'] + ': ' + o['evalue']))
            else: out += [(k, ''.join(v)) for k, v in o.get('data', {}).items() if k.startswith('text/')]
    return out


def assert_clean(nb: dict):
    "No progress-bar fragments, widget warnings, stderr or errors, and tables printed whole."
    for kind, text in outputs_text(nb):
        assert kind not in ('stderr', 'error'), text[:500]
        assert 'IProgress' not in text and '%|' not in text and 'it/s]' not in text, text[:500]
        if kind == 'text/plain': assert '...' not in text, text[:500]


def test_semseg_paper_small(tmp_path):
    out_nb, out = tmp_path/'semseg.ipynb', tmp_path/'out'
    params = ['-p', 'n_train_imgs', '48', '-p', 'n_val_imgs', '16', '-p', 'n_classes_generated', '4', '-y', 'sae_sparsity_coeffs: [0.03]',
              '-p', 'sae_n_train', '100000', '-y', 'probe_lrs: [0.01]', '-y', 'probe_wds: [0.001]', '-p', 'probe_epochs', '4',
              '-p', 'n_boot', '100', '-p', 'n_planted_imgs', '100', '-p', 'out_dir', str(out)]
    r = subprocess.run([sys.executable, '-m', 'papermill', str(PAPER), str(out_nb), '-k', 'python3', '--cwd', str(ROOT/'papers'), *params],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads(out_nb.read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert_clean(nb)
    text = '\n'.join(t for _, t in outputs_text(nb))
    assert 'Of 4 classes, 4 are specific (class 1, class 2, class 3, class 4)' in text  # the positive control, both paths
    assert text.count('Of 4 classes, 4 are specific') >= 2
    res = pd.read_csv(out/'logs'/'results.csv')
    assert len(res) == 1 and 0 < res.acc.iloc[0] <= 1 and res.n_classes_present.iloc[0] == 4
    feats = pd.read_csv(out/'features'/'features.csv')
    assert len(feats) and set(feats['class']) <= {1, 2, 3, 4}
    summ = pd.read_csv(out/'suppress'/'summary.csv').set_index('condition')
    assert list(summ.index) == ['none', 'class', 'random-dir', 'random-latents']
    assert summ.loc['none', 'target_change'] == 0 and summ.loc['none', 'other_change'] == 0
    for c in ('class', 'random-dir', 'random-latents'):
        assert 0 <= summ.loc[c, 'other_change'] <= 1 and summ.loc[c, 'target_lo'] <= summ.loc[c, 'target_change'] <= summ.loc[c, 'target_hi']
    verd = pd.read_csv(out/'suppress'/'verdicts.csv')
    assert set(verd.name) == set(feats.name)
    # the summary sentence counts the classes per verdict, and the per-class table shows every class
    counts = verd.verdict.value_counts()
    sentence = next(t for k, t in outputs_text(nb) if k == 'text/markdown' and 'classes, ' in t)
    assert f"Of {len(verd)} classes, {counts.get('specific', 0)} " in sentence
    table = [t for k, t in outputs_text(nb) if k == 'text/plain' and "target change, class's latents" in t][-1]  # after the control's
    assert all(n in table for n in verd.name)
    # the gallery exists for the validation shards, after inference, with the class latents labelled by class
    gallery = next(out.glob('runs/*/visuals/*/index.html'))
    shown = pd.read_csv(gallery.parent/'latents.csv')
    assert set(feats.latent) <= set(shown.latent)
    assert list((gallery.parents[2]/'inference'/gallery.parent.name).rglob('token_acts.npz'))  # inference ran on these shards
    assert (out/'suppress'/'suppression.png').stat().st_size > 1000
    # the random-init twin ran through the same steps (its outputs under control/), shown beside the default model
    twin = pd.read_csv(out/'control'/'suppress'/'verdicts.csv')
    from saev_nb.suppress import VERDICTS
    assert len(twin) and set(twin.verdict) <= set(VERDICTS)
    side = next(t for k, t in outputs_text(nb) if k == 'text/plain' and 'probe mIoU' in t and 'SAE NMSE' in t)
    assert 'saev-tiny/scenes' in side and 'saev-tiny/random' in side and '95% CI' in side
    assert 'paired 95% CI' in text and 'Learned vs random-init' in text


def _preset_namespace(tmp_path, *params) -> dict:
    "Run the paper's parameter, injected-parameter and preset cells (papermill --prepare-only), return their globals."
    prep = tmp_path/'prepared.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(PAPER), str(prep), '-k', 'python3', '--prepare-only', *params],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cells = json.loads(prep.read_text())['cells']
    ns = {}
    for c in cells:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code':
            exec(src, ns)
            if 'PRESETS = ' in src: return ns
    raise AssertionError('no preset cell')


def test_preset_preprint(tmp_path):
    ns = _preset_namespace(tmp_path, '-p', 'preset', 'preprint', '-p', 'data_root', '/data/ADEChallengeData2016', '-p', 'device', 'cuda')
    assert ns['family'] == 'dinov2' and 'reg4' in ns['ckpt'] and 'vit_base_patch14' in ns['ckpt']  # ViT-B/14 with registers
    assert (ns['layer'], ns['probe_layer']) == (-2, -1)  # SAE on the second-to-last layer, probe on the last
    assert ns['sae_exp_factor'] == 32 and 32 * 768 == 24_576
    assert ns['sae_n_train'] == 100_000_000 and ns['sae_batch_size'] == 16_384
    assert ns['sae_sparsity_coeffs'] == [8e-4] and ns['sae_lr'] == 3e-3
    assert ns['device'] == 'cuda' and ns['data_root'] == '/data/ADEChallengeData2016'  # -p values the preset does not set stay
    from saev_nb.models import load_vit
    vit = load_vit(ns['family'], ns['ckpt'].split('.')[0] + '/random')  # the architecture, without downloading weights
    assert vit.d_model == 768 and vit.n_layers == 12 and vit.n_prefix == 5 and vit.resolve_layers([ns['layer']]) == (10,)
    with pytest.raises(ValueError, match='pass -p data_root'): _preset_namespace(tmp_path, '-p', 'preset', 'preprint')
    assert ns['control_ckpt'] == ''  # the presets skip the random-init twin
    defaults = _preset_namespace(tmp_path)
    assert (defaults['family'], defaults['ckpt'], defaults['control_ckpt'], defaults['hard_scenes']) == (
        'clip', 'saev-tiny/scenes', 'saev-tiny/random', True)  # the defaults: learned model, its twin, hard scenes
    assert max(defaults['probe_lrs']) >= 0.1


def test_committed_paper_shows_the_control_and_the_verdicts():
    nb = json.loads(PAPER.read_text())
    assert nb['metadata']['kernelspec']['name'] == 'python3'
    assert any('parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    silent = [''.join(c['source'])[:40] for c in nb['cells'] if c['cell_type'] == 'code' and not c.get('outputs')]
    assert len(silent) <= 2, f'run the paper with papermill and commit its outputs (no outputs: {silent})'  # parameters, imports
    assert_clean(nb)
    text = '\n'.join(t for _, t in outputs_text(nb))
    assert 'Of 4 classes, 4 are specific (class 1, class 2, class 3, class 4)' in text
    assert "target change, class's latents" in text and 'verdict' in text
    sentence = next(t for k, t in outputs_text(nb) if k == 'text/markdown' and 'classes, ' in t)
    assert sentence.strip().startswith('**Of ')
