"""The traits paper notebook (papers/traits.ipynb): a small version runs end to end through papermill, its positive
control passes, its table has the five methods and the paper's six columns; the preset sets the paper's values."""
import json, subprocess, sys
from pathlib import Path

import pytest

from test_paper import assert_clean, outputs_text

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT/'papers'/'traits.ipynb'


def test_traits_paper_small(tmp_path):
    out_nb = tmp_path/'traits.ipynb'
    params = ['-p', 'n_train_imgs', '16', '-p', 'n_val_imgs', '8', '-p', 'n_classes_generated', '4', '-p', 'd_sae', '32',
              '-y', 'relu_coeffs: [0.03]', '-y', 'matryoshka_coeffs: [0.03]', '-y', 'topk_ks: [4]',
              '-y', 'pca_ks: [1, 4, 16]', '-p', 'sae_n_train', '4000', '-p', 'sae_batch_size', '256',
              '-p', 'n_planted', '800', '-p', 'out_dir', str(tmp_path/'out')]
    r = subprocess.run([sys.executable, '-m', 'papermill', str(PAPER), str(out_nb), '-k', 'python3',
                        '--cwd', str(ROOT/'papers'), *params], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads(out_nb.read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert_clean(nb)
    text = '\n'.join(t for _, t in outputs_text(nb))
    assert 'planted dictionary at its ceilings: Probe R 0.99' in text and 'PCA and k-means below them' in text
    table = next(t for k, t in outputs_text(nb) if k == 'text/plain' and 'Cov@0.3' in t and 'SAE (ReLU)' in t)
    for name in ('SAE (ReLU)', 'Matryoshka', 'TopK', 'PCA', 'k-means', 'NMSE', 'L0', 'Probe R', 'mAP', 'Purity@16'):
        assert name in table, table
    assert any(k == 'image/png' for c in nb['cells'] for o in c.get('outputs', []) for k in o.get('data', {}))


def test_traits_preset_paper(tmp_path):
    "`-p preset paper` sets DINOv3 ViT-L/16 and 16,384 latents (papermill --prepare-only: nothing runs)."
    prep = tmp_path/'prep.ipynb'
    r = subprocess.run([sys.executable, '-m', 'papermill', str(PAPER), str(prep), '-k', 'python3', '--prepare-only',
                        '-p', 'preset', 'paper', '-p', 'data_root', '/data/ADEChallengeData2016'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ns = {}
    for c in json.loads(prep.read_text())['cells']:
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        exec(src, ns)
        if 'PRESETS' in src: break
    assert (ns['family'], ns['ckpt'], ns['d_sae'], ns['device']) == ('dinov3', 'vit_large_patch16_dinov3.lvd1689m', 16_384,
                                                                   'cuda')
    assert ns['data_root'] == '/data/ADEChallengeData2016'
