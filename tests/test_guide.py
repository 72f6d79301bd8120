"""saev's guide and ADE20K instructions, run verbatim (paths and sizes changed) through the installed `saev_nb` in a
`set -e` script (tests/scripts/saev_guide.sh), and the README's command-line walkthrough, run as printed."""
import os, re, subprocess, sys, typing
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _bash(script: str, cwd: Path, timeout=900, env=None):
    r = subprocess.run(['bash', '-c', script], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, 'PATH': f'{BIN}:{os.environ["PATH"]}', 'TQDM_DISABLE': '1', **(env or {})})
    assert r.returncode == 0, f'exit {r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}'
    return r

def test_saev_guide_commands_verbatim(tmp_path):
    r = _bash(f'set -euo pipefail; bash {ROOT}/tests/scripts/saev_guide.sh {tmp_path}', tmp_path)
    assert r.stdout.strip().endswith('guide: ok') and 'Traceback' not in r.stderr
    runs = list((tmp_path/'sweep-runs').iterdir())
    assert len(runs) == 6 and all((p/'eval.json').exists() for p in runs)  # the guide's sweep: six SAEs
    assert list((tmp_path/'suppress').rglob('*.csv'))

def test_guide_slurm_flags_parse():
    "The guide's shards command with its Slurm flags parses into the config the job would get (Slurm runs in test_slurm)."
    from saev_nb.writer import ShardsConfig
    cfg = tyro.cli(ShardsConfig, args='--shards-root R --family clip --ckpt ViT-B-16/openai --d-model 768 --layers 6 7 8 9 10 11 '
                   '--content-tokens-per-example 196 --batch-size 256 --slurm-acct A --slurm-partition P '
                   'data:img-seg-folder --data.root ROOT --data.split training'.split(),
                   config=(tyro.conf.CascadeSubcommandArgs,))
    assert (cfg.layers, cfg.slurm.slurm_acct, cfg.slurm.slurm_partition, cfg.data.split) == ((6, 7, 8, 9, 10, 11), 'A', 'P', 'training')

def _walkthrough() -> str:
    "The README's command-line walkthrough: the ```sh block under its heading."
    text = (ROOT/'README.md').read_text()
    m = re.search(r'## From images to the suppression table.*?```sh\n(.*?)```', text, re.S)
    assert m, 'README.md has no "From images to the suppression table" walkthrough'
    return m.group(1)

def test_readme_walkthrough_runs_as_printed(tmp_path):
    r = _bash('set -euo pipefail\n' + _walkthrough(), tmp_path)
    assert 'Traceback' not in r.stderr
    assert list(tmp_path.rglob('suppress/*.csv')) and list(tmp_path.rglob('index.html'))
