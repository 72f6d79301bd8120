"""Issue 23 for `saev_nb train` and the entry point, through the installed console script: a stop in any phase of
training (signals sent to the process group, as Slurm sends them) resumes where it stopped; Ctrl-C and SIGTERM are one
line; a sweep's grid is counted before it is built; sweep files that are devices, huge or nested without end, work that
does not fit in memory, stdout on a full disk, NaN in the validation shards and edited metadata are one line each."""
import json, os, signal, subprocess, threading, time
from pathlib import Path

import numpy as np
import pytest, torch
from safetensors.torch import load_file

from helpers import SAEV_NB, cli, cli_fails, cli_in_process_fails

def _shards(dpath, **kw):
    from saev_nb.shards import make_random_shards
    return make_random_shards(dpath, **{'n_examples': 64, 'layers': (0, 1), 'd_model': 32, 'content_tokens': 16, **kw})

def _train_args(runs, sh, *extra, val=None, n_val=512, n_train=128 * 24):
    return ['train', '--runs-root', runs, '--train-data.shards', sh, '--train-data.layer', 1, '--train-data.batch-size', 128,
            '--val-data.shards', val or sh, '--val-data.layer', 1, '--val-data.batch-size', 256, '--sae.d-model', 32,
            '--sae.exp-factor', 2, '--n-train', n_train, '--n-val', n_val, '--n-lr-warmup', 4, '--lr', '3e-3', *extra]

@pytest.fixture(scope='module')
def sh(tmp_path_factory): return _shards(tmp_path_factory.mktemp('sh')/'shards')

@pytest.fixture(scope='module')
def big_val(tmp_path_factory):
    "Validation shards of 576K tokens: validating a 256-latent SAE on them takes seconds, even on an idle machine."
    return _shards(tmp_path_factory.mktemp('val')/'shards', n_examples=36_000, seed=1)

class Stderr:
    "The stderr of a process, read by a thread as it comes (progress bars end lines with '\\r', not '\\n')."
    def __init__(self, p):
        self.text, self.p = '', p
        threading.Thread(target=self._read, daemon=True).start()
    def _read(self):
        while (b := os.read(self.p.stderr.fileno(), 4096)): self.text += b.decode(errors='replace')
    def lines(self):
        "The lines, without progress-bar output and blank lines."
        return [l for l in self.text.replace('\r', '\n').splitlines() if l.strip() and '%|' not in l]

def _start(*args, env=None):
    return subprocess.Popen([str(SAEV_NB), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, 'TQDM_DISABLE': '0', **(env or {})})
    # (progress bars on: notebooks run in-process by the suite may have set TQDM_DISABLE in this worker's environment)

def _wait_for(cond, p, what, timeout=300):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, f'the command ended before {what}'
        assert time.time() - t0 < timeout, f'no {what} after {timeout} s'
        time.sleep(0.02)

# --- 1: a stop after the last step resumes at validation --------------------------------------------------------------

def _long_validation(runs, sh, big_val):
    return _train_args(runs, sh, '--sae.exp-factor', 8, '--ckpt-every', 1000, val=big_val, n_val=10**7)

@pytest.fixture(scope='module')
def ref_run(sh, big_val, tmp_path_factory):
    "The uninterrupted run."
    return Path(cli(*_long_validation(tmp_path_factory.mktemp('ref'), sh, big_val)).stdout.strip().splitlines()[-1])

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_stop_during_validation_resumes_there_and_matches_an_uninterrupted_run(sh, big_val, ref_run, tmp_path, sig):
    args = lambda runs: _long_validation(runs, sh, big_val)
    run = tmp_path/'runs'/ref_run.name
    p = _start(*args(tmp_path/'runs'))
    err = Stderr(p)
    _wait_for(lambda: (run/'checkpoint.pt').exists(), p, 'the checkpoint of the last step')  # n_steps < --ckpt-every
    time.sleep(0.2)  # well inside validation
    os.killpg(p.pid, sig)
    p.wait(timeout=120); time.sleep(0.1)
    lines = err.lines()
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, err.text[-3000:])
    assert lines[0].startswith('saev_nb train: ') and 'during validation, after the last step (24)' in lines[0]
    assert 'rerun the same command to resume' in lines[0] and 'Traceback' not in err.text
    assert not (run/'eval.json').exists() and not (run/'sae.safetensors').exists()
    metrics_before = (run/'metrics.jsonl').read_bytes()
    again = cli(*args(tmp_path/'runs'))
    assert 'already trained to step 24 (checkpoint.pt); validating' in again.stderr, again.stderr[-2000:]
    assert (run/'metrics.jsonl').read_bytes() == metrics_before  # not one step trained again
    a, b = load_file(ref_run/'sae.safetensors'), load_file(run/'sae.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run/'eval.json').read_text()) == json.loads((ref_run/'eval.json').read_text())

def test_ckpt_every_off_still_checkpoints_a_stop_in_validation(sh, big_val, tmp_path):
    args = _train_args(tmp_path/'runs', sh, '--sae.exp-factor', 8, '--ckpt-every', 'off', val=big_val, n_val=10**7)
    p = _start(*args)
    err = Stderr(p)
    runs = tmp_path/'runs'
    last_row = lambda: any(f.read_text().endswith('\n') for f in runs.glob('*/metrics.jsonl'))  # --log-every 25: step 24
    _wait_for(last_row, p, 'the last step')
    time.sleep(0.2)  # inside validation (seconds long)
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120); time.sleep(0.1)
    assert p.returncode == 2 and len(err.lines()) == 1 and 'during validation' in err.lines()[0], err.text[-3000:]
    assert len(list(runs.glob('*/checkpoint.pt'))) == 1  # written by the stop
    assert 'already trained to step 24' in cli(*args).stderr

