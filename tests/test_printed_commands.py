"""The commands `semseg features` prints are meant to be piped to a shell (the README does): they must run as printed,
with every value quoted, whatever the paths hold, and for a saev checkpoint file as well as a run directory."""
import json, os, shlex, subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import SAEV_NB, cli, tiny_shards

ODD = """my runs 'q' "dq" $(touch PWNED) `touch PWNED2`"""  # a space, both quotes, a command substitution, backticks


@pytest.fixture(scope='module')
def odd(tmp_path_factory):
    "Tiny data, shards and a data-initialised SAE (a run directory and a saev `sae.pt`), all under a folder named ODD."
    from saev_nb.loaders import IndexedDataset
    from saev_nb.sae import SAE, SAEConfig, Relu, save_sae, save_saev_checkpoint
    base = tmp_path_factory.mktemp('printed')
    t = tiny_shards(base/ODD, seed=3)
    ds = IndexedDataset(t['train'], 2, 'content')
    x = ds[torch.arange(len(ds))]['acts']
    sae = SAE(SAEConfig(d_model=x.shape[1], d_sae=256, activation=Relu()), seed=0)
    sae.init_b_dec(x); sae.init_from_data(x, 0.9, seed=0)
    run = base/ODD/'runs'/'r 0'
    save_sae(sae, run/'sae.safetensors')
    (run/'config.json').write_text(json.dumps({'train_data': {'shards': str(t['train']), 'layer': 2}}))
    pt = base/ODD/'saev ckpts'/"it's $(touch PWNED3)"/'sae.pt'
    pt.parent.mkdir(parents=True)
    save_saev_checkpoint(sae, pt)
    return {**t, 'base': base, 'run': run, 'pt': pt}


def printed_commands(stdout: str) -> list[str]:
    return [l for l in stdout.splitlines() if l.startswith('saev_nb ')]


def pipe_to_bash(cmds: list[str], cwd: Path) -> subprocess.CompletedProcess:
    "The README's way: the printed lines on the stdin of `bash -e`, with the installed `saev_nb` on PATH."
    env = {**os.environ, 'PATH': f"{SAEV_NB.parent}:{os.environ['PATH']}", 'TQDM_DISABLE': '1'}
    return subprocess.run(['bash', '-e'], input='\n'.join(cmds) + '\n', cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def no_pwned(base: Path):
    found = [p for p in base.rglob('*') if p.name.startswith('PWNED')]
    assert not found, f'a printed command ran what a path says: {found}'


def test_printed_commands_quote_every_value_and_run(odd):
    "Paths with spaces, quotes, `$(...)` and backticks: the printed commands run as printed, and run nothing else."
    base, out = odd['base'], odd['base']/ODD/'semseg'
    r = cli('semseg', 'features', '--sae-ckpt', odd['run']/'sae.safetensors', '--acts.shard-root', odd['val'],
            '--imgs.root', odd['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', out, env={'TQDM_DISABLE': '1'})
    cmds = printed_commands(r.stdout)
    feats = pd.read_csv(r.stdout.strip().splitlines()[-1])
    assert [shlex.split(c)[:2] for c in cmds] == [['saev_nb', 'inference'], ['saev_nb', 'visuals']]
    inf, vis = map(shlex.split, cmds)  # each value is one shell word, exactly the path
    assert inf[inf.index('--run') + 1] == str(odd['run']) and inf[inf.index('--data.shards') + 1] == str(odd['val'])
    assert vis[vis.index('--class-latents') + 1] == str(out/'features'/'features.csv')
    sh = pipe_to_bash(cmds, base)
    assert sh.returncode == 0, sh.stderr[-3000:]
    no_pwned(base)
    index = Path(sh.stdout.strip().splitlines()[-1])
    assert index.name == 'index.html' and index.is_file() and index.is_relative_to(odd['run'])
    assert set(pd.read_csv(index.parent/'latents.csv').latent) == set(feats.latent)


def test_printed_commands_work_for_a_saev_checkpoint(odd):
    "`semseg features` on a saev `sae.pt`: the printed `--run` is the file itself, and inference and visuals take it."
    base, out = odd['base'], odd['base']/ODD/'semseg-pt'
    r = cli('semseg', 'features', '--sae-ckpt', odd['pt'], '--acts.shard-root', odd['val'], '--acts.layer', 2,
            '--imgs.root', odd['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', out, env={'TQDM_DISABLE': '1'})
    cmds = printed_commands(r.stdout)
    assert [shlex.split(c)[:2] for c in cmds] == [['saev_nb', 'inference'], ['saev_nb', 'visuals']]
    assert all(shlex.split(c)[shlex.split(c).index('--run') + 1] == str(odd['pt']) for c in cmds)
    sh = pipe_to_bash(cmds, base)
    assert sh.returncode == 0, sh.stderr[-3000:]
    no_pwned(base)
    index = Path(sh.stdout.strip().splitlines()[-1])
    assert index.name == 'index.html' and index.is_file()
    feats = pd.read_csv(r.stdout.strip().splitlines()[-1])
    assert set(pd.read_csv(index.parent/'latents.csv').latent) == set(feats.latent)
    # once inference has run, features prints only the visuals command, still on the file
    r2 = cli('semseg', 'features', '--sae-ckpt', odd['pt'], '--acts.shard-root', odd['val'], '--acts.layer', 2,
             '--imgs.root', odd['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', out, env={'TQDM_DISABLE': '1'})
    assert printed_commands(r2.stdout) == cmds[1:]
