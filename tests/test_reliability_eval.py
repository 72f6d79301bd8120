"""Issue 23 for `inference` and `visuals`, through the installed command: NaN in the shards, a token matrix of the
wrong shape or damaged, unwritable output folders, a full disk, leftovers of a killed run."""
import os, resource, shutil, signal, subprocess, time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import SAEV_NB, cli, cli_fails, cli_in_process, one_line_failure, fake_inference
from saev_nb.sae import SAE, SAEConfig, save_sae
from saev_nb.shards import Metadata, make_random_shards, shard_name

def _sae_run(dpath, d_model=8):
    "A run directory holding only an untrained SAE (no training config: the shards' single layer is evaluated)."
    torch.manual_seed(0)
    save_sae(SAE(SAEConfig(d_model=d_model, d_sae=32)), dpath / 'sae.safetensors')
    return dpath


def _unprivileged(args, cwd, timeout=600):
    """The console script without the power to ignore file modes: root keeps its uid but loses CAP_DAC_OVERRIDE (and
    DAC_READ_SEARCH) through `setpriv`, so a 0555 folder refuses it as it refuses any user; others run as themselves.
    (Dropping to `nobody` does not work here: this interpreter lives under /root, mode 0700.)"""
    pre = []
    if os.geteuid() == 0:
        if shutil.which('setpriv') is None: pytest.skip('running as root without setpriv: cannot drop CAP_DAC_OVERRIDE')
        pre = ['setpriv', '--bounding-set', '-dac_override,-dac_read_search', '--']
    return subprocess.run([*pre, str(SAEV_NB), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'TQDM_DISABLE': '1'}, cwd=cwd)


# ------------------------------------------------------------------------------------------------------- inference

def test_inference_stops_at_a_nan_in_the_shards(tmp_path):
    "Item 2: one NaN in an acts file is exit 2 and one line naming the shard file, example and patch; nothing written."
    d = make_random_shards(tmp_path / 'shards', n_examples=300, layers=(0,), d_model=8, content_tokens=4,
                           max_tokens_per_shard=100 * 5)
    run = _sae_run(tmp_path / 'run')
    off = (1 * 5 + 2) * 8 * 4 + 3 * 4  # example 1 of shard 2 (global 201), token 2 (patch 1), dim 3
    with open(d / shard_name(2), 'r+b') as f: f.seek(off); f.write(np.array([np.nan], '<f4').tobytes())
    line = cli_fails('inference', '--run', run, '--data.shards', d, '--data.batch-size', 64,
                     contains=f'{d / shard_name(2)}: nan at example 201, patch 1', env={'TQDM_DISABLE': '1'})
    assert f'saev_nb shards validate --full {d}' in line
    out = run / 'inference' / d.name / 'layer0-content'
    assert not (out / 'metrics.json').exists() and not (out / 'token_acts.npz').exists()
    assert not list(out.glob('.tmp.*'))


def test_inference_leaves_the_old_result_when_a_nan_stops_it(tmp_path):
    "A NaN found by a --force rerun leaves the earlier evaluation as it was (nothing half-written)."
    d = make_random_shards(tmp_path / 'shards', n_examples=20, layers=(0,), d_model=8, content_tokens=4)
    run = _sae_run(tmp_path / 'run')
    out = Path(cli_in_process('inference', '--run', run, '--data.shards', d).stdout.strip().splitlines()[-1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith('.')}
    with open(d / shard_name(0), 'r+b') as f: f.seek((3 * 5 + 1) * 8 * 4); f.write(np.array([np.inf], '<f4').tobytes())
    cli_fails('inference', '--run', run, '--data.shards', d, '--force', contains='inf at example 3, patch 0',
              env={'TQDM_DISABLE': '1'})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith('.')} == before


def test_finite_check_costs_little(tmp_path):
    "The per-batch check is one reduction: timed with and without it on the same batches, in one sitting."
    from saev_nb.evaluate import evaluate_batches
    from saev_nb.loaders import OrderedConfig, OrderedLoader
    d = make_random_shards(tmp_path / 'shards', n_examples=2048, layers=(0,), d_model=64, content_tokens=16)
    batches = list(OrderedLoader(OrderedConfig(shards=d, layer=0, batch_size=1024)))
    sae = SAE(SAEConfig(d_model=64, d_sae=512))
    def t(check):
        t0 = time.perf_counter(); evaluate_batches(sae, batches, 2048 * 16, 16, check_finite=check)
        return time.perf_counter() - t0
    t(True); t(False)  # warm-up
    on, off = [], []
    for _ in range(4): on.append(t(True)); off.append(t(False))  # interleaved: shared cores slow both alike
    assert min(on) < min(off) * 1.25 + 0.02, (on, off)  # loose: CI cores are shared (measured: see the report)


def test_inference_removes_leftovers_of_a_killed_run(tmp_path):
    "Item 13: `.tmp.<dead pid>.*` files in the output folder are removed by the next run (computing or skipping)."
    d = make_random_shards(tmp_path / 'shards', n_examples=20, layers=(0,), d_model=8, content_tokens=4)
    run = _sae_run(tmp_path / 'run')
    out = run / 'inference' / d.name / 'layer0-content'
    out.mkdir(parents=True)
    dead = out / f'.tmp.{2 ** 22 + 1}.token_acts.npz'  # above any pid_max: no live process
    dead.write_bytes(b'half')
    live = out / f'.tmp.{os.getpid()}.freqs.npy'  # a live writer's file is kept
    live.write_bytes(b'mine')
    r = cli('inference', '--run', run, '--data.shards', d)
    assert Path(r.stdout.strip().splitlines()[-1]) == out and (out / 'metrics.json').exists()
    assert not dead.exists() and live.exists()
    dead.write_bytes(b'half')  # as a killed --force rerun of a finished evaluation leaves it
    r = cli_in_process('inference', '--run', run, '--data.shards', d)
    assert 'already evaluated' in r.stderr and 'skipping' in r.stderr and not dead.exists() and live.exists()


