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
