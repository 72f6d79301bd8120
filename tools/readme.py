"""README.md from nbs/index.ipynb without Quarto.

`nbdev_readme` needs Quarto, which cannot be installed on this project's machines. This renders the same content
faithfully enough for GitHub: the front title/subtitle, markdown cells verbatim, code cells as ```python blocks with
their saved text outputs, `#| hide` cells and nbdev directive lines dropped. `python tools/readme.py` rewrites
README.md; `python tools/readme.py --check` exits 1 when README.md has drifted from the notebook.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DIREC = re.compile(r'^\s*#\s*\|')

def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def render(nb_fpath=ROOT/'nbs'/'index.ipynb') -> str:
    nb = json.loads(Path(nb_fpath).read_text())
    parts = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown':
            parts.append(src.strip()); continue
        if cell['cell_type'] != 'code': continue
        lines = src.splitlines()
        direcs = [l for l in lines if _DIREC.match(l)]
        if any(re.search(r'\b(hide|export|exporti|exports)\b', d) for d in direcs): continue
        code = '\n'.join(l for l in lines if not _DIREC.match(l)).strip()
        if code: parts.append(f'```python\n{code}\n```')
        for o in cell.get('outputs', []):
            txt = o.get('text') or o.get('data', {}).get('text/plain')
            if txt: parts.append('    ' + ''.join(txt).rstrip().replace('\n', '\n    '))
    return '<!-- WARNING: generated from nbs/index.ipynb by tools/readme.py; edit the notebook, not this file -->\n\n' + '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    out = render()
    fpath = ROOT/'README.md'
    if '--check' in sys.argv:
        if fpath.read_text() != out: sys.exit('README.md differs from nbs/index.ipynb; run `.venv/bin/python tools/readme.py` and commit README.md')
        print('README.md is in sync with nbs/index.ipynb')
    else:
        fpath.write_text(out); print(f'wrote {fpath}')
