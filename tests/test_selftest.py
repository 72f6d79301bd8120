"`saev_nb selftest`: passes through the installed console script, and names the check a broken component fails."
import json, sys
from pathlib import Path

import pytest
import torch

import saev_nb.models
from saev_nb.loaders import ShuffledLoader
from saev_nb.selftest import GOALS, GPU_STEPS, STEPS, check_resume
from helpers import cli, cli_fails, cli_in_process, cli_in_process_fails, one_line_failure

QUIET = {'TQDM_DISABLE': '1'}  # the progress bar is allowed on stderr; the failure itself is one line
CPU_CHECKS = [n for s, g in GOALS.items() if s not in GPU_STEPS for n in g]


def _rows(stdout: str) -> dict[str, str]:
    "check name -> its result column (pass/FAIL), from the printed table."
    return {n: line.split()[-1] for line in stdout.splitlines() for n in CPU_CHECKS if line.startswith(n + ' ')}


def test_passes_through_the_console_script():
    r = cli('selftest', env=QUIET)
    assert _rows(r.stdout) == {n: 'pass' for n in CPU_CHECKS}, r.stdout
    assert r.stdout.splitlines()[0].split() == ['check', 'measured', 'goal', 'result']
    assert f'{len(CPU_CHECKS)} of {len(CPU_CHECKS)} checks passed in ' in r.stdout and 'on cpu' in r.stdout
    assert r.stderr.strip() == ''  # the steps' own log lines stay out of the terminal


def test_out_keeps_the_worlds_and_a_report(tmp_path):
    r = cli_in_process('selftest', '--out', tmp_path, '--checks', 'semseg', 'loader', env=QUIET)
    report = Path(r.stdout.strip().splitlines()[-1])
    assert report.name == 'report.json' and report.parent.parent == tmp_path
    rep = json.loads(report.read_text())
    assert rep['passed'] and [c['name'] for c in rep['checks']] == [*GOALS['loader'], *GOALS['semseg']]
    assert all(c['passed'] and c['note'] for c in rep['checks']) and rep['machine'].startswith('cpu')
    assert (report.parent/'shards').is_dir()  # the loader's scene shards are kept
    again = Path(cli_in_process('selftest', '--out', tmp_path, '--checks', 'semseg', env=QUIET).stdout.split()[-1])
    assert again.parent != report.parent  # every run gets a fresh folder: nothing is reused unchecked


def _off_by_a_little(real):
    def record(*args, **kw): return real(*args, **kw) * (1 + 1e-3)
    return record


def test_a_broken_shard_writer_fails_naming_the_check(monkeypatch):
    "The ViT recording seen by the shard writer is off by 0.1%: the `shards = forward` check fails, nothing else."
    real = saev_nb.models.record
    for mod in [m for name, m in sys.modules.items() if name.startswith('saev_nb')]:
        if getattr(mod, 'record', None) is real: monkeypatch.setattr(mod, 'record', _off_by_a_little(real))
    r = cli_in_process('selftest', '--checks', 'shards', check=False, env=QUIET)
    line = one_line_failure(r, contains='1 of 2 checks failed: shards = forward')
    assert 'do not start long runs' in line and 'shard labels' not in line
    assert _rows(r.stdout) == {'shards = forward': 'FAIL', 'shard labels wrong': 'pass'}
    assert 'FAIL shards = forward: max |shards - forward|' in r.stdout


def test_a_loader_that_drops_a_batch_fails_naming_the_checks(monkeypatch):
    real = ShuffledLoader.iter_batches
    def drop_third(self, *args, **kw):
        for i, b in enumerate(real(self, *args, **kw)):
            if i != 3: yield b
    monkeypatch.setattr(ShuffledLoader, 'iter_batches', drop_third)
    line = cli_in_process_fails('selftest', '--checks', 'loader', env=QUIET,
                                contains='2 of 3 checks failed: loader: tokens not once per epoch')
    assert 'loader: resume differs' in line and 'wrong values or labels' not in line


def test_a_step_that_raises_fails_all_its_checks(monkeypatch):
    def broken(dpath, device): raise RuntimeError('kernel launch failed\nmore detail')
    monkeypatch.setitem(STEPS, 'sweep', broken)
    r = cli_in_process('selftest', '--checks', 'sweep', 'semseg', check=False, env=QUIET)
    assert r.returncode == 2 and 'sweep recovers the atoms (nan, goal >= 0.9)' in r.stderr
    assert 'FAIL sweep recovers the atoms: RuntimeError: kernel launch failed' in r.stdout
    assert _rows(r.stdout)['semseg: class latents F1'] == 'pass'  # the other steps still ran


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_a_gpu_and_bad_requests_are_one_line(tmp_path):
    cli_fails('selftest', '--device', 'cuda', contains='--device cuda: torch sees no CUDA GPU')
    cli_in_process_fails('selftest', '--checks', 'amp', contains='--checks amp: certifies GPU paths')
    (tmp_path/'file').write_text('')
    cli_in_process_fails('selftest', '--out', tmp_path/'file'/'sub', contains='pass --out a folder you can write')


def test_resume_check_needs_a_real_resume(tmp_path, monkeypatch):
    "The GPU resume check, on the CPU: exact; a rerun that trains from scratch (checkpoints lost) does not pass."
    assert check_resume(tmp_path/'a', 'cpu')['GPU resume = uninterrupted'][0] == 0.0
    import saev_nb.selftest as st
    real = st.fit_dictionary
    def lose_checkpoints(cfgs, dpath, loader=None):
        if loader is not None and getattr(loader, 'at', 0) is None:  # the rerun: its checkpoints are gone
            for f in Path(dpath).glob('sae*/checkpoint.pt'): f.unlink()
        return real(cfgs, dpath, loader)
    monkeypatch.setattr(st, 'fit_dictionary', lose_checkpoints)
    value, note = check_resume(tmp_path/'b', 'cpu')['GPU resume = uninterrupted']
    assert value == float('inf') and 'resumed at batch 0' in note


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_selftest_passes():
    r = cli('selftest', '--device', 'cuda', env=QUIET)
    assert 'bf16/TF32 recovery gap' in r.stdout and 'GPU resume = uninterrupted' in r.stdout
