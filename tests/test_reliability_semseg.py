"""Issue 23, the semseg steps through the installed command: a run stopped with other flags is redone (not reported
from stale probes), a second writer is refused, NaN/inf in the shards stop every step with the location, bad feature
rows, a full disk and an unwritable output folder are one line, and written files follow the user's umask."""
import hashlib, json, os, resource, shutil, signal, subprocess, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saev_nb.core import hold_lock
from saev_nb.probe import probe_train_cli
from saev_nb.sae import SAE, SAEConfig, Relu, save_sae
from saev_nb.shards import Metadata

from helpers import SAEV_NB, cli, cli_fails, data_sae_run, one_line_failure, run, tiny_shards

QUIET = {'TQDM_DISABLE': '1'}  # no progress bars: stderr holds only what the command says

def _fails(*args, contains=''): return cli_fails(*args, contains=contains, env=QUIET)


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    "Tiny generated data, shards at blocks 2 and 3, a data-initialised SAE on block 2, one probe on block 3."
    t = tiny_shards(tmp_path_factory.mktemp('rel'), seed=3)
    run_dpath, _, _ = data_sae_run(t, d_sae=256)
    out = t['dpath']/'semseg'
    run(probe_train_cli, '--train-acts.shards', t['train'], '--train-acts.layer', 3, '--val-acts.shards', t['val'],
        '--imgs.root', t['root'], '--learning-rate', 1e-2, '--n-epochs', 3, '--batch-size', 512, '--out', out)
    return {**t, 'run': run_dpath, 'out': out}


def _train_args(p, out, *extra):
    return ('semseg', 'train', '--train-acts.shard-root', p['train'], '--val-acts.shard-root', p['val'],
            '--imgs.root', p['root'], '--batch-size', 512, '--out', out, *extra)

def _features_args(p, out, shards=None):
    return ('semseg', 'features', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', shards or p['val'],
            '--imgs.root', p['root'], '--max-freq', 0.6, '--purity', 0.8, '--out', out)

def _sha(fpath): return hashlib.sha256(Path(fpath).read_bytes()).hexdigest()

def _probe(fpath) -> tuple[dict, dict]:
    "A probe checkpoint's tensors and metadata (safetensors orders its metadata keys at random: compare them parsed)."
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(fpath), 'pt') as f: meta = f.metadata()
    return load_file(str(fpath)), {k: json.loads(v) if k == 'meta' else v for k, v in meta.items()}


# ---- item 3: a run stopped with other flags is redone, never reported from stale probes --------------------------

