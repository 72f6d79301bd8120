"Shared helpers for the pytest suite: run the real CLI in a subprocess, or a CLI function in-process."
import subprocess, sys, typing

import tyro

def cli(*args, check=True):
    "The real console entry point, in a subprocess."
    r = subprocess.run([sys.executable, '-m', 'saev_nb.cli', *map(str, args)], capture_output=True, text=True)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r

def run(fn, *args):
    "A CLI function with its config parsed by tyro from `args`, in-process (saves the interpreter start-up)."
    return fn(tyro.cli(typing.get_type_hints(fn)['cfg'], args=[str(a) for a in args]))

def tiny_shards(dpath, seed=1):
    "Tiny generated scenes (48 train / 16 val, 4 classes) recorded at blocks 2 and 3 of the random-init tiny ViT."
    from saev_nb.data import SegFolderConfig, make_scenes
    from saev_nb.shards import ShardsConfig, write_shards
    root = make_scenes(dpath/'ADEChallengeData2016', 48, 16, seed=seed, size=96, n_classes=4, progress=False)
    sh = {s: write_shards(ShardsConfig(data=SegFolderConfig(root, s), shards_root=dpath/'shards', layers=(2, 3), batch_size=32, n_workers=0), progress=False)
          for s in ('training', 'validation')}
    return {'root': root, 'train': sh['training'], 'val': sh['validation'], 'dpath': dpath}
