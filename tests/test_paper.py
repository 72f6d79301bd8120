"The paper notebook runs end to end through papermill with small parameters, and its outputs are sane."
import json, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_semseg_paper_small(tmp_path):
    out_nb, out = tmp_path/'semseg.ipynb', tmp_path/'out'
    params = ['-p', 'n_train_imgs', '48', '-p', 'n_val_imgs', '16', '-p', 'n_classes_generated', '4', '-y', 'sae_sparsity_coeffs: [0.03]',
              '-p', 'sae_n_train', '100000', '-y', 'probe_lrs: [0.01]', '-y', 'probe_wds: [0.001]', '-p', 'probe_epochs', '4',
              '-p', 'n_boot', '100', '-p', 'out_dir', str(out)]
    r = subprocess.run([sys.executable, '-m', 'papermill', str(ROOT/'papers'/'semseg.ipynb'), str(out_nb), '--cwd', str(ROOT/'papers'), *params],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads(out_nb.read_text())
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    res = pd.read_csv(out/'logs'/'results.csv')
    assert len(res) == 1 and 0 < res.acc.iloc[0] <= 1 and res.n_classes_present.iloc[0] == 4
    assert (out/'logs'/'hparam-sweeps.png').stat().st_size > 1000
    feats = pd.read_csv(out/'features'/'features.csv')
    assert len(feats) and set(feats['class']) <= {1, 2, 3, 4}
    summ = pd.read_csv(out/'suppress'/'summary.csv').set_index('condition')
    assert list(summ.index) == ['none', 'class', 'random-dir', 'random-latents']
    assert summ.loc['none', 'target_change'] == 0 and summ.loc['none', 'other_change'] == 0
    for c in ('class', 'random-dir', 'random-latents'):
        assert 0 <= summ.loc[c, 'other_change'] <= 1 and summ.loc[c, 'target_lo'] <= summ.loc[c, 'target_change'] <= summ.loc[c, 'target_hi']
    assert (out/'suppress'/'suppression.png').stat().st_size > 1000
    text = '\n'.join(''.join(o.get('data', {}).get('text/markdown', '')) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))
    assert 'removing a class' in text and 'n/a' not in text.split('The `none`')[0].split('removing')[1][:60]
