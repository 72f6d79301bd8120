"""The Slurm paths against a real one-node Slurm cluster (`../shared/tools/slurm-local.sh`: slurmctld + slurmd on this machine).
The session fixture starts the cluster where it can (root, script present) and stops it at the end only if it started it;
elsewhere every test here skips with the reason. Tiny data and SAEs: the whole file runs in about three minutes on 2 cores."""
import json, os, re, shutil, subprocess, time
from pathlib import Path

import pytest

from helpers import cli, tiny_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT.parent / 'shared' / 'tools' / 'slurm-local.sh'
ACCT = ('--slurm-acct', 'saev-test', '--slurm-partition', 'debug')


def _cluster_up() -> bool:
    if shutil.which('sinfo') is None: return False
    r = subprocess.run(['sinfo', '-h', '-o', '%t'], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s in r.stdout for s in ('idle', 'mix', 'alloc'))


@pytest.fixture(scope='session')
def slurm():
    "A running one-node Slurm cluster with partition `debug` (started here if needed), or a skip that says why not."
    started = False
    if not _cluster_up():
        if not SCRIPT.is_file(): pytest.skip(f'{SCRIPT} not found: no local Slurm cluster to test against')
        if os.geteuid() != 0: pytest.skip(f'{SCRIPT.name} needs root to start slurmctld/slurmd (and to install slurm-wlm and munge)')
        r = subprocess.run(['bash', str(SCRIPT)], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not _cluster_up(): pytest.skip(f'{SCRIPT.name} could not start Slurm: {(r.stderr or r.stdout).strip()[-300:]}')
        started = True
    yield 'debug'
    if started: subprocess.run(['bash', str(SCRIPT), 'stop'], capture_output=True, timeout=120)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "Tiny generated scenes recorded locally (blocks 2 and 3 of the tiny ViT), and two tiny SAEs trained on block 3."
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.sae import SAEConfig, TopK
    from saev_nb.runs import TrainConfig
    from saev_nb.sae import Vanilla
    from saev_nb.train import train
    tmp = tmp_path_factory.mktemp('slurm')
    d = tiny_shards(tmp)
    (tmp / 'two.toml').write_text('seed = [1, 2]\n')
    td = ShuffledConfig(shards=d['train'], layer=3, batch_size=512)
    d['runs'] = train(TrainConfig(train_data=td, val_data=td, sae=SAEConfig(d_model=128, d_sae=256, activation=TopK(top_k=8)), objective=Vanilla(),
                                  n_train=48 * 64 * 2, n_val=1024, lr=3e-3, n_lr_warmup=2, runs_root=tmp / 'runs', sweep=tmp / 'two.toml'), progress=False)
    return d


def _job_ids(stderr: str) -> list[str]:
    m = re.search(r"submitted \d+ Slurm jobs? \([^)]*\): ([\d_, ]+);", stderr)
    assert m, stderr
    return [j.strip() for j in m.group(1).split(',')]


def _wait_squeue(ids, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = subprocess.run(['squeue', '-h', '-j', ','.join(ids), '-o', '%i'], capture_output=True, text=True)
        if not r.stdout.strip(): return
        time.sleep(2)
    raise AssertionError(f'jobs {ids} still queued after {timeout} s')


def test_shards_through_two_array_jobs_equal_local_bytes(slurm, data, tmp_path):
    log_to = tmp_path / 'logs'
    r = cli('shards', '--shards-root', tmp_path / 'shards', '--family', 'clip', '--ckpt', 'saev-tiny/random', '--layers', 2, 3, '--batch-size', 32,
            '--n-workers', 0, '--n-jobs', 2, *ACCT, '--log-to', log_to, 'data:img-seg-folder', '--data.root', data['root'], '--data.split', 'training')
    dpath = Path(r.stdout.strip().splitlines()[-1])
    assert dpath.name == data['train'].name  # same metadata, same directory name
    files = sorted(p.name for p in data['train'].iterdir() if p.suffix in ('.bin', '.json'))
    assert any(f.startswith('acts') for f in files) and 'labels.bin' in files
    for f in files: assert (dpath / f).read_bytes() == (data['train'] / f).read_bytes(), f
    assert 'Bypassing sacct' not in r.stderr
    assert len(list(log_to.glob('*_log.out'))) == 2  # two array tasks ran on Slurm


def test_train_sweep_through_slurm_trains_every_sae(slurm, data, tmp_path):
    (tmp_path / 'sweep.toml').write_text('lr = [3e-3, 1e-3]\n[sae]\nd_sae = [128, 256]\n')
    args = ('train', '--train-data.shards', data['train'], '--train-data.layer', 3, '--val-data.shards', data['val'], '--val-data.layer', 3,
            '--train-data.batch-size', 512, '--val-data.batch-size', 512, '--n-train', 48 * 64 * 2, '--n-val', 1024, '--n-lr-warmup', 2,
            '--sae.d-model', 128, '--runs-root', tmp_path / 'runs', '--sweep', tmp_path / 'sweep.toml', '--max-parallel', 2,
            '--log-to', tmp_path / 'logs', *ACCT, 'objective:vanilla')
    r = cli(*args)  # default: submit and return
    ids = _job_ids(r.stderr)
    assert len(ids) == 2 and 'logs: ' + str(tmp_path / 'logs') in r.stderr and 'squeue -j' in r.stderr and '--wait' in r.stderr
    assert 'Bypassing sacct' not in r.stderr
    # the memory asked for is what the job needs (a few GB here), not a fixed 64 GB
    script = (tmp_path / 'logs' / f'{ids[0]}_submission.sh').read_text()
    mem = int(re.search(r'#SBATCH --mem=(\d+)GB', script).group(1))
    assert 3 <= mem <= 8, script
    _wait_squeue(ids)
    runs = sorted(p for p in (tmp_path / 'runs').iterdir() if p.is_dir())
    assert len(runs) == 4 and all((p / 'eval.json').exists() and (p / 'sae.safetensors').exists() for p in runs)
    assert sorted(json.loads((p / 'config.json').read_text())['sae']['d_sae'] for p in runs) == [128, 128, 256, 256]
    # rerun with --wait: nothing left to submit, it says so
    r = cli(*args, '--wait', '--mem-gb', 2)
    assert 'already trained' in r.stderr and 'submitted' not in r.stderr


def test_train_wait_blocks_until_done_and_honours_mem_gb(slurm, data, tmp_path):
    r = cli('train', '--train-data.shards', data['train'], '--train-data.layer', 3, '--val-data.shards', data['val'], '--val-data.layer', 3,
            '--train-data.batch-size', 512, '--val-data.batch-size', 512, '--n-train', 48 * 64, '--n-val', 512, '--n-lr-warmup', 2,
            '--sae.d-model', 128, '--sae.d-sae', 128, '--runs-root', tmp_path / 'runs', '--log-to', tmp_path / 'logs', '--mem-gb', 2, '--wait',
            *ACCT, 'objective:vanilla')
    (job,) = _job_ids(r.stderr)
    assert '2 GB each' in r.stderr and '#SBATCH --mem=2GB' in (tmp_path / 'logs' / f'{job}_submission.sh').read_text()
    run = Path(r.stdout.strip().splitlines()[-1])
    assert (run / 'eval.json').exists()  # --wait returned after the job finished


def test_inference_through_slurm(slurm, data, tmp_path):
    from saev_nb.shards import Metadata
    r = cli('inference', '--run', *data['runs'], '--data.shards', data['val'], '--log-to', tmp_path / 'logs', '--wait', *ACCT)
    assert len(_job_ids(r.stderr)) == 2 and 'Bypassing sacct' not in r.stderr
    outs = [Path(l) for l in r.stdout.strip().splitlines()[-len(data['runs']):]]  # summary lines come first
    assert outs == [p / 'inference' / Metadata.load(data['val']).hash / 'layer3-content' for p in data['runs']]
    for o in outs: assert json.loads((o / 'metrics.json').read_text())['n_tokens'] == 16 * 64
    r = cli('inference', '--run', *data['runs'], '--data.shards', data['val'], '--log-to', tmp_path / 'logs', '--wait', *ACCT)
    assert 'submitted' not in r.stderr and r.stderr.count('skipping') == 2


def test_failing_job_is_one_line_with_job_id_and_log(slurm, data, tmp_path):
    "Shards with a NaN pass every check before submission; the trainer meets it inside its Slurm job."
    import numpy as np
    from saev_nb.shards import Metadata
    bad_sh = tmp_path / 'bad' / data['train'].name
    shutil.copytree(data['train'], bad_sh)
    md = Metadata.load(bad_sh)
    acts = np.memmap(bad_sh / 'acts000000.bin', dtype=np.float32, mode='r+', shape=md.shard_shape)
    acts[:, md.layers.index(3), 1:, :] = np.nan; acts.flush(); del acts
    r = cli('train', '--runs-root', tmp_path / 'runs', '--train-data.shards', bad_sh, '--train-data.layer', 3,
            '--train-data.batch-size', 512, '--val-data.shards', data['val'], '--val-data.layer', 3,
            '--val-data.batch-size', 512, '--sae.d-model', 128, '--sae.d-sae', 256, '--n-train', 6144, '--n-val', 1024,
            '--n-lr-warmup', 2, '--log-to', tmp_path / 'logs', '--wait', *ACCT, check=False)
    lines = r.stderr.strip().splitlines()  # the submission line (a log), then the error as one line
    assert r.returncode == 2 and 'Traceback' not in r.stderr and lines[0].startswith('submitted 1 Slurm job'), r.stderr
    assert len(lines) == 2 and lines[1].startswith('saev_nb train: job '), r.stderr
    m = re.search(r'job (\d+) failed .*non-finite activations.*; log: (\S+)$', lines[1])
    assert m, lines[1]
    log = Path(m.group(2))
    assert log.is_file() and log.name.startswith(m.group(1)) and 'NonFiniteError' in log.read_text()

def test_damaged_checkpoint_is_refused_before_submission(slurm, data, tmp_path):
    "A damaged SAE checkpoint is one line before anything is submitted (checks before work)."
    bad = tmp_path / 'damaged_run'
    shutil.copytree(data['runs'][0], bad, ignore=shutil.ignore_patterns('inference'))
    (bad / 'sae.safetensors').write_bytes(b'not a safetensors file')
    r = cli('inference', '--run', bad, '--data.shards', data['val'], '--log-to', tmp_path / 'logs', '--wait', *ACCT, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and 'sae.safetensors: damaged SAE checkpoint' in lines[0], r.stderr
    assert 'submitted' not in r.stderr
