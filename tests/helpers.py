"Shared helpers for the pytest suite: run the installed console script in a subprocess, or a CLI function in-process."
import os, subprocess, sys, typing
from pathlib import Path

import tyro

SAEV_NB = Path(sys.executable).with_name('saev_nb')  # the console script pip installed next to this interpreter

def cli(*args, check=True, env=None, timeout=900, input=None):
    "The installed `saev_nb` console script in a subprocess; with `check`, asserts exit 0 and returns the result."
    r = subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, timeout=timeout, input=input,
                       env={**os.environ, **(env or {})})
    if check: assert r.returncode == 0, f'exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}'
    return r

def cli_fails(*args, contains='', env=None):
    "The console script on bad input: exit 2, one line on stderr starting `saev_nb <cmd>:` and containing `contains`."
    r = cli(*args, check=False, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f'exit {r.returncode}\nstderr: {r.stderr[-3000:]}'
    assert len(lines) == 1 and lines[0].startswith('saev_nb '), f'not one line:\n{r.stderr[-3000:]}'
    assert 'Traceback' not in r.stderr and contains in lines[0], lines[0]
    return lines[0]

def run(fn, *args):
    "A CLI function with its config parsed by tyro from `args`, in-process (saves the interpreter start-up)."
    return fn(tyro.cli(typing.get_type_hints(fn)['cfg'], args=[str(a) for a in args]))

def tiny_shards(dpath, seed=1):
    "Tiny generated scenes (48 train / 16 val, 4 classes) recorded at blocks 2 and 3 of the random-init tiny ViT."
    from saev_nb.data import SegFolderConfig, make_scenes
    from saev_nb.shards import ShardsConfig, write_shards
    root = make_scenes(dpath/'ADEChallengeData2016', 48, 16, seed=seed, size=96, n_classes=4, progress=False)
    sh = {s: write_shards(ShardsConfig(data=SegFolderConfig(root, s), shards_root=dpath/'shards', layers=(2, 3),
                                       batch_size=32, n_workers=0), progress=False)
          for s in ('training', 'validation')}
    return {'root': root, 'train': sh['training'], 'val': sh['validation'], 'dpath': dpath}