def test_interrupted_run_with_other_flags_is_retrained_not_skipped(pipe, tmp_path):
    out = tmp_path/'semseg'
    flags_a = _train_args(pipe, out, '--n-epochs', 3)
    first = cli(*flags_a)
    ckpt = Path(first.stdout.split(': ')[-1].strip().splitlines()[0])
    ckpt_sha, settings, (ref_t, ref_meta) = _sha(ckpt), out/'logs'/'train-settings.json', _probe(ckpt)
    assert settings.is_file() and ckpt.is_file()
    # the same probe folder (same lr and wd) with --n-epochs 1 --seed 7, stopped by SIGTERM to its process group
    p = subprocess.Popen([str(SAEV_NB), *map(str, _train_args(pipe, out, '--n-epochs', 1, '--seed', 7))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while settings.exists():  # the step removes its settings first: from here on it has begun writing
        assert p.poll() is None and time.time() - t0 < 120, 'the other run ended before it began writing'
        time.sleep(0.005)
    while _sha(ckpt) == ckpt_sha and p.poll() is None and time.time() - t0 < 120: time.sleep(0.005)  # a new probe
    os.killpg(p.pid, signal.SIGTERM)
    p.communicate(timeout=60)
    if p.returncode != 0: assert not settings.exists()  # stopped half-way: no settings left behind
    # (if it finished first, its settings are the other flags'; either way the first run's are gone)
    # the original command retrains instead of reporting the other run's probe, and reports the real mIoU
    again = cli(*flags_a)
    assert 'skipping' not in again.stderr, again.stderr
    assert again.stdout == first.stdout  # the same best-probe line: the real mIoU, not the other run's
    tensors, meta = _probe(ckpt)
    assert meta == ref_meta and all(torch.equal(tensors[k], ref_t[k]) for k in ref_t)  # the same probe, exactly
    assert 'skipping' in cli(*flags_a).stderr  # now finished with these settings


def test_second_concurrent_train_into_the_same_out_is_one_line(pipe, tmp_path):
    out = tmp_path/'semseg'
    with hold_lock(out/'logs', fname='.step.lock'):  # as a running `semseg train` holds it
        line = _fails(*_train_args(pipe, out, '--n-epochs', 1), contains='another run writing')
    assert f'{out/"logs"}: another run writing' in line and f'pid {os.getpid()}' in line, line
    assert not (out/'checkpoints').exists() and not (out/'logs'/'results.csv').exists()  # nothing written


# ---- item 2: NaN/inf in the shards stop every semseg step with the location -----------------------------------

def _poisoned(shards: Path, dpath: Path, example: int, stored_token: int, value=float('nan')) -> Path:
    "A copy of a shard directory with `value` at one example and token of every recorded layer."
    copy = dpath/shards.name
    shutil.copytree(shards, copy)
    md = Metadata.load(copy)
    arr = np.memmap(copy/'acts000000.bin', dtype=md.np_dtype, mode='r+', shape=md.shard_shape)
    arr[example, :, stored_token, 3] = value; arr.flush(); del arr
    return copy


def test_nonfinite_shards_stop_every_semseg_step_naming_the_example(pipe, tmp_path):
    md = Metadata.load(pipe['val'])
    prefix = md.tokens_per_example - md.content_tokens_per_example  # CLS (and registers) stored first
    bad_val = _poisoned(pipe['val'], tmp_path/'v', 5, prefix + 4)
    bad_train = _poisoned(pipe['train'], tmp_path/'t', 9, prefix + 2, float('inf'))
    fix = 'saev_nb shards validate --full'
    # semseg train: in the training batches (shuffled tokens) and in validation
    line = _fails(*_train_args({**pipe, 'train': bad_train}, tmp_path/'a', '--n-epochs', 1), contains=fix)
    assert f'{bad_train}/acts000000.bin: inf at example 9, layer 3, patch 2' in line, line
    line = _fails(*_train_args({**pipe, 'val': bad_val}, tmp_path/'b', '--n-epochs', 1), contains=fix)
    assert f'{bad_val}/acts000000.bin: nan at example 5, layer 3, patch 4' in line, line
    assert not (tmp_path/'b'/'logs'/'results.csv').exists() and not (tmp_path/'b'/'logs'/'train-settings.json').exists()
    # semseg validate
    _fails('semseg', 'validate', '--acts.shard-root', bad_val, '--imgs.root', pipe['root'], '--ckpts',
              pipe['out']/'checkpoints', '--out', tmp_path/'c', contains='nan at example 5, layer 3, patch 4')
    # semseg features (the SAE's layer 2)
    line = _fails(*_features_args(pipe, tmp_path/'d', bad_val), contains=fix)
    assert 'nan at example 5, layer 2, patch 4' in line and not (tmp_path/'d'/'features'/'features.csv').exists()
    # semseg suppress (SAE on layer 2, probe on layer 3), with features chosen on the clean training shards
    cli(*_features_args(pipe, tmp_path/'e', pipe['train']))
    line = _fails('semseg', 'suppress', '--sae-ckpt', pipe['run']/'sae.safetensors', '--acts.shard-root', bad_val,
                     '--probe', next((pipe['out']/'checkpoints').glob('*/probe.safetensors')),
                     '--features', tmp_path/'e'/'features'/'features.csv', '--n-boot', 50, '--out', tmp_path/'e',
                     contains=fix)
    assert f'{bad_val}/acts000000.bin: nan at example 5, layer 2' in line, line
    assert not (tmp_path/'e'/'suppress'/'summary.csv').exists()


# ---- item 11: bad feature rows, a full disk, an unwritable output folder ----------------------------------------

@pytest.mark.parametrize('col,val,msg', [('latent', 999999, 'line 3: latent 999999 is not a latent 0..255 of this SAE'),
                                         ('class', 500, 'line 3: class 500 is not a class 1..150')])
def test_feature_table_naming_a_missing_latent_or_class_is_one_line(pipe, tmp_path, col, val, msg):
    feats = tmp_path/'features'/'features.csv'
    cli(*_features_args(pipe, tmp_path, pipe['train']))
    df = pd.read_csv(feats).astype({col: object}); df.loc[1, col] = val; df.to_csv(feats, index=False)
    _fails('semseg', 'suppress', '--sae-ckpt', pipe['run']/'sae.safetensors', '--acts.shard-root', pipe['val'],
              '--probe', next((pipe['out']/'checkpoints').glob('*/probe.safetensors')), '--features', feats,
              '--out', tmp_path, contains=f'{feats}: {msg}; fix the row or rerun `saev_nb semseg features`')
    assert not (tmp_path/'suppress').exists()


def _limited(args, max_bytes):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, preexec_fn=limit, timeout=600,
                          env={**os.environ, **QUIET})


def test_full_disk_in_every_semseg_step_is_one_line(pipe, tmp_path):
    out = tmp_path/'semseg'
    line = one_line_failure(_limited(_train_args(pipe, out, '--n-epochs', 1), 20_000), 'disk full')
    assert line.startswith('saev_nb semseg train: ') and 'probe.safetensors: disk full' in line, line
    line = one_line_failure(_limited(_features_args(pipe, out, pipe['train']), 1_000), 'disk full')
    assert 'latent-stats.safetensors: disk full' in line, line
    cli(*_features_args(pipe, out, pipe['train']))
    line = one_line_failure(_limited(('semseg', 'suppress', '--sae-ckpt', pipe['run']/'sae.safetensors',
                                      '--acts.shard-root', pipe['val'], '--probe',
                                      next((pipe['out']/'checkpoints').glob('*/probe.safetensors')),
                                      '--n-boot', 50, '--out', out), 1_000), 'disk full')
    assert f"{out/'suppress'/'per-class.csv'}: disk full" in line, line
    assert not list(out.rglob('.tmp.*'))  # nothing half-written
    assert not (out/'logs'/'train-settings.json').exists() and not (out/'suppress'/'settings.json').exists()


def test_unwritable_out_is_refused_before_any_work(pipe, tmp_path):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def as_plain_user():  # root writes anywhere: drop CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP) so modes apply to it too
        if os.geteuid() == 0 and libc.prctl(24, 1, 0, 0, 0) != 0: os._exit(99)
    ro = tmp_path/'ro'; ro.mkdir(); os.chmod(ro, 0o555)
    try:
        t0 = time.time()
        r = subprocess.run([str(SAEV_NB), *map(str, _train_args(pipe, ro/'semseg', '--n-epochs', 50))],
                           capture_output=True, text=True, preexec_fn=as_plain_user, timeout=300)
        if r.returncode == 99: pytest.skip('running as root without CAP_SETPCAP: cannot make a folder unwritable')
        one_line_failure(r, f'{ro}: not writable by this user')
        assert time.time() - t0 < 60 and not list(ro.iterdir())  # before the 50 epochs, and nothing made
    finally: os.chmod(ro, 0o755)


# ---- item 12: probe and latent-statistics files follow the user's umask -----------------------------------------

def test_probe_and_latent_stats_follow_the_umask(pipe, tmp_path):
    def umask_022(): os.umask(0o022)
    out = tmp_path/'semseg'
    for args in (_train_args(pipe, out, '--n-epochs', 1), _features_args(pipe, out, pipe['train'])):
        r = subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, preexec_fn=umask_022)
        assert r.returncode == 0, r.stderr[-2000:]
    files = [*out.glob('checkpoints/*/probe.safetensors'), out/'features'/'latent-stats.safetensors']
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o644 for f in files), \
        [(f.name, oct(f.stat().st_mode)) for f in files]


