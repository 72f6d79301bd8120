import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Single-threaded torch per test worker: the suite runs 2 pytest workers on 2 cores.
os.environ.setdefault('OMP_NUM_THREADS', '1')

@pytest.fixture(scope='session')
def root_dpath(): return ROOT