def test_stop_before_the_first_step_is_one_line_and_a_clean_restart(sh, tmp_path):
    "SIGTERM while the normalizer is fitted (start-up): one line, exit 143; the rerun trains from scratch as usual."
    big = _shards(tmp_path/'big', n_examples=20_000, seed=2)
    args = _train_args(tmp_path/'runs', big, '--train-data.normalize', val=sh)
    p = _start(*args)
    err = Stderr(p)
    _wait_for(lambda: list((tmp_path/'runs').glob('*/train_metadata.json')), p, 'start-up')
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120); time.sleep(0.1)
    assert p.returncode in (2, 143) and len(err.lines()) == 1, (p.returncode, err.text[-3000:])
    assert 'rerun the same command to resume' in err.lines()[0] and 'Traceback' not in err.text
    cli(*args)
    assert len(list((tmp_path/'runs').glob('*/eval.json'))) == 1

# --- 10: Ctrl-C and SIGTERM anywhere are one line ------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(sh, tmp_path_factory):
    r = cli(*_train_args(tmp_path_factory.mktemp('runs'), sh, '--sae.exp-factor', 8))
    return Path(r.stdout.strip().splitlines()[-1])

@pytest.mark.parametrize('sig,status,how', [(signal.SIGINT, 130, 'Ctrl-C'), (signal.SIGTERM, 143, 'SIGTERM')])
def test_interrupting_inference_is_one_line(trained, big_val, sig, status, how):
    p = _start('inference', '--run', trained, '--data.shards', big_val, '--data.layer', 1, '--data.batch-size', 256,
               '--force')
    err = Stderr(p)
    _wait_for(lambda: '%|' in err.text, p, 'the progress bar')
    time.sleep(0.3)
    os.killpg(p.pid, sig)
    p.wait(timeout=120); time.sleep(0.1)
    assert p.returncode == status, (p.returncode, err.text[-3000:])
    assert err.lines() == [f'saev_nb inference: interrupted ({how}); rerun the same command to resume'], err.text[-3000:]

# --- 12: messages that say what is wrong -----------------------------------------------------------------------------

def test_lock_message_does_not_advise_wait(sh, tmp_path):
    from saev_nb.core import hold_lock
    from saev_nb.runs import run_id, TrainConfig
    r = cli(*_train_args(tmp_path/'runs', sh))
    run = Path(r.stdout.strip().splitlines()[-1])
    with hold_lock(run, 'trainer of this run'):
        line = cli_fails(*_train_args(tmp_path/'runs', sh, '--force'), contains=f'(pid {os.getpid()}')
    assert '--wait' not in line and 'another trainer of this run is running' in line

def test_edited_metadata_is_damage_not_a_flag(tmp_path):
    sh = _shards(tmp_path/'sh')
    md = json.loads((sh/'metadata.json').read_text()); md['d_model'] = 0
    (sh/'metadata.json').write_text(json.dumps(md))
    line = cli_fails(*_train_args(tmp_path/'runs', sh), contains='metadata.json: edited after recording')
    assert '--sae.d-model' not in line

# --- 8, 9: sweep files -------------------------------------------------------------------------------------------------