# ---- item 10: Ctrl-C or SIGTERM in the semseg steps and the gallery is one line ------------------------------------

def _stopped(args, delays_s=(2.5, 4.0, 6.0), sig=signal.SIGINT):
    "The command stopped by `sig` (to its process group) after each delay until one lands mid-run: (rc, stderr)."
    for delay_s in delays_s:
        p = subprocess.Popen([str(SAEV_NB), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, **QUIET})
        time.sleep(delay_s); os.killpg(p.pid, sig)
        out, err = p.communicate(timeout=120)
        if p.returncode != 0: return p.returncode, err
    return 0, err  # finished before every signal: nothing interrupted

def test_stopping_semseg_steps_is_one_line(pipe, tmp_path):
    p = pipe
    probe = next((p['out']/'checkpoints').glob('*/probe.safetensors'))
    cli(*_features_args(p, tmp_path/'f0'), env=QUIET)
    features = next((tmp_path/'f0').rglob('features.csv'))
    cmds = {'train': _train_args(p, tmp_path/'t', '--n-epochs', 400),
            'features': _features_args(p, tmp_path/'f'),
            'suppress': ('semseg', 'suppress', '--sae-ckpt', p['run']/'sae.safetensors', '--acts.shard-root', p['val'],
                         '--probe', probe, '--features', features, '--n-boot', 20000, '--batch-size', 64,
                         '--out', tmp_path/'s')}
    stopped = 0
    for name, args in cmds.items():
        rc, err = _stopped(args)
        if rc == 0: continue
        stopped += 1
        assert rc == 130 and err.strip().count('\n') == 0 and 'Traceback' not in err, (name, rc, err[-2000:])
        assert 'interrupted (Ctrl-C)' in err, (name, err)
    assert stopped >= 2, 'the commands finished before every signal: nothing was interrupted'
