"""Execute a notebook in-process (as nbdev's test runner does) and save its outputs.

Cells flagged with a `tst_flags` directive (`#| slow`, `#| gpu`, `#| notest`) and `#| eval: false` cells are
skipped unless named in `--flags`. Usage: `python tools/run_nb.py nbs/03b_loaders.ipynb [--flags "slow gpu"]`.
"""
import argparse, os, re, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory

ROOT = Path(__file__).resolve().parents[1]
_DIREC = re.compile(r'^\s*#\s*\|\s*(.*)$')

def directives(src):
    "The nbdev directives (`#| ...` lines) at the top of a cell, as a list of word lists."
    out = []
    for line in src.splitlines():
        m = _DIREC.match(line)
        if not m:
            if line.strip(): break
            continue
        out.append(m.group(1).replace(':', ' ').split())
    return out

def tst_flags():
    from configparser import ConfigParser
    cp = ConfigParser(delimiters=['=']); cp.read(ROOT/'settings.ini')
    return set(cp['DEFAULT'].get('tst_flags', '').split())

def run(fpath, force=()):
    fpath = Path(fpath).resolve()
    skip = tst_flags() - set(force)
    nb = read_nb(fpath)
    def _skip(cell):
        if cell.cell_type != 'code': return True
        ds = directives(cell.source)
        if any(d[:2] == ['eval', 'false'] for d in ds): return True
        if any(d and d[0] in skip for d in ds): return True
        if 'nbdev_export(' in cell.source: return True
        return False
    os.environ['IN_TEST'] = '1'
    sys.path.insert(0, str(ROOT))
    sh = CaptureShell(fpath)
    t0 = time.time()
    try:
        with working_directory(fpath.parent): sh.run_all(nb, exc_stop=True, preproc=_skip)
    except Exception:
        sys.stderr.write(sh.prettytb(fname=fpath) + '\n')
        raise SystemExit(f'{fpath.name}: a cell failed (traceback above); outputs not saved')
    for c in nb.cells:
        if c.cell_type == 'code': c.pop('execution_count', None); c['execution_count'] = None
    write_nb(nb, fpath)
    print(f'{fpath.name}: ran in {time.time()-t0:.1f} s, outputs saved')

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('fpath'); ap.add_argument('--flags', default='')
    a = ap.parse_args()
    run(a.fpath, a.flags.split())