def test_inference_refuses_an_unwritable_run_before_work(tmp_path):
    "Item 11: an output folder this user cannot write is one line before any evaluation, not a PermissionError after."
    d = make_random_shards(tmp_path / 'shards', n_examples=20, layers=(0,), d_model=8, content_tokens=4)
    run = _sae_run(tmp_path / 'run')
    ok = _sae_run(tmp_path / 'ok')
    run.chmod(0o555)  # readable, but run/inference cannot be created
    r = _unprivileged(['inference', '--run', ok, run, '--data.shards', d], tmp_path)
    line = one_line_failure(r, contains=f'{run}: not writable by this user')
    assert line.startswith('saev_nb inference: ') and 'make it writable' in line
    assert not (ok / 'inference').exists()  # checked for every run before the first evaluation


# --------------------------------------------------------------------------------------------------------- visuals

@pytest.fixture(scope='module')
def gallery_eval(tmp_path_factory): return fake_inference(tmp_path_factory.mktemp('rel_vis'))


@pytest.fixture
def swapped_acts(gallery_eval):
    "Replace the gallery's token_acts.npz for one test, then put the good one back."
    fpath = gallery_eval[2]
    good = fpath.read_bytes()
    yield fpath
    fpath.write_bytes(good)


def test_visuals_refuses_token_acts_of_the_wrong_shape(gallery_eval, swapped_acts, tmp_path):
    "Item 5: 512 rows for 4096 tokens is one line naming the file and the rerun with --force; no gallery written."
    run, shards, _ = gallery_eval
    sp.save_npz(swapped_acts, sp.csr_matrix(np.ones((512, 32), np.float32)))
    line = cli_fails('visuals', '--run', run, '--shards', shards, '--top-k', 2, '--out', tmp_path / 'g',
                     contains=f'{swapped_acts}: 512 x 32 token activations, but these shards need 4096 x 32')
    assert line.endswith(f'--data.shards {shards} --data.layer 2 --data.tokens content --force`')
    assert not (tmp_path / 'g').exists()
    sp.save_npz(swapped_acts, sp.csr_matrix(np.ones((4096, 16), np.float32)))  # another SAE's width
    cli_fails('visuals', '--run', run, '--shards', shards, '--out', tmp_path / 'g', contains='but these shards need 4096 x 32')


@pytest.mark.parametrize('n_bytes', [0, 200])
def test_visuals_on_a_damaged_token_acts_is_one_line(gallery_eval, swapped_acts, tmp_path, n_bytes):
    "Item 11: an empty or truncated token_acts.npz is one line (damaged; the inference command with --force)."
    run, shards, _ = gallery_eval
    swapped_acts.write_bytes(swapped_acts.read_bytes()[:n_bytes])
    line = cli_fails('visuals', '--run', run, '--shards', shards, '--out', tmp_path / 'g',
                     contains=f'{swapped_acts}: damaged')
    assert 'saev_nb inference --run' in line and line.endswith('--force`') and not (tmp_path / 'g').exists()


def test_visuals_on_a_full_disk_is_one_line(gallery_eval, tmp_path):
    "Item 11: a PNG write that hits the file-size limit (as a full disk would) is one line, no half-written file."
    run, shards, _ = gallery_eval
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    out = tmp_path / 'g'
    args = ['visuals', '--run', run, '--shards', shards, '--latents', 0, 1, 2, '--n-latents', 0, '--top-k', 8, '--out', out]
    r = subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True,
                       preexec_fn=limit, timeout=600, env={**os.environ, 'TQDM_DISABLE': '1'})
    line = one_line_failure(r, contains='disk full')
    assert line.startswith(f'saev_nb visuals: {out}') and 'rerun the same command' in line
    assert not list(out.rglob('.tmp.*')) and not (out / 'index.html').exists()


def test_visuals_refuses_an_unwritable_out_before_work(gallery_eval, tmp_path):
    "Item 11: --out inside a folder this user cannot write is one line before anything is drawn."
    run, shards, _ = gallery_eval
    (tmp_path / 'ro').mkdir(); (tmp_path / 'ro').chmod(0o555)
    r = _unprivileged(['visuals', '--run', run, '--shards', shards, '--out', tmp_path / 'ro' / 'g'], tmp_path)
    line = one_line_failure(r, contains=f"{tmp_path / 'ro'}: not writable by this user")
    assert 'pass --out with a folder you can write' in line and not (tmp_path / 'ro' / 'g').exists()


def test_visuals_refuses_a_token_acts_that_is_not_a_file(gallery_eval, swapped_acts, tmp_path):
    "Item 9 for token_acts.npz: a fifo (or /dev/zero) in its place is one line at once (core.checked_file), not a hang."
    run, shards, _ = gallery_eval
    swapped_acts.unlink(); os.mkfifo(swapped_acts)
    try:
        line = cli_fails('visuals', '--run', run, '--shards', shards, '--out', tmp_path / 'g',
                         contains=f'{swapped_acts}: not a regular file, expected the sparse token activations')
        assert line.endswith('--force`') and not (tmp_path / 'g').exists()
    finally: swapped_acts.unlink()
