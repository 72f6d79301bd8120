"""Every notebook in nbs/ and papers/ runs top to bottom through nbdev's own test engine (`nbdev.test.test_nb`),
skipping the cells flagged in settings.ini's `tst_flags` (`slow`, `gpu`, `notest`). One pytest test per notebook,
so notebooks count in the closing `N passed` line."""
from configparser import ConfigParser
from pathlib import Path
import pytest
import nbdev.test as nbt  # the module, not `test_nb` itself, so pytest does not collect it

ROOT = Path(__file__).resolve().parents[1]
_cfg = ConfigParser(delimiters=['=']); _cfg.read(ROOT/'settings.ini')
SKIP_FLAGS = _cfg['DEFAULT']['tst_flags'].split()
NB_FPATHS = sorted(p for d in ('nbs', 'papers') for p in (ROOT/d).glob('*.ipynb') if not p.name.startswith(('_', '.')))

@pytest.mark.parametrize('nb_fpath', NB_FPATHS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_notebook(nb_fpath):
    ok, secs = nbt.test_nb(nb_fpath, skip_flags=SKIP_FLAGS, basepath=ROOT)
    assert ok, f'{nb_fpath.relative_to(ROOT)} failed after {secs:.0f} s (traceback above in the captured stderr)'