def test_a_huge_grid_is_counted_and_refused_at_once(sh, tmp_path):
    f = tmp_path/'big.toml'
    f.write_text('lr = [' + ', '.join(f'{i}e-5' for i in range(1, 101)) + ']\nseed = [' + ', '.join(map(str, range(10_000)))
                 + ']\n')
    t0 = time.time()
    line = cli_fails(*_train_args(tmp_path/'runs', sh, '--sweep', f), contains='1000000 grid points (100 lr x 10000 seed)')
    assert time.time() - t0 < 60 and '--max-runs 1000000' in line
    f.write_text('seed = [1, 2, 3]\n')
    cli_in_process_fails(*_train_args(tmp_path/'runs', sh, '--sweep', f, '--max-runs', 2), contains='is more than --max-runs 2')
    assert not (tmp_path/'runs').exists()

def test_sweep_files_that_are_not_small_toml_files(sh, tmp_path):
    cli_fails(*_train_args(tmp_path/'runs', sh, '--sweep', '/dev/zero'), contains='/dev/zero: not a regular file')
    (deep := tmp_path/'deep.toml').write_text('lr = ' + '[' * 50_000 + ']' * 50_000 + '\n')
    cli_in_process_fails(*_train_args(tmp_path/'runs', sh, '--sweep', deep), contains='nested too deeply')
    (huge := tmp_path/'huge.toml').write_text('# ' + 'x' * (2 << 20) + '\n')
    cli_in_process_fails(*_train_args(tmp_path/'runs', sh, '--sweep', huge), contains='more than a sweep file can be')

# --- 11: work too big for memory, stdout on a full disk --------------------------------------------------------------

def test_work_beyond_free_memory_is_refused_before_it_starts(sh, tmp_path):
    cli_fails(*_train_args(tmp_path/'runs', sh, '--sae.exp-factor', 20_000_000), contains='GB free; lower --sae.exp-factor')
    assert not list((tmp_path/'runs').rglob('metrics.jsonl'))

def test_stdout_on_a_full_disk_is_one_line(sh, tmp_path):
    with open('/dev/full', 'w') as full:
        r = subprocess.run([str(SAEV_NB), *map(str, _train_args(tmp_path/'runs', sh))], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=300, env={**os.environ, 'TQDM_DISABLE': '1'})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith('saev_nb train: cannot write the results to stdout (No space left on device)')
    assert len(list((tmp_path/'runs').glob('*/eval.json'))) == 1  # the work itself is done

# --- 2: NaN in the validation shards ---------------------------------------------------------------------------------

def test_nonfinite_validation_shards_stop_naming_the_example(sh, tmp_path):
    from saev_nb.shards import Metadata
    val = _shards(tmp_path/'nan', seed=0)
    md = Metadata.load(val)
    arr = np.memmap(val/'acts000000.bin', dtype=np.float32, mode='r+', shape=md.shard_shape)
    arr[3, 1, 5, 7] = np.inf; arr.flush(); del arr
    line = cli_fails(*_train_args(tmp_path/'runs', sh, val=val, n_val=10**7), env={'TQDM_DISABLE': '1'},
                     contains='non-finite activations in the validation data')
    assert 'acts000000.bin: inf at example 3, layer 1, patch 4' in line and 'shards validate --full' in line
    assert not list((tmp_path/'runs').rglob('eval.json'))

# --- 11: the trainer's own checkpoint ----------------------------------------------------------------------------------

class _Evil:
    "A pickle that would run a command when loaded without `weights_only`."
    def __init__(self, fpath): self.fpath = fpath
    def __reduce__(self): return (os.system, (f'touch {self.fpath}',))

@pytest.mark.parametrize('damage', ['empty', 'pickle', 'keys'])
def test_damaged_trainer_checkpoint_is_one_line(sh, tmp_path, damage):
    "An empty checkpoint.pt, one of other keys, or a malicious pickle: one line (the pickle's code never runs)."
    import pickle
    r = cli(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8))
    run = Path(r.stdout.strip().splitlines()[-1]); ck = run/'checkpoint.pt'
    assert ck.exists()
    (run/'eval.json').unlink()  # unfinished again: the rerun resumes from the checkpoint
    if damage == 'empty': ck.write_bytes(b'')
    elif damage == 'pickle': ck.write_bytes(pickle.dumps(_Evil(tmp_path/'PWNED')))
    else: torch.save({'weights': torch.zeros(3)}, ck)
    line = cli_fails(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8),
                     contains=f'{ck}: damaged or not a checkpoint of this run')
    assert 'rerun with --force' in line and not (tmp_path/'PWNED').exists()
