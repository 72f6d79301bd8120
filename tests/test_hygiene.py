"""Repository hygiene: notebooks and library in sync, notebooks clean, README generated from index.ipynb,
docs pre-processing works, papermill tags survive cleaning. Each check runs on a scratch copy of the repo so a
developer's working tree is never modified."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _copy_repo(dst: Path) -> Path:
    for name in ('settings.ini', 'setup.py', 'README.md', '_quarto.yml'):
        if (ROOT/name).exists(): shutil.copy(ROOT/name, dst/name)
    for d in ('nbs', 'saev_nb', 'papers', 'tools'):
        shutil.copytree(ROOT/d, dst/d, ignore=shutil.ignore_patterns('__pycache__', '_proc', '_out', '*.pyc', '.ipynb_checkpoints'))
    return dst

def _tree(dpath: Path, pattern: str) -> dict:
    return {str(p.relative_to(dpath)): p.read_bytes() for p in sorted(dpath.glob(pattern)) if p.is_file() and '__pycache__' not in p.parts}

def _diff(a: dict, b: dict) -> list:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

def test_export_in_sync(tmp_path):
    "`nbdev_export` on the notebooks reproduces saev_nb/ exactly (nobody edited generated code by hand)."
    repo = _copy_repo(tmp_path)
    before = _tree(repo/'saev_nb', '**/*.py')
    subprocess.run([BIN/'nbdev_export'], cwd=repo, check=True, capture_output=True)
    changed = _diff(before, _tree(repo/'saev_nb', '**/*.py'))
    assert not changed, f'saev_nb/ is out of sync with nbs/ in {changed}; run `.venv/bin/nbdev_export` and commit'

def test_notebooks_clean(tmp_path):
    "`nbdev_clean` changes nothing: no execution counts or stray metadata committed."
    repo = _copy_repo(tmp_path)
    before = {**_tree(repo, 'nbs/*.ipynb'), **_tree(repo, 'papers/*.ipynb')}
    for d in ('nbs', 'papers'): subprocess.run([BIN/'nbdev_clean', '--fname', str(repo/d)], cwd=repo, check=True, capture_output=True)
    changed = _diff(before, {**_tree(repo, 'nbs/*.ipynb'), **_tree(repo, 'papers/*.ipynb')})
    assert not changed, f'notebooks not clean: {changed}; run `.venv/bin/nbdev_clean --fname nbs` (and papers) and commit'

def test_papermill_tag_survives_clean(tmp_path):
    "The papermill `parameters` tag is kept by nbdev_clean (settings.ini allowed_cell_metadata_keys = tags)."
    nb = {'cells': [{'cell_type': 'code', 'execution_count': 3, 'id': 'x', 'metadata': {'tags': ['parameters'], 'scrolled': True},
                     'outputs': [], 'source': ['layer = -2']}],
          'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}}, 'nbformat': 4, 'nbformat_minor': 5}
    repo = _copy_repo(tmp_path); fpath = repo/'papers'/'tagged.ipynb'
    fpath.write_text(json.dumps(nb))
    subprocess.run([BIN/'nbdev_clean', '--fname', str(fpath)], cwd=repo, check=True, capture_output=True)
    cell = json.loads(fpath.read_text())['cells'][0]
    assert cell['metadata'] == {'tags': ['parameters']} and cell['execution_count'] is None

def test_paper_notebooks_have_parameters_cell():
    "Each papers/*.ipynb has a cell tagged `parameters` for papermill."
    for fpath in sorted((ROOT/'papers').glob('*.ipynb')):
        cells = json.loads(fpath.read_text())['cells']
        assert any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells), f'{fpath}: no cell tagged `parameters`; tag the parameters cell'

def test_readme_generated_from_index():
    "README.md is exactly what tools/readme.py renders from nbs/index.ipynb."
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'readme.py'), '--check'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr or r.stdout

def test_readme_commands_match_ci():
    "The README's set-up and test commands are exactly what .ci/run runs."
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    for cmd in ('bash tools/setup.sh', 'bash tools/test.sh'):
        assert cmd in readme and cmd in ci, f'{cmd!r} must appear in README.md and .ci/run'

def test_docs_preprocessing(tmp_path):
    "nbdev's docs pre-processing (`nbdev_proc_nbs`, what Quarto renders) succeeds on every notebook."
    repo = _copy_repo(tmp_path)
    r = subprocess.run([BIN/'python', '-c', 'from nbdev.serve import proc_nbs; proc_nbs()'], cwd=repo, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    n_in = len(list((repo/'nbs').glob('*.ipynb')))
    n_out = len(list((repo/'_proc').glob('*.ipynb')))
    assert n_out == n_in, f'_proc has {n_out} notebooks, nbs has {n_in}'

def _modules():
    return sorted(p for p in (ROOT/'saev_nb').glob('*.py') if p.name not in ('_modidx.py', '__init__.py'))

def _all_names(fpath):
    import ast
    for node in ast.parse(fpath.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == '__all__' for t in node.targets):
            return [e.value for e in node.value.elts]
    return []

def test_public_names_unique_across_modules():
    "No public name is defined in two modules (`from saev_nb.x import *` of two steps never shadows one with the other)."
    seen, dups = {}, []
    for f in _modules():
        for n in _all_names(f):
            if n in seen: dups.append(f'{n} ({seen[n]}, {f.name})')
            seen[n] = f.name
    assert not dups, f'public names defined twice: {dups}; rename one or make it private (`_name` or `#| exporti`)'

def test_internal_helpers_not_exported():
    "`import *` brings the public API only: the loaders' machinery stays out of `__all__`."
    assert not {'SlotRing', 'RowGather', 'deliver', 'background'} & set(_all_names(ROOT/'saev_nb'/'loaders.py'))

def test_library_lines_within_120_characters():
    "Library lines are at most 120 characters (the style guide's limit), so modules read without scrolling."
    def lines(f):  # without nbdev's generated `__all__` block, which nbdev wraps itself
        in_all = False
        for i, l in enumerate(f.read_text().splitlines(), 1):
            in_all = in_all or l.startswith('__all__ = [')
            if not in_all: yield i, l
            if in_all and l.rstrip().endswith(']'): in_all = False
    long = [f'{f.name}:{i}' for f in _modules() for i, l in lines(f) if len(l) > 120]
    assert not long, f'{len(long)} library lines over 120 characters, e.g. {long[:5]}; wrap them in the notebooks'

_EXPORT = r'^\s*#\s*\|\s*export'
_DEMO_CALL = r'\btest_(eq|ne|close|fail|is|eq_type|shuffled|stdout|warns|sig|fig_exists)\w*\('
# Export cells that cannot be demoed in a notebook, as `(notebook, first defined name): reason`. Keep it short.
NO_DEMO_OK = {}

def _imports_only(s: str) -> bool:
    "True for a cell of nothing but import statements (and comments)."
    import ast
    try: body = ast.parse(s).body
    except SyntaxError: return False
    return bool(body) and all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in body)

def _undemoed(fpath):
    "Export cells of `fpath` that define something and whose next code cell is not a demo calling a fastcore `test_*`."
    import re
    cells = json.loads(fpath.read_text())['cells']
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    out = []
    for i, c in enumerate(cells):
        s = src(c)
        if c['cell_type'] != 'code' or not re.match(_EXPORT, s): continue
        names = [a or b for a, b in re.findall(r'^(?:async\s+)?(?:def|class)\s+(\w+)|^(\w+)\s*(?::[^=\n]*)?=(?!=)', s, re.M)]
        if not names and not re.search(r'^@', s, re.M): continue  # imports only
        # the next code cell, past a demo's own imports (kept in their cell: nbdev's docs build runs import cells)
        nxt = next((d for d in cells[i + 1:] if d['cell_type'] == 'code' and not _imports_only(src(d))), None)
        nsrc = src(nxt) if nxt else ''
        if nxt is None or re.match(r'^\s*#\s*\|\s*(export|hide|default_exp)', nsrc) or not re.search(_DEMO_CALL, nsrc):
            if (fpath.name, names[0] if names else '') not in NO_DEMO_OK: out.append(f'{fpath.name}[{i}] {names[:4]}')
    return out

def test_each_export_has_a_demo():
    "A demo follows each exported definition: the next code cell is not an export/hide cell and runs a fastcore test."
    missing = [m for f in sorted((ROOT/'nbs').glob('*.ipynb')) for m in _undemoed(f)]
    assert not missing, (f'{len(missing)} export cells with no demo after them, e.g. {missing[:8]}; add a cell right '
                         'after each that runs the definition on tiny data and checks it with test_eq/test_close/test_fail')

def _export_cell_sizes():
    "(notebook, lines) of every export cell, the `#| export` line included."
    import re
    for f in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in json.loads(f.read_text())['cells']:
            s = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
            if c['cell_type'] == 'code' and re.match(_EXPORT, s): yield f.name, len(s.splitlines())

def test_export_cells_are_small():
    "Export cells hold one definition each, as in fastcore and claudette: at most 15 lines on average, none over 60."
    sizes = list(_export_cell_sizes())
    mean = sum(n for _, n in sizes) / len(sizes)
    big = [f'{nb} ({n} lines)' for nb, n in sizes if n > 60]
    assert mean <= 15 and not big, (f'export cells average {mean:.1f} lines (at most 15) and {len(big)} are over 60, '
                                    f'e.g. {big[:5]}; split them: one definition per cell, methods with @patch')

def test_functions_within_50_lines():
    "No library function is longer than 50 lines: long ones are a loop whose parts want names."
    import ast
    long = [f'{f.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)' for f in _modules()
            for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 50]
    assert not long, f'functions over 50 lines: {long}; split them into named helpers'

def test_no_module_imports_another_modules_private_name():
    "A `_name` stays inside its module: what another module needs is public in its one home."
    import ast
    bad = [f'{f.name}: {n.module}.{a.name}' for f in _modules() for n in ast.walk(ast.parse(f.read_text()))
           if isinstance(n, ast.ImportFrom) and (n.level or (n.module or '').startswith('saev_nb'))
           for a in n.names if a.name.startswith('_')]
    assert not bad, f'private names imported across modules: {bad}'

def _library_dataclasses():
    import dataclasses, importlib
    for f in _modules():
        if f.stem == '__main__': continue
        mod = importlib.import_module(f'saev_nb.{f.stem}')
        for obj in vars(mod).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__: yield obj

def test_one_home_per_concept():
    """A shard set to read, the Slurm settings, the SAE-against-shards check and the resumable step are each defined
    once: configs that read activations subclass `ShardSet`, commands that submit jobs nest `SlurmConfig`, and every
    step that writes a results folder goes through `core.Step`."""
    import ast, dataclasses, re
    from saev_nb.shards import ShardSet
    from saev_nb.jobs import SlurmConfig
    own = lambda c: set(c.__dict__.get('__annotations__', {}))
    cfgs = list(_library_dataclasses())
    shard_sets = [c for c in cfgs if {'shards', 'layer'} <= {f.name for f in dataclasses.fields(c)}]
    assert len(shard_sets) >= 4 and all(issubclass(c, ShardSet) for c in shard_sets), shard_sets
    assert [c.__name__ for c in cfgs if c is not ShardSet and own(c) & {'shards', 'layer', 'tokens'}
            and issubclass(c, ShardSet)] == [], 'a ShardSet subclass declares the shard-set fields again'
    slurm = [c.__name__ for c in cfgs if 'slurm_acct' in own(c)]
    assert slurm == ['SlurmConfig'], f'Slurm fields declared outside SlurmConfig: {slurm}'
    nesting = {c.__name__ for c in cfgs if any(f.name == 'slurm' for f in dataclasses.fields(c))}
    assert {'ShardsConfig', 'TrainConfig', 'InferenceConfig'} <= nesting, nesting
    defs = lambda name: [f.stem for f in _modules() for n in ast.walk(ast.parse(f.read_text()))
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
    for name in ('check_shards', 'Step', 'hold_lock', 'atomic_write', 'checked_file', 'slurm_executor', 'wait_jobs',
                 'remove_stale_tmp', 'save_tensors', 'nonfinite_where'):
        assert len(defs(name)) == 1, f'{name} defined in {defs(name)}'
    steps = {f.stem for f in _modules() if re.search(r'\bStep\(', f.read_text())}
    assert {'train', 'evaluate', 'visuals', 'probe', 'features', 'suppress'} <= steps, steps
