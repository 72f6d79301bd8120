"""The `saev_nb` command as users run it: the installed console script in a subprocess, its exit statuses, stdout and
stderr; the trainer's checks before the first step, non-finite data, signals, locks and damaged run files; the
guide's sweep file verbatim; the Python API of a trained run. A test that runs the same command many times runs the
first through the console script and the rest in-process (`helpers.cli_in_process`: the same `main`, no start-up)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest, torch
from safetensors.torch import load_file

from helpers import SAEV_NB, cli, cli_fails, cli_in_process, cli_in_process_fails

ROOT = Path(__file__).resolve().parents[1]

# --- the entry point -------------------------------------------------------------------------------------------------

def test_help_lists_commands_with_descriptions():
    r = cli('--help')
    lines = [l for l in r.stdout.splitlines() if l.startswith('  ')]
    cmds = [l.split('  ')[1].strip() for l in lines if not l.strip().startswith('(')]
    assert {'make-data', 'shards', 'train', 'inference', 'visuals', 'semseg features', 'semseg visuals'} <= set(cmds)
    assert 'saev_nb.' not in r.stdout and r.stderr == ''
    semseg = cli('semseg', '--help').stdout
    assert all(f'semseg {c}' in semseg for c in ('train', 'validate', 'visuals', 'features', 'suppress'))
    assert 'make-data' not in semseg

def test_python_dash_m_and_bad_flags(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'saev_nb', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'make-data' in r.stdout
    cli_fails('nope', contains="unknown command 'nope'")
    bad = cli('make-data', '--n-trian', 3, check=False)  # a mistyped flag: tyro's usage error, exit 2
    assert bad.returncode == 2 and 'n-trian' in bad.stderr

def test_make_data_success_and_user_error(tmp_path):
    r = cli('make-data', '--root', tmp_path/'ade', '--n-train', 3, '--n-val', 1, '--size', 64)
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path/'ade') and 'Traceback' not in r.stderr
    assert len(list((tmp_path/'ade/images/training').glob('*.jpg'))) == 3
    cli_fails('make-data', '--root', tmp_path/'bad', '--n-classes', 200, contains='n_classes must be in 1..150')

# --- training: checks before work, and faults ------------------------------------------------------------------------

def _shards(dpath, **kw):
    from saev_nb.shards import make_random_shards
    return make_random_shards(dpath, **{'n_examples': 64, 'layers': (0, 1), 'd_model': 32, 'content_tokens': 16, **kw})

def _train_args(runs, sh, *extra, n_train=4096, val=None):
    return ['train', '--runs-root', runs, '--train-data.shards', sh, '--train-data.layer', 1, '--train-data.batch-size', 128,
            '--val-data.shards', val or sh, '--val-data.layer', 1, '--val-data.batch-size', 256, '--sae.d-model', 32,
            '--sae.exp-factor', 2, '--n-train', n_train, '--n-val', 512, '--n-lr-warmup', 4, '--lr', '3e-3', *extra]

@pytest.fixture(scope='module')
def sh(tmp_path_factory): return _shards(tmp_path_factory.mktemp('sh')/'shards')

def test_train_user_errors_are_one_line(sh, tmp_path):
    runs = tmp_path/'runs'
    (tmp_path/'bad.toml').write_text('lr = [1e-3')
    cli_fails(*_train_args(runs, sh, '--sweep', tmp_path/'bad.toml'), contains='bad.toml: malformed TOML')
    r = cli(*_train_args(tmp_path/'capped', sh, '--train-data.batch-size', 100_000, '--n-train', 200_000, '--n-lr-warmup', 0))
    assert 'warning: --train-data.batch-size 100000 is more than the 1024 content tokens' in r.stderr  # capped, not refused
    line = cli_in_process_fails(*_train_args(runs, sh, '--lr', 0, '--ckpt-every', 0, '--n-val', 0), contains='--lr 0.0')
    assert '--ckpt-every 0' in line and '--n-val 0' in line  # every problem in one line
    cli_in_process_fails(*_train_args(runs, sh, '--sae.d-model', 768), contains='set --sae.d-model 32')
    cli_in_process_fails(*_train_args(runs, sh, '--val-data.layer', 0), contains='validation layer is 0 but training layer is 1')
    other = _shards(tmp_path/'other', d_model=16)
    cli_in_process_fails(*_train_args(runs, sh, val=other), contains='validation d_model is 16')
    cli_in_process_fails(*_train_args(runs, sh, '--device', 'cuda'), contains='no CUDA GPU')
    cli_in_process_fails(*_train_args(runs, sh, 'sae.activation:topk', '--sae.activation.top-k', 1000), contains='use 1..64')
    assert not runs.exists() or not any(runs.rglob('eval.json'))  # nothing trained

def test_debug_env_shows_traceback(sh, tmp_path):
    r = cli(*_train_args(tmp_path/'runs', sh, '--lr', 0), check=False, env={'SAEV_NB_DEBUG': '1'})
    assert r.returncode == 1 and 'Traceback' in r.stderr and 'TrainConfigError' in r.stderr

def test_warmup_longer_than_run_warns(sh, tmp_path):
    r = cli(*_train_args(tmp_path/'runs', sh, '--n-lr-warmup', 500, '--ckpt-every', 'off'))
    assert 'warning: --n-lr-warmup 500 is longer than the run (32 steps)' in r.stderr

def test_nonfinite_shards_stop_training_naming_the_example(tmp_path):
    from saev_nb.shards import Metadata
    sh = _shards(tmp_path/'nan')
    md = Metadata.load(sh)
    arr = np.memmap(sh/'acts000000.bin', dtype=np.float32, mode='r+', shape=md.shard_shape)
    arr[3, 1, 5, 7] = np.nan; arr.flush(); del arr
    line = cli_fails(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 'off'), contains='non-finite activations')
    assert 'acts000000.bin: nan at example 3, layer 1, patch 4' in line  # stored row 5 is patch 4 (CLS first)
    assert not list((tmp_path/'runs').rglob('eval.json')) and not list((tmp_path/'runs').rglob('sae.safetensors'))

def test_sigterm_checkpoints_and_resume_is_exact(sh, tmp_path):
    args = _train_args(tmp_path/'runs', sh, '--ckpt-every', 1000, '--log-every', 1, n_train=128 * 600)
    ref = cli(*_train_args(tmp_path/'ref', sh, '--ckpt-every', 1000, '--log-every', 1, n_train=128 * 600))
    ref_run = Path(ref.stdout.strip().splitlines()[-1])
    p = subprocess.Popen([str(SAEV_NB), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path/'runs'/ref_run.name/'metrics.jsonl'
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 30):
        assert p.poll() is None and time.time() - t0 < 120, 'training ended before the signal'
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-2000:]
    assert 'SIGTERM at step' in err and 'rerun the same command to resume' in err and 'Traceback' not in err
    assert (tmp_path/'runs'/ref_run.name/'checkpoint.pt').exists() and not (tmp_path/'runs'/ref_run.name/'eval.json').exists()
    cli(*args)
    a, b = load_file(ref_run/'sae.safetensors'), load_file(tmp_path/'runs'/ref_run.name/'sae.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda f: [{k: v for k, v in json.loads(l).items() if not k.startswith('loader/')} for l in f.read_text().splitlines()]
    assert rows(metrics) == rows(ref_run/'metrics.jsonl')  # the loader's timing columns differ, nothing else

def test_one_trainer_per_run_and_damaged_files(sh, tmp_path):
    from saev_nb.core import hold_lock
    r = cli(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8))
    run = Path(r.stdout.strip().splitlines()[-1])
    again = cli_in_process(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8))
    assert 'already trained (eval.json exists); skipping' in again.stderr
    (run/'eval.json').write_text('')
    cli_in_process_fails(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8), contains='eval.json: damaged (not JSON); rerun with --force')
    (run/'eval.json').unlink(); (run/'checkpoint.pt').write_bytes(b'PK\x03\x04 truncated')
    cli_in_process_fails(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8), contains='checkpoint.pt: damaged or not a checkpoint of this run')
    with hold_lock(run, 'trainer of this run'):  # another process (the console script) finds the lock
        cli_fails(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8, '--restart'), contains=f'(pid {os.getpid()}')
    cli_in_process(*_train_args(tmp_path/'runs', sh, '--ckpt-every', 8, '--restart'))
    assert json.loads((run/'eval.json').read_text())['n_tokens'] == 512

# --- the guide's spelling --------------------------------------------------------------------------------------------

def test_guide_sweep_file_verbatim_trains_six_saes_in_one_pass(tmp_path):
    sh = _shards(tmp_path/'sh768', d_model=768, n_examples=16, content_tokens=16)
    r = cli('train', '--runs-root', tmp_path/'runs', '--train-data.shards', sh, '--train-data.layer', 1,
            '--train-data.batch-size', 128, '--val-data.shards', sh, '--val-data.layer', 1, '--val-data.batch-size', 256,
            '--n-train', 256, '--n-val', 256, '--n-lr-warmup', 1, '--tag', 'ade20k-v0.1', '--ckpt-every', 'off',
            'sae.activation:relu', 'objective:vanilla', '--sweep', ROOT/'sweeps/guide.toml')  # flags after the subcommands
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 7 and lines[-1] == str(tmp_path/'runs')
    assert 'objective.sparsity_coeff=0.0001' in lines[0] and 'sae.d_sae=6144' in lines[0] and 'nmse=' in lines[0]
    assert '6 SAEs' in r.stderr  # one data pass for the whole grid
    runs = [tmp_path/'runs'/l.split()[0] for l in lines[:-1]]
    cfgs = [json.loads((p/'config.json').read_text()) for p in runs]
    assert {(c['objective']['sparsity_coeff'], c['sae']['d_sae']) for c in cfgs} == {
        (s, d) for s in (1e-4, 2e-4, 3e-4) for d in (6144, 12288)}
    assert all(c['tag'] == 'ade20k-v0.1' and c['train_data']['scale_mean'] and c['val_data']['scale_mean'] for c in cfgs)
    assert all((p/'normalizer.safetensors').exists() for p in runs) and not list(sh.glob('normalizer*'))

def test_shipped_sweep_files_expand():
    from dataclasses import replace
    from saev_nb.loaders import ShuffledConfig
    from saev_nb.runs import TrainConfig
    from saev_nb.sweeps import expand_cfgs, split_groups
    base = TrainConfig(train_data=ShuffledConfig(), val_data=ShuffledConfig())
    pre = expand_cfgs(replace(base, sweep=ROOT/'sweeps/preprint-baseline.toml'))
    assert len(pre) == 18 and len(split_groups(pre)) == 1
    assert {(c.lr, c.objective.sparsity_coeff, c.sae.exp_factor) for c in pre} == {
        (lr, s, e) for lr in (3e-4, 1e-3, 3e-3) for s in (4e-4, 8e-4, 1.6e-3) for e in (16, 32)}
    assert len(expand_cfgs(replace(base, sweep=ROOT/'sweeps/guide.toml'))) == 6

# --- the Python API --------------------------------------------------------------------------------------------------

def test_load_run_applies_the_normalizer(sh, tmp_path):
    from saev_nb.loaders import IndexedDataset
    from saev_nb.runs import load_run
    r = cli(*_train_args(tmp_path/'runs', sh, '--train-data.scale-mean', '--train-data.scale-norm',
                         '--val-data.scale-mean', '--val-data.scale-norm', '--ckpt-every', 'off', n_train=128 * 64))
    run = load_run(r.stdout.strip().splitlines()[-1])
    x = IndexedDataset(sh, 1)[np.arange(512)]['acts']
    nmse = lambda x_hat: float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    reported = json.loads((run.dpath/'eval.json').read_text())['nmse']
    assert abs(nmse(run.reconstruct(x)) - reported) < 0.05
    with torch.no_grad(): assert nmse(run.sae(x).x_hat) > 1.3 * nmse(run.reconstruct(x))  # raw input to the bare SAE
    assert run.encode(x).shape == (512, 64) and run.cfg.train_data.scale_norm and run.cfg.train_data.layer == 1

def test_saev_checkpoint_export_roundtrip(tmp_path):
    from saev_nb.sae import SAE, SAEConfig, BatchTopK, TopK, load_sae, save_saev_checkpoint
    x = torch.randn(64, 16)
    for act in (TopK(top_k=4), BatchTopK(top_k=4)):
        sae = SAE(SAEConfig(d_model=16, exp_factor=4, activation=act), seed=1)
        sae.train(); sae(x); sae.eval()  # BatchTopK learns its threshold in training
        f = save_saev_checkpoint(sae, tmp_path/f'{type(act).__name__}.pt')
        header = json.loads(f.read_bytes().split(b'\n', 1)[0])
        assert header['schema'] == 5 and header['cfg']['d_sae'] == 64
        with torch.no_grad(): assert torch.equal(load_sae(f).eval()(x).f_x, sae(x).f_x)

def test_full_disk_while_training_is_one_line(sh, tmp_path):
    "A write that hits the file-size limit (as a full disk would) ends with one line naming the file, exit 2."
    import resource
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    args = _train_args(tmp_path/'runs', sh, '--sae.exp-factor', 16, '--ckpt-every', 4)
    r = subprocess.run([str(SAEV_NB), *map(str, args)], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith('saev_nb train: ') and 'checkpoint.pt: disk full' in lines[-1]
    assert not list((tmp_path/'runs').rglob('.tmp.*'))  # no half-written file left behind

@pytest.mark.parametrize('sig,status,how', [(signal.SIGINT, 130, 'Ctrl-C'), (signal.SIGTERM, 143, 'SIGTERM')])
def test_stop_while_starting_is_one_line(sig, status, how):
    "Ctrl-C or SIGTERM (to the process group, as a shell or Slurm sends it) while torch is imported: one line."
    for delay_s in (0.05, 0.3):  # the interpreter's start-up, then the imports of the command line
        p = subprocess.Popen([str(SAEV_NB), 'make-data', '--help'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        time.sleep(delay_s); os.killpg(p.pid, sig)
        out, err = p.communicate(timeout=60)
        if p.returncode == 0: continue  # finished before the signal (a fast machine): nothing to check at this delay
        assert p.returncode == status and err.count('\n') == 1 and 'Traceback' not in err, (p.returncode, err)
        assert err.startswith('saev_nb') and f'interrupted ({how})' in err, err

def test_seed_spellings_of_renamed_flags(tmp_path):
    "saev's `--acts.shard-root` and the trainer's old `--restart` reach the one field name (`shards`, `force`)."
    from saev_nb.cli import canonical_flags, load_command
    _, cfg_cls = load_command('semseg features')
    assert canonical_flags(cfg_cls, ['--acts.shard-root', 'S', '--acts.layer', '3']) == ['--acts.shards', 'S',
                                                                                         '--acts.layer', '3']
    _, cfg_cls = load_command('semseg train')
    assert canonical_flags(cfg_cls, ['--train-acts.shard-root=T']) == ['--train-acts.shards=T']
    _, cfg_cls = load_command('train')
    assert canonical_flags(cfg_cls, ['--restart', '--train-data.shards', 'S']) == ['--force', '--train-data.shards', 'S']
    r = cli('train', '--help')
    assert '--force' in r.stdout and '--restart ' not in r.stdout  # one flag; the old spelling accepted, not listed
